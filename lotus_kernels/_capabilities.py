"""Which backend implements what, per op: the one table ``_backend.select`` reads.

An op's default backend is the first usable one of ``_backend.PREFERENCE`` that the op lists here,
else ``reference``; forcing a backend the op does not list (``use_backend`` / ``LOTUS_KERNELS_BACKEND``)
raises ``NotImplementedError`` naming the op, never a quiet fallback. ``tests/test_capabilities.py``
checks every row against what is built: a ``cpu`` / ``cuda`` entry needs the op's C++ / CUDA kernels
registered with the dispatcher, a ``triton`` entry its launchers in ``lotus_kernels/triton/``.

Columns:
  backends     the backends with a kernel for the op (``reference`` is plain PyTorch: always there)
  dtypes       the floating dtypes the op accepts (every backend; fp64 is for gradcheck)
  mixed_input  backends that read an activation of another dtype than the weights as is (the CPU
               block-sparse kernels convert while packing); the others cast it first, one extra pass
  fused_bias   backends whose backward sums the bias gradient inside the kernel (the CPU block-sparse
               kernels add dy's columns up while packing dy); the others run ``dy.sum(0)`` after
  kernels      the kernel entry points (``torch.ops.lotus_kernels_C.<name>`` / the Triton launcher
               ``lotus_kernels.triton.<module>.<name>``) the op launches, for the consistency test
  module       the Triton module holding those launchers
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import FLOAT_DTYPES as FLOATS


@dataclass(frozen=True)
class Capability:
    backends: tuple[str, ...]
    kernels: tuple[str, ...] = ()
    module: str | None = None
    dtypes: tuple[torch.dtype, ...] = FLOATS
    mixed_input: tuple[str, ...] = ()
    fused_bias: tuple[str, ...] = ()

    def __post_init__(self):
        for col in ("mixed_input", "fused_bias"):
            extra = set(getattr(self, col)) - set(self.backends)
            if extra:
                raise ValueError(f"{col}: {sorted(extra)} are not among backends {self.backends}")


_ALL = ("reference", "cpu", "cuda", "triton")

CAPABILITIES: dict[str, Capability] = {
    "token_gather": Capability(_ALL, ("gather_tokens", "scatter_tokens"), "token_gather"),
    "patch_embed_gather": Capability(
        _ALL, ("im2col_gather", "col2im_scatter", "patch_embed_gather"), "patch_embed_gather"
    ),
    # No CUDA C++ attention: on CUDA tensors Triton (fused) or PyTorch's SDPA + a Triton CLS-row kernel.
    "attention": Capability(("reference", "cpu", "triton"), ("attention_fwd", "attention_bwd"), "attention"),
    "block_sparse_linear": Capability(
        _ALL,
        ("bsr_linear_fwd", "bsr_linear_bwd_input", "bsr_linear_bwd_weight"),
        "block_sparse_linear",
        mixed_input=("cpu",),
        fused_bias=("cpu",),
    ),
    # dW = (dy^T x) masked: one GEMM (torch.mm, every device) then the masked zeroing, a C++ kernel on
    # the CPU; no GPU kernel, so on CUDA tensors the default is the reference (the same mm + masked_fill).
    "masked_weight_grad": Capability(("reference", "cpu"), ("masked_fill_grad_",)),
}


def capability(op: str) -> Capability:
    try:
        return CAPABILITIES[op]
    except KeyError:
        raise ValueError(f"op: unknown op {op!r}; expected one of {', '.join(CAPABILITIES)}") from None


def capabilities() -> dict[str, dict]:
    """Which backend implements what, per op, as plain data (e.g. for a log or a bug report):
    ``{'attention': {'backends': ('reference', 'cpu', 'triton'), 'dtypes': (...), ...}, ...}``."""
    return {
        op: {
            "backends": c.backends,
            "dtypes": tuple(str(d).removeprefix("torch.") for d in c.dtypes),
            "mixed_input": c.mixed_input,
            "fused_bias": c.fused_bias,
        }
        for op, c in CAPABILITIES.items()
    }
