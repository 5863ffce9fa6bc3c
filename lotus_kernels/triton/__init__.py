"""Triton kernels and their launchers, one module per op family (CUDA, or CPU with ``TRITON_INTERPRET=1``)."""
