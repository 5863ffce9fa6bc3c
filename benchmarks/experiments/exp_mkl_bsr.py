"""Experiment (not part of `make bench`): MKL's sparse BLAS with BSR (inspector-executor
``mkl_sparse_s_mm``) vs our block-sparse fwd / bwd_input kernels, 1 thread, CPU time (robust to a
shared machine), interleaved, min of rounds. It decides whether the library should depend on MKL's
sparse BLAS (docs/design/cpu_isa_kernels.md, "MKL sparse BLAS"). MKL has no SDD product, so bwd_weight
is not compared.

MKL comes from the PyPI ``mkl`` wheel, unpacked (pip's --target drops its shared libraries):

    pip download mkl==2024.2.2 intel-openmp --no-deps -d /tmp/mklwhl && cd /tmp/mklwhl && for w in *.whl; do unzip -q -o $w -d x; done
    LD_LIBRARY_PATH=/tmp/mklwhl/x/mkl-2024.2.2.data/data/lib PYTHONPATH=. \\
        python benchmarks/experiments/exp_mkl_bsr.py --mkl-lib /tmp/mklwhl/x/mkl-2024.2.2.data/data/lib

Layouts: ours computes y [M, out] = x W^T with x, y row-major. MKL puts the sparse matrix on the
left, so y^T = W x^T: either column-major dense operands (x, y as they are) or row-major ones (x^T,
y^T: two transposes, timed separately and not added to MKL's time).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import time

GENERAL, ROW_MAJOR, COL_MAJOR, NON_TRANSPOSE, TRANSPOSE = 20, 101, 102, 10, 11


class _Descr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("mode", ctypes.c_int), ("diag", ctypes.c_int)]


def load_mkl(lib_dir: str):
    mkl = ctypes.CDLL(os.path.join(lib_dir, "libmkl_rt.so.2"), mode=os.RTLD_LOCAL | os.RTLD_DEEPBIND)
    mkl.MKL_Set_Threading_Layer(ctypes.c_int(1))  # sequential: compare 1 thread with 1 thread
    i, p = ctypes.c_int, ctypes.c_void_p
    mkl.mkl_sparse_s_create_bsr.argtypes = [ctypes.POINTER(p), i, i, i, i, i, p, p, p, p]
    mkl.mkl_sparse_s_mm.argtypes = [i, ctypes.c_float, p, _Descr, i, p, i, i, ctypes.c_float, p, i]
    mkl.mkl_sparse_set_mm_hint.argtypes = [p, i, _Descr, i, i, i]
    mkl.mkl_sparse_optimize.argtypes = [p]
    mkl.mkl_sparse_destroy.argtypes = [p]
    return mkl


def run(mkl, in_f, out_f, d, m, bs, rounds):
    import torch

    import lotus_kernels as lk
    from lotus_kernels.ops import bsr_from_dense

    lk.backends()
    C = torch.ops.lotus_kernels_C
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f // bs, in_f // bs, generator=g) < d
    values, crow, col, ccol, row, perm = bsr_from_dense(w, mask, bs)
    x, dy = torch.randn(m, in_f), torch.randn(m, out_f)
    y, dx = torch.empty(m, out_f), torch.empty(m, in_f)
    xt, dyt, yt, dxt = x.t().contiguous(), dy.t().contiguous(), torch.empty(out_f, m), torch.empty(in_f, m)
    cr32, col32 = crow.to(torch.int32), col.to(torch.int32)
    descr = _Descr(GENERAL, 121, 131)
    h = ctypes.c_void_p()
    assert (
        mkl.mkl_sparse_s_create_bsr(
            ctypes.byref(h),
            0,
            ROW_MAJOR,
            out_f // bs,
            in_f // bs,
            bs,
            cr32.data_ptr(),
            cr32.data_ptr() + 4,
            col32.data_ptr(),
            values.data_ptr(),
        )
        == 0
    )
    for op in (NON_TRANSPOSE, TRANSPOSE):
        for layout in (ROW_MAJOR, COL_MAJOR):
            mkl.mkl_sparse_set_mm_hint(h, op, descr, layout, m, 1000)
    t0 = time.process_time()
    assert mkl.mkl_sparse_optimize(h) == 0
    t_opt = time.process_time() - t0
    fns = {
        "mkl fwd col-major": lambda: mkl.mkl_sparse_s_mm(
            NON_TRANSPOSE, 1.0, h, descr, COL_MAJOR, x.data_ptr(), m, in_f, 0.0, y.data_ptr(), out_f
        ),
        "mkl fwd row-major": lambda: mkl.mkl_sparse_s_mm(
            NON_TRANSPOSE, 1.0, h, descr, ROW_MAJOR, xt.data_ptr(), m, m, 0.0, yt.data_ptr(), m
        ),
        "mkl bwd_input row-major": lambda: mkl.mkl_sparse_s_mm(
            TRANSPOSE, 1.0, h, descr, ROW_MAJOR, dyt.data_ptr(), m, m, 0.0, dxt.data_ptr(), m
        ),
        "transposes (x, y)": lambda: (xt.copy_(x.t()), y.copy_(yt.t())),
        f"ours fwd [{lk.cpu_kernel_path('block_sparse_linear.fwd')}]": lambda: C.bsr_linear_fwd(
            x, values, crow, col, None, y
        ),
        "ours bwd_input": lambda: C.bsr_linear_bwd_input(dy, values, ccol, row, perm, dx),
        "dense fwd (torch.mm, MKL sgemm)": lambda: torch.mm(x, w.t(), out=y),
    }
    wd = (w.view(out_f // bs, bs, in_f // bs, bs) * mask[:, None, :, None]).view(out_f, in_f)
    fns["mkl fwd row-major"]()
    assert torch.allclose(yt.t(), x @ wd.t(), rtol=1e-4, atol=1e-3)
    fns["mkl bwd_input row-major"]()
    assert torch.allclose(dxt.t(), dy @ wd, rtol=1e-4, atol=1e-3)
    fns["mkl fwd col-major"]()
    assert torch.allclose(y, x @ wd.t(), rtol=1e-4, atol=1e-3)
    times = {k: [] for k in fns}
    names = list(fns)
    for f in fns.values():
        f()
    for _ in range(rounds):
        random.shuffle(names)
        for k in names:
            t0 = time.process_time()
            fns[k]()
            times[k].append(time.process_time() - t0)
    sparse_flops = 2 * m * values.shape[0] * bs * bs
    print(f"{m}x{in_f}->{out_f} d={d:g} (mkl_sparse_optimize {1e3 * t_opt:.1f} ms)")
    for k, ts in times.items():
        fl = 2 * m * in_f * out_f if ("dense" in k or "transposes" in k) else sparse_flops
        print(f"  {k:42s} {1e3 * min(ts):8.2f} ms  {fl / min(ts) / 1e9:6.1f} GFLOP/s")
    mkl.mkl_sparse_destroy(h)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mkl-lib", required=True, help="directory holding libmkl_rt.so.2 (and its libmkl_*.so.2)")
    p.add_argument("--shapes", default="384x1536,768x3072")
    p.add_argument("--densities", default="0.5,0.1")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    mkl = load_mkl(args.mkl_lib)
    import torch

    torch.set_num_threads(1)
    for shape in args.shapes.split(","):
        in_f, out_f = map(int, shape.split("x"))
        for d in map(float, args.densities.split(",")):
            run(mkl, in_f, out_f, d, 1576, 32, args.rounds)


if __name__ == "__main__":
    main()
