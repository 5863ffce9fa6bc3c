"""What the compilers make of every GPU kernel of lotus_kernels, found without a GPU.

Triton: every kernel x every launch configuration a GPU can run (the committed table of
``lotus_kernels/triton/_configs.py``, the autotune lists, the GPU defaults; the GPU-only ones included:
GROUP_M > 1, num_stages > 1, fp64) x every dtype and block size the launchers pass, compiled with
``triton.compile`` for a ``GPUTarget`` (sm_90 = H100 / H200, sm_80 = A100; Triton ships ptxas, so no GPU
and no CUDA toolkit are needed). CUDA C++: every kernel of ``csrc/cuda/*.cu`` compiled for sm_90 by nvcc
(``--cuda``: needs nvcc and torch's headers). For each: the tensor-core instruction the PTX uses
(``wgmma.mma_async``: Hopper's warpgroup MMA; ``mma.sync``: the Ampere-style one, a fraction of Hopper's
peak; none), registers per thread, spilled bytes, static + dynamic shared memory, warps, stages, and the
occupancy this implies on an H200 (132 SMs; per SM 64K registers, 228 KiB shared memory, 2048 threads,
32 blocks; 1 KiB of shared memory reserved per block).

    python tools/compiled_code.py            # every sm_90 variant + sm_80's lean subset; writes
                                             # benchmarks/results/gpu/compiled_sm90.{md,json}
    python tools/compiled_code.py --cuda     # ... plus the CUDA C++ kernels (nvcc, ~1 min)
    python tools/compiled_code.py --check    # compile and check only (the test runs it with --lean)

Checks (exit 1 when one fails): every variant compiles; every variant a launcher can pick without the
autotuner's help (GPU defaults, table entries) fits a block's shared memory (autotune configs that do not
fit are listed: the autotuner skips them); on sm_90 every bf16 / fp16 tensor-core kernel variant (the hot
path) uses ``wgmma`` and spills nothing.

Results are cached per variant (key: Triton version, the kernel's source hash, its specialisation) in
``$TRITON_CACHE_DIR`` (default ~/.triton/cache)/lotus_compiled, beside Triton's own cache: a rerun after
an unrelated change compiles nothing. Variants compile in ``--jobs`` processes (default: the CPU count).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "gpu"
ARCHS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32", "tf32", "fp64")  # tf32: fp32 tensors with TF32 allowed by the user
HOT_DTYPES = ("bf16", "fp16")

# H200 (sm_90) per SM: what occupancy is computed from.
H200 = dict(sms=132, regs=65536, smem=233472, smem_block=232448, threads=2048, blocks=32, reserved=1024, reg_unit=256)


# ---------------------------------------------------------------- the variants
@dataclasses.dataclass
class Variant:
    kernel: str  # module.function
    name: str  # the launcher's table name (or the kernel's, for untuned kernels)
    dtype: str
    arch: int
    consts: dict
    signature: dict
    attrs: dict
    num_warps: int
    num_stages: int
    origin: str  # default | autotune | table | layout (a layout flag at the default config)
    hot: bool  # a bf16 / fp16 tensor-core kernel: must use wgmma on sm_90 and not spill

    def label(self) -> str:
        shown = {k: v for k, v in self.consts.items() if k not in _HIDDEN}
        return " ".join(f"{k}={v}" for k, v in shown.items())

    def key(self) -> str:
        from triton import __version__

        fn = _function(self.kernel)
        text = repr(
            (
                __version__,
                fn.cache_key,
                sorted(self.signature.items()),
                sorted(map(repr, self.consts.items())),
                sorted(self.attrs.items()),
                self.num_warps,
                self.num_stages,
                self.arch,
                _TOOL_VERSION,
            )
        )
        return hashlib.sha256(text.encode()).hexdigest()[:32]


_TOOL_VERSION = 1  # bump when the recorded fields change
_HIDDEN = {"ACC_DTYPE", "INPUT_PRECISION", "DOT_IN_ACC_DTYPE", "BF16_BY_HAND", "UPCAST"}


def _function(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _flags(dtype: str) -> dict:
    import triton.language as tl

    return dict(
        ACC_DTYPE=tl.float64 if dtype == "fp64" else tl.float32,
        INPUT_PRECISION="tf32" if dtype == "tf32" else "ieee",
        DOT_IN_ACC_DTYPE=False,
        BF16_BY_HAND=False,
    )


def _ptr(dtype: str) -> str:
    return {"tf32": "*fp32"}.get(dtype, f"*{dtype}")


def _spec(fn, ptrs: dict, ints: dict, floats: tuple = ()) -> tuple[dict, dict]:
    """(signature, attrs) as a real launch specialises them: pointers 16-byte aligned, and the int
    arguments (given their ViT-B/16 values, batch 64) divisible by 16 where those values are."""
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in ptrs:
            sig[arg] = ptrs[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ints:
            sig[arg] = "i32"
            if ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in floats:
            sig[arg] = "fp32"
    return sig, attrs


def _variant(
    kernel: str,
    name: str,
    dtype: str,
    arch: int,
    ptrs: dict,
    ints: dict,
    consts: dict,
    meta: dict,
    origin: str,
    hot: bool,
    floats: tuple = (),
) -> Variant:
    fn = _function(kernel)
    meta = dict(meta)
    warps, stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
    consts = {**consts, **meta}
    sig, attrs = _spec(fn, ptrs, ints, floats)
    sig.update({c: "constexpr" for c in consts})
    return Variant(kernel, name, dtype, arch, consts, sig, attrs, warps, stages, origin, hot)


def _table(name: str, dtype: str, match) -> list[dict]:
    """The committed table's configs of kernel ``name`` for this dtype whose bucket satisfies ``match``."""
    from lotus_kernels.triton import _configs

    torch_dtype = {"tf32": "float32", "fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}
    return [
        cfg
        for (kernel, _gpu, dt, bucket), cfg in _configs.TABLE.items()
        if kernel == name and dt == torch_dtype[dtype] and match(bucket)
    ]


def _configs_of(default: dict, autotune: list, table: list[dict]) -> list[tuple[dict, str]]:
    """[(meta incl. num_warps / num_stages, origin)], duplicates removed (first origin kept)."""
    out, seen = [], set()
    cands = (
        [(default, "default")]
        + [({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}, "autotune") for c in autotune]
        + [(t, "table") for t in table]
    )
    for meta, origin in cands:
        key = tuple(sorted(meta.items()))
        if key not in seen:
            seen.add(key)
            out.append((meta, origin))
    return out


def block_sparse_variants(arch: int, dtype: str) -> list[Variant]:
    from lotus_kernels.triton import block_sparse_linear as bsl

    mod = "lotus_kernels.triton.block_sparse_linear"
    p, vs = _ptr(dtype), []
    acc_ptr = "*fp64" if dtype == "fp64" else "*fp32"
    hot = dtype in HOT_DTYPES
    ints = dict(M=12608, A_COLS=768, OUT_COLS=3072, SLOTS=96, M_KEY=16384, NNZ_KEY=16)
    for bs in (16, 32, 64):
        for name, trans in (("bsr_fwd", True), ("bsr_bwd_input", False)):
            table = _table(name, dtype, lambda b, bs=bs: b[0] == bs)
            for meta, origin in _configs_of(bsl._product_meta(bsl.PRODUCT_DEFAULT, bs), bsl.product_configs(bs), table):
                ptrs = dict(a_ptr=p, v_ptr=p, ptr_ptr="*i64", idx_ptr="*i64", perm_ptr="*i64", bias_ptr=p, out_ptr=p)
                vs.append(
                    _variant(
                        f"{mod}._bsr_product_kernel",
                        name,
                        dtype,
                        arch,
                        ptrs,
                        ints,
                        dict(BS=bs, TRANS_W=trans, HAS_PERM=not trans, HAS_BIAS=trans, **_flags(dtype)),
                        meta,
                        origin,
                        hot,
                    )
                )
        wints = dict(M=12608, IN=768, OUT=3072, NNZB=1152, ROWS_PER_SPLIT=4208, M_KEY=16384, NNZ_KEY=16)
        for partial in (False, True):
            table = _table("bsr_bwd_weight", dtype, lambda b, bs=bs, partial=partial: b[0] == bs and b[1] == partial)
            for meta, origin in _configs_of(bsl._wgrad_meta(bsl.WGRAD_DEFAULT, bs), bsl.wgrad_configs(bs), table):
                ptrs = dict(dy_ptr=p, x_ptr=p, crow_ptr="*i64", col_ptr="*i64", dst_ptr=acc_ptr if partial else p)
                vs.append(
                    _variant(
                        f"{mod}._bsr_bwd_weight_kernel",
                        "bsr_bwd_weight",
                        dtype,
                        arch,
                        ptrs,
                        wints,
                        dict(BS=bs, PARTIAL=partial, **_flags(dtype)),
                        meta,
                        origin,
                        hot,
                    )
                )
    if dtype != "tf32":  # no dot: fp32 and tf32 are one kernel
        vs.append(
            _variant(
                f"{mod}._sum_partials_kernel",
                "bsr_sum_partials",
                dtype,
                arch,
                dict(part_ptr=acc_ptr, out_ptr=p),
                dict(S=3, NUMEL=1179648),
                dict(BF16_BY_HAND=False, BLOCK=1024),
                dict(num_warps=4, num_stages=3),
                "default",
                False,
            )
        )
    return vs


def attention_variants(arch: int, dtype: str) -> list[Variant]:
    """Every config at the ViT layout (padded, no mask, D = 64 and 128); the layout flags (mask, varlen
    with int64 / int32 offsets, class-token scores) at the default config; fp64 (never tuned: products by
    hand) at its own tiles; the score kernels."""
    import triton.language as tl

    from lotus_kernels.triton import attention as att

    mod = "lotus_kernels.triton.attention"
    p, acc_ptr = _ptr(dtype), "*fp64" if dtype == "fp64" else "*fp32"
    by_hand = dtype == "fp64"
    hot = dtype in HOT_DTYPES  # the backward at D = 128 (no ViT's head size) is recorded, not required: below
    default = (
        dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
        if by_hand
        else dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    )
    bwd_default = default if by_hand else {**default, "num_warps": att.BWD_WARPS}
    vs = []
    for D in (64, 128):
        table = _table("attention_fwd", dtype, lambda b, D=D: b[0] == D)
        configs = _configs_of(default, [] if by_hand else att.CONFIGS, table)
        bwd_configs = _configs_of(
            bwd_default,
            [] if by_hand else att.BWD_CONFIGS,
            _table("attention_bwd_dkdv", dtype, lambda b, D=D: b[0] == D),
        )
        layouts = [(False, False, "*i64", False)] + [
            (m, v, cu, c)
            for m, v, cu, c in (
                (True, False, "*i64", False),
                (False, True, "*i64", False),
                (False, True, "*i32", False),
                (False, False, "*i64", True),
            )
            if D == 64
        ]
        for has_mask, varlen, cu, cls in layouts:
            common = dict(
                HAS_MASK=has_mask,
                VARLEN=varlen,
                ACC_DTYPE=tl.float64 if by_hand else tl.float32,
                INPUT_PRECISION="tf32" if dtype == "tf32" else "ieee",
                UPCAST=False,
                BY_HAND=by_hand,
                BLOCK_D=D,
            )
            ints = dict(N=197, T=6304 if varlen else 0, D=D, H=12, N_KEY=256)
            qkv = dict(q_ptr=p, k_ptr=p, v_ptr=p, mask_ptr="*i1", cu_ptr=cu)
            layout = (has_mask, varlen, cu, cls) != (False, False, "*i64", False)
            for meta, origin in configs[:1] if layout else configs:
                vs.append(
                    _variant(
                        f"{mod}._attention_fwd_kernel",
                        "attention_fwd",
                        dtype,
                        arch,
                        dict(**qkv, out_ptr=p, lse_ptr=acc_ptr, s0_ptr=acc_ptr),
                        ints,
                        {**common, "CLS": cls},
                        meta,
                        "layout" if layout else origin,
                        hot,
                        floats=("scale",),
                    )
                )
            if cls:
                continue
            for meta, origin in bwd_configs[:1] if layout else bwd_configs:
                origin = "layout" if layout else origin
                bwd = dict(**qkv, do_ptr=p, o_ptr=p, lse_ptr=acc_ptr)
                vs.append(
                    _variant(
                        f"{mod}._attention_bwd_dkdv_kernel",
                        "attention_bwd_dkdv",
                        dtype,
                        arch,
                        dict(**bwd, dk_ptr=p, dv_ptr=p),
                        ints,
                        common,
                        meta,
                        origin,
                        hot and D <= 64,
                        floats=("scale",),
                    )
                )
                vs.append(
                    _variant(
                        f"{mod}._attention_bwd_dq_kernel",
                        "attention_bwd_dq",
                        dtype,
                        arch,
                        dict(**bwd, dq_ptr=p),
                        ints,
                        common,
                        meta,
                        origin,
                        hot and D <= 64,
                        floats=("scale",),
                    )
                )
    if dtype in ("fp32", "fp64"):  # the score kernel reads lse-typed buffers only (fp64 for fp64 inputs)
        for n, (varlen, cu, sink) in enumerate(
            ((False, "*i64", True), (True, "*i64", True), (True, "*i32", True), (False, "*i64", False))
        ):
            vs.append(
                _variant(
                    f"{mod}._cls_scores_kernel",
                    "cls_scores",
                    dtype,
                    arch,
                    dict(s0_ptr=acc_ptr, lse_ptr=acc_ptr, mask_ptr="*i1", cu_ptr=cu, out_ptr=acc_ptr),
                    dict(N=197, T=6304, H=12),
                    dict(HAS_MASK=not varlen, VARLEN=varlen, SINK=sink, BLOCK=256, BLOCK_H=16),
                    dict(num_warps=4, num_stages=3),
                    "layout" if n else "default",
                    False,
                )
            )
    if dtype == "fp32":
        for cu in ("*i64", "*i32"):
            vs.append(
                _variant(
                    f"{mod}._cu_seqlens_ok_kernel",
                    "cu_seqlens_ok",
                    dtype,
                    arch,
                    dict(cu_ptr=cu, ok_ptr="*i32"),
                    dict(B=64, T=6304, MAX_SEQLEN=197),
                    dict(BLOCK=256),
                    dict(num_warps=4, num_stages=3),
                    "default",
                    False,
                )
            )
    return vs + cls_row_variants(arch, dtype)


def cls_row_variants(arch: int, dtype: str) -> list[Variant]:
    """The SDPA path's first-query kernel (``attention._cls_row_kernel``)."""
    import triton.language as tl

    from lotus_kernels.triton import attention as att

    if dtype == "tf32":
        return []
    p, acc_ptr = _ptr(dtype), "*fp64" if dtype == "fp64" else "*fp32"
    vs = []
    for n, (has_mask, varlen, cu) in enumerate(
        ((False, False, "*i64"), (True, False, "*i64"), (False, True, "*i64"), (False, True, "*i32"))
    ):
        vs.append(
            _variant(
                "lotus_kernels.triton.attention._cls_row_kernel",
                "cls_row",
                dtype,
                arch,
                dict(q_ptr=p, k_ptr=p, mask_ptr="*i1", cu_ptr=cu, s0_ptr=acc_ptr, lse_ptr=acc_ptr),
                dict(N=197, T=6304, D=64, H=12),
                dict(
                    HAS_MASK=has_mask,
                    VARLEN=varlen,
                    BLOCK_N=128,
                    BLOCK_D=64,
                    ACC_DTYPE=tl.float64 if dtype == "fp64" else tl.float32,
                ),
                dict(num_warps=att.CLS_ROW_WARPS, num_stages=2),
                "layout" if n else "default",
                False,
                floats=("scale",),
            )
        )
    return vs


def gather_variants(arch: int, dtype: str) -> list[Variant]:
    """Token / patch gathers and scatters and the fused patch embedding at their GPU tiles."""
    from lotus_kernels.triton import _common

    tg, pe = "lotus_kernels.triton.token_gather", "lotus_kernels.triton.patch_embed_gather"
    p, vs = _ptr(dtype), []
    acc = _flags(dtype)["ACC_DTYPE"]
    if dtype != "tf32":  # no dot of the input dtype: fp32 and tf32 are one kernel
        block_r, block_c = 2048 // 256, 256
        vs.append(
            _variant(
                f"{tg}._gather_tokens_kernel",
                "gather_tokens",
                dtype,
                arch,
                dict(x_ptr=p, idx_ptr="*i64", out_ptr=p),
                dict(M=6272, K=98, N=197, C=768),
                dict(BLOCK_R=block_r, BLOCK_C=block_c),
                dict(num_warps=4, num_stages=3),
                "default",
                False,
            )
        )
        g, br, bk, bc = _scatter_gpu_blocks(_common)
        vs.append(
            _variant(
                f"{tg}._scatter_tokens_kernel",
                "scatter_tokens",
                dtype,
                arch,
                dict(src_ptr=p, idx_ptr="*i64", out_ptr=p),
                dict(B=64, K=98, N=197, C=768, G=g),
                dict(ACC_DTYPE=acc, BF16_BY_HAND=False, BLOCK_R=br, BLOCK_K=bk, BLOCK_C=bc),
                dict(num_warps=4, num_stages=1),
                "default",
                False,
            )
        )
        vs.append(
            _variant(
                f"{pe}._im2col_gather_kernel",
                "im2col_gather",
                dtype,
                arch,
                dict(img_ptr=p, idx_ptr="*i64", out_ptr=p),
                dict(M=6272, K=98, L=768, CHW=150528, HW=50176, W=224, GW=14),
                dict(PH=16, PW=16, BLOCK_R=block_r, BLOCK_L=block_c),
                dict(num_warps=4, num_stages=3),
                "default",
                False,
            )
        )
        vs.append(
            _variant(
                f"{pe}._col2im_scatter_kernel",
                "col2im_scatter",
                dtype,
                arch,
                dict(cols_ptr=p, idx_ptr="*i64", out_ptr=p),
                dict(B=64, K=98, L=768, NP=196, CHW=150528, HW=50176, W=224, GW=14, G=g),
                dict(PH=16, PW=16, ACC_DTYPE=acc, BF16_BY_HAND=False, BLOCK_R=br, BLOCK_K=bk, BLOCK_L=bc),
                dict(num_warps=4, num_stages=1),
                "default",
                False,
            )
        )
    from lotus_kernels.triton import patch_embed_gather as pe_mod

    vs.append(
        _variant(
            f"{pe}._patch_embed_gather_kernel",
            "patch_embed_gather",
            dtype,
            arch,
            dict(img_ptr=p, idx_ptr="*i64", w_ptr=p, bias_ptr=p, pos_ptr=p, out_ptr=p),
            dict(M=6272, K=98, D=768, L=768, CHW=150528, HW=50176, W=224, GW=14),
            dict(PH=16, PW=16, HAS_BIAS=True, HAS_POS=True, **_flags(dtype)),
            dict(pe_mod.GPU_TILES),
            "default",
            dtype in HOT_DTYPES,
        )
    )
    return vs


def _scatter_gpu_blocks(common) -> tuple[int, int, int, int]:
    """The scatter kernels' GPU blocks (``_common._scatter_blocks`` off the interpreter)."""
    import unittest.mock

    with unittest.mock.patch.object(common, "_interpreted", lambda: False):
        return common._scatter_blocks(64, 197, 98, 768)


def all_variants(archs=ARCHS, only: str = "", lean: bool = False, full_sm80: bool = False) -> list[Variant]:
    """Every variant for sm_90; for sm_80 the lean subset unless ``full_sm80`` (Ampere is the older target:
    its compile checks are the test's); ``lean``: the lean subset for both."""
    vs = []
    for arch in archs:
        for dtype in DTYPES:
            vs += block_sparse_variants(arch, dtype) + attention_variants(arch, dtype) + gather_variants(arch, dtype)
    keep = (lambda v: is_lean(v)) if lean else (lambda v: v.arch == 90 or full_sm80 or is_lean(v))
    return [v for v in vs if only in v.kernel and keep(v)]


def is_lean(v: Variant) -> bool:
    """The subset ``--lean`` compiles (tests/test_compiled_code.py; about a seventh of all): at the ViT
    shapes (bs = 32, head dim 64) every config and layout flag of every tensor-core kernel in bf16 on
    sm_90 and every config on sm_80; every other dtype's default config on both; on sm_90 the other block
    sizes / head dims at the bf16 default; the kernels without a dot product at their default in bf16."""
    vit = v.consts.get("BS", 32) == 32 and v.consts.get("BLOCK_D", 64) == 64
    dot = v.kernel.rsplit(".", 1)[1] in _DOT_KERNELS
    if not dot:
        return (
            v.dtype == "bf16"
            and v.origin == "default"
            or v.kernel.endswith("_scores_kernel")
            and v.dtype == "fp32"
            and v.origin == "default"
        )
    if v.dtype == "bf16":
        return vit and (v.arch == 90 or v.origin != "layout") or v.arch == 90 and v.origin == "default"
    return vit and v.origin == "default"


_DOT_KERNELS = {
    "_bsr_product_kernel",
    "_bsr_bwd_weight_kernel",
    "_attention_fwd_kernel",
    "_attention_bwd_dkdv_kernel",
    "_attention_bwd_dq_kernel",
    "_patch_embed_gather_kernel",
}


# ---------------------------------------------------------------- compiling one variant
def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def resources(cubin: bytes) -> dict:
    """Registers, stack (spill) bytes and static shared memory from ``cuobjdump -res-usage``, and the
    spill store / load instructions (STL / LDL) in the SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    regs, stack, shared, local = (int(x) for x in m.groups()) if m else (-1, -1, -1, -1)
    return dict(
        regs=regs,
        stack_bytes=stack,
        smem_static=shared,
        local_bytes=local,
        spill_stores=len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
        spill_loads=len(re.findall(r"\bLDL(\.\w+)*\b", sass)),
        sass_mma="HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else ("DMMA" if "DMMA" in sass else "none")),
    )


def occupancy(regs: int, smem: int, warps: int) -> dict:
    """Blocks per SM and the fraction of the SM's 64 warp slots they fill on an H200."""
    h = H200
    per_warp = -(-max(regs, 1) * 32 // h["reg_unit"]) * h["reg_unit"]
    by_regs = h["regs"] // (per_warp * warps)
    by_smem = h["smem"] // (smem + h["reserved"]) if smem > 0 else h["blocks"]
    by_threads = h["threads"] // (32 * warps)
    blocks = max(0, min(h["blocks"], by_regs, by_smem, by_threads))
    limit = min((by_regs, "registers"), (by_smem, "shared memory"), (by_threads, "threads"), (h["blocks"], "blocks"))[1]
    return dict(blocks_per_sm=blocks, occupancy=round(blocks * warps / 64, 3), occupancy_limit=limit)


def compile_variant(v: Variant) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    fn = _function(v.kernel)
    row = dict(
        kernel=v.kernel.rsplit(".", 1)[1],
        name=v.name,
        dtype=v.dtype,
        arch=f"sm_{v.arch}",
        config=v.label(),
        num_warps=v.num_warps,
        num_stages=v.num_stages,
        origin=v.origin,
        hot=v.hot,
    )
    try:
        src = ASTSource(fn=fn, signature=v.signature, constexprs=v.consts, attrs=v.attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", v.arch, 32), options={"num_warps": v.num_warps, "num_stages": v.num_stages}
        )
    except Exception as e:  # noqa: BLE001  (recorded: the check reports it)
        return {
            **row,
            "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
            "seconds": round(time.time() - t0, 2),
        }
    res = resources(compiled.asm["cubin"])
    smem_dyn = int(compiled.metadata.shared)
    row.update(
        error=None,
        mma=_mma(compiled.asm["ptx"]),
        **res,
        smem_dynamic=smem_dyn,
        smem_total=smem_dyn + max(0, res["smem_static"]),
        seconds=round(time.time() - t0, 2),
    )
    row.update(occupancy(res["regs"], row["smem_total"], v.num_warps))
    return row


def _cache_dir() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(base) / "lotus_compiled"


_VARIANTS: list[Variant] = []


def _compile_index(i: int) -> dict:
    return compile_variant(_VARIANTS[i])


def compile_all(variants: list[Variant], jobs: int, log=print) -> list[dict]:
    """Rows in the order of ``variants``: cached rows as they are, the others compiled in ``jobs``
    processes (forked: the parent has imported Triton and the kernels, no CUDA context exists)."""
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    keys = [v.key() for v in variants]
    rows: list[dict | None] = []
    for k in keys:
        path = cache / f"{k}.json"
        rows.append(json.loads(path.read_text()) if path.exists() else None)
    todo = [i for i, r in enumerate(rows) if r is None]
    log(
        f"compiled_code: {len(variants)} variants, {len(variants) - len(todo)} cached, {len(todo)} to compile "
        f"in {jobs} process(es)"
    )
    global _VARIANTS
    _VARIANTS = variants
    t0 = time.time()
    if jobs > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            done = pool.map(_compile_index, todo, chunksize=1)
            for n, (i, row) in enumerate(zip(todo, done), 1):
                rows[i] = row
                _store(cache / f"{keys[i]}.json", row)
                if n % 50 == 0:
                    log(f"compiled_code: {n} / {len(todo)} in {time.time() - t0:.0f} s")
    else:
        for n, i in enumerate(todo, 1):
            rows[i] = compile_variant(variants[i])
            _store(cache / f"{keys[i]}.json", rows[i])
            if n % 50 == 0:
                log(f"compiled_code: {n} / {len(todo)} in {time.time() - t0:.0f} s")
    return rows  # type: ignore[return-value]


def _store(path: Path, row: dict) -> None:
    if row.get("error") is None:  # failures are recompiled (and reported) every time
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(path)


# ---------------------------------------------------------------- checks
def problems(rows: list[dict]) -> list[str]:
    """What makes the check fail (see the module docstring)."""
    out = []
    for r in rows:
        what = f"{r['arch']} {r['kernel']} [{r['dtype']}] {r['config']} warps={r['num_warps']} stages={r['num_stages']}"
        if r.get("error"):
            out.append(f"does not compile: {what}: {r['error']}")
            continue
        if r["origin"] != "autotune" and r["smem_total"] > H200["smem_block"]:
            out.append(f"needs {r['smem_total']} B of shared memory (> {H200['smem_block']}): {what}")
        if r["arch"] == "sm_90" and r["hot"]:
            if r["mma"] != "wgmma":
                out.append(f"hot path without wgmma (uses {r['mma']}): {what}")
            if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"]:
                out.append(
                    f"hot path spills ({r['stack_bytes']} B stack, {r['spill_stores']} STL, "
                    f"{r['spill_loads']} LDL): {what}"
                )
    return out


def too_big(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error") and r["smem_total"] > H200["smem_block"]]


# ---------------------------------------------------------------- CUDA C++
# threads per block by kernel name (kBsrThreads, kScatterThreads); else kThreads = 256 (launch_utils.cuh)
_CUDA_THREADS = {
    "block_row_product": 256,
    "bsr_weight_grad": 256,
    "sum_partials": 256,
    "ordered_scatter": 128,
    "col2im_scatter": 128,
    "scatter": 128,
}


def cuda_rows(arch: int = 90, log=print) -> list[dict]:
    """Every kernel of csrc/cuda/*.cu compiled by nvcc for ``arch`` (device code only: -cubin)."""
    from torch.utils.cpp_extension import include_paths

    nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else "nvcc"
    rows = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cmd = [
                nvcc,
                "-cubin",
                f"-arch=sm_{arch}",
                "-O3",
                "-std=c++17",
                "--resource-usage",
                *(f"-I{p}" for p in include_paths()),
                str(cu),
                "-o",
                str(cubin),
            ]
            t0 = time.time()
            done = subprocess.run(cmd, capture_output=True, text=True)
            log(f"compiled_code: nvcc {cu.name} for sm_{arch}: exit {done.returncode} in {time.time() - t0:.0f} s")
            if done.returncode != 0:
                rows.append(dict(file=cu.name, kernel="(all)", error=done.stderr[-500:]))
                continue
            # Triton's bundled cuobjdump reads nvcc's cubins (the toolkit here ships nvcc without it)
            sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
            names = subprocess.run(
                ["c++filt"],
                input="\n".join(re.findall(r"Compiling entry function '(\w+)'", done.stdout + done.stderr)),
                capture_output=True,
                text=True,
            ).stdout
        rows += _parse_ptxas(cu.name, done.stdout + done.stderr, sass, names.splitlines())
    return rows


def _short_name(demangled: str) -> str:
    """'void (anonymous namespace)::k<c10::Half, 64, false>(args)' -> 'k<fp16, 64, false>'."""
    name = re.sub(r"^void\s+", "", demangled.replace("(anonymous namespace)::", "")).split("(")[0]
    for long, short in (("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("double", "fp64"), ("float", "fp32")):
        name = name.replace(long, short)
    return name.strip()


def _parse_ptxas(file: str, log: str, sass: str, demangled: list[str]) -> list[dict]:
    rows = []
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]
    funcs = dict(zip(re.findall(r"Function : (\w+)", sass), re.split(r"\n\s*Function : \w+", sass)[1:]))
    for block, pretty in zip(blocks, demangled + [""] * len(blocks)):
        mangled = re.match(r"'(\w+)'", block).group(1)
        stack, st, ld = (
            int(x)
            for x in re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                r"spill loads",
                block,
            ).groups()
        )
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        smem = re.search(r"(\d+) bytes smem", block)
        body = funcs.get(mangled, "")
        mma = (
            "HGMMA (wgmma)"
            if "HGMMA" in body
            else ("HMMA (mma.sync)" if "HMMA" in body else ("DMMA" if "DMMA" in body else "none"))
        )
        short = _short_name(pretty) if pretty else mangled
        threads = next((t for k, t in _CUDA_THREADS.items() if k in short), 256)
        smem_b = int(smem.group(1)) if smem else 0
        rows.append(
            dict(
                file=file,
                kernel=short,
                regs=regs,
                stack_bytes=stack,
                spill_stores=st,
                spill_loads=ld,
                smem_static=smem_b,
                threads=threads,
                mma=mma,
                **occupancy(regs, smem_b, threads // 32),
            )
        )
    return rows


# ---------------------------------------------------------------- report
def summary(rows: list[dict]) -> dict:
    import triton

    ok = [r for r in rows if not r.get("error")]
    return dict(
        triton=triton.__version__,
        variants=len(rows),
        failed=len(rows) - len(ok),
        too_big_autotune=len([r for r in too_big(rows) if r["origin"] == "autotune"]),
        hot_sm90=len([r for r in ok if r["hot"] and r["arch"] == "sm_90"]),
        hot_sm90_wgmma=len([r for r in ok if r["hot"] and r["arch"] == "sm_90" and r["mma"] == "wgmma"]),
        spilling=len([r for r in ok if r["stack_bytes"] or r["spill_stores"]]),
    )


def markdown(rows: list[dict], cuda: list[dict], info: dict) -> str:
    s = info["summary"]
    lines = [
        "# Compiled code of the GPU kernels (sm_90 = H100 / H200; sm_80 = A100), no GPU needed",
        "",
        f"Generated by `python tools/compiled_code.py{' --cuda' if cuda else ''}` ({info['date']}, commit "
        f"{info['commit']}): Triton {s['triton']}, Python {info['python']}; nvcc {info.get('nvcc', '-')}. "
        "Checked by `tests/test_compiled_code.py` (every variant compiles; the bf16 / fp16 tensor-core kernels "
        "use wgmma on sm_90 and spill nothing; what a launcher picks without autotuning fits shared memory).",
        "",
        f"{s['variants']} Triton variants ({s['failed']} failed to compile); on sm_90 {s['hot_sm90_wgmma']} of "
        f"{s['hot_sm90']} bf16 / fp16 hot-path variants use wgmma; {s['spilling']} variants spill; "
        f"{s['too_big_autotune']} autotune configs need more shared memory than a block has (the autotuner "
        "skips them).",
        "",
        "Columns: mma = tensor-core instruction in the PTX (wgmma.mma_async / mma.sync / none); regs = registers "
        "per thread; spill = stack bytes / STL / LDL instructions; smem = static + dynamic shared memory per "
        "block (bytes); occ = blocks per SM and the fraction of an H200 SM's 64 warp slots they fill (limited by "
        "reg(isters), smem or threads). origin: default (the launcher's GPU default), autotune (in the "
        "autotune list), table (committed table), layout (a layout flag at the default config).",
        "",
        "## Summary by kernel and dtype, sm_90",
        "",
        "| kernel | dtype | variants | mma | regs | spilling variants | smem per block (B) | occupancy |",
        "|---|---|---|---|---|---|---|---|",
        *by_kernel(rows, "sm_90"),
        "",
        "## Triton, sm_90",
        "",
        "| kernel | dtype | config | warps | stages | origin | mma | regs | spill | smem | occ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["arch"] != "sm_90":
            continue
        if r.get("error"):
            lines.append(
                f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | "
                f"{r['origin']} | **error** | | | | {r['error'][:80]} |"
            )
            continue
        spill = (
            "0"
            if not (r["stack_bytes"] or r["spill_stores"] or r["spill_loads"])
            else f"**{r['stack_bytes']} B / {r['spill_stores']} / {r['spill_loads']}**"
        )
        mma = r["mma"] if not (r["hot"] and r["mma"] != "wgmma") else f"**{r['mma']}**"
        lim = {"registers": "reg", "shared memory": "smem", "threads": "thr", "blocks": "blk"}[r["occupancy_limit"]]
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['origin']} | {mma} | {r['regs']} | {spill} | {r['smem_static']} + {r['smem_dynamic']} | "
            f"{r['blocks_per_sm']} x, {r['occupancy']:.2f} ({lim}) |"
        )
    sm80 = [r for r in rows if r["arch"] == "sm_80"]
    lines += [
        "",
        "## Triton, sm_80 (summary)",
        "",
        f"{len(sm80)} variants, {len([r for r in sm80 if r.get('error')])} failed; tensor-core variants by "
        f"instruction: "
        + ", ".join(f"{m}: {len([r for r in sm80 if r.get('mma') == m])}" for m in ("mma.sync", "wgmma", "none"))
        + f"; {len([r for r in sm80 if not r.get('error') and (r['stack_bytes'] or r['spill_stores'])])} spill "
        "(full rows in the JSON).",
    ]
    if cuda:
        lines += [
            "",
            "## CUDA C++ (csrc/cuda/*.cu), sm_90",
            "",
            "| file | kernel | threads | mma (SASS) | regs | spill (stack B / stores B / loads B) | static smem "
            "| occ |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in cuda:
            if r.get("error"):
                lines.append(f"| {r['file']} | {r['kernel']} | | **error** | | | | |")
                continue
            lines.append(
                f"| {r['file']} | `{r['kernel']}` | {r['threads']} | {r['mma']} | {r['regs']} | "
                f"{r['stack_bytes']} / {r['spill_stores']} / {r['spill_loads']} | {r['smem_static']} | "
                f"{r['blocks_per_sm']} x, {r['occupancy']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def by_kernel(rows: list[dict], arch: str) -> list[str]:
    """Markdown rows: per (kernel, dtype), the range of what its variants compiled to."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["arch"] == arch and not r.get("error"):
            groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    out = []

    def span(xs, f="{}"):
        return f.format(min(xs)) if min(xs) == max(xs) else f"{f.format(min(xs))}-{f.format(max(xs))}"

    for (kernel, dtype), rs in groups.items():
        mmas = "/".join(sorted({r["mma"] for r in rs}))
        spilling = [r for r in rs if r["stack_bytes"] or r["spill_stores"]]
        spill = "0" if not spilling else f"{len(spilling)} (max {max(r['stack_bytes'] for r in spilling)} B)"
        out.append(
            f"| {kernel} | {dtype} | {len(rs)} | {mmas} | {span([r['regs'] for r in rs])} | {spill} | "
            f"{span([r['smem_total'] for r in rs])} | {span([r['occupancy'] for r in rs], '{:.2f}')} |"
        )
    return out


def _info(rows) -> dict:
    import datetime
    import platform

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    info = dict(
        date=datetime.date.today().isoformat(),
        commit=commit.strip() or "unknown",
        python=platform.python_version(),
        summary=summary(rows),
    )
    try:
        out = subprocess.run(["/usr/local/cuda/bin/nvcc", "--version"], capture_output=True, text=True).stdout
        info["nvcc"] = re.findall(r"release ([\d.]+)", out)[-1]
    except Exception:  # noqa: BLE001
        pass
    return info


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, whatever the caller's setting
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compile and check only; write no table")
    p.add_argument("--cuda", action="store_true", help="also the CUDA C++ kernels (nvcc)")
    p.add_argument("--arch", type=int, nargs="*", default=list(ARCHS))
    p.add_argument("--only", default="", help="only kernels whose module.function contains this")
    p.add_argument("--lean", action="store_true", help="the test's subset (see is_lean)")
    p.add_argument("--full-sm80", action="store_true", help="every sm_80 variant too (default: its lean subset)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    t0 = time.time()
    rows = compile_all(all_variants(tuple(args.arch), args.only, args.lean, args.full_sm80), args.jobs)
    bad = problems(rows)
    for line in bad:
        print(f"compiled_code: FAIL {line}")
    for r in too_big(rows):
        if r["origin"] == "autotune":
            print(
                f"compiled_code: note: autotune config too big for shared memory ({r['smem_total']} B), skipped by "
                f"the tuner: {r['arch']} {r['kernel']} [{r['dtype']}] {r['config']} warps={r['num_warps']} "
                f"stages={r['num_stages']}"
            )
    s = summary(rows)
    print(f"compiled_code: {s} in {time.time() - t0:.0f} s: {'FAILED' if bad else 'ok'}")
    if not args.check:
        cuda = cuda_rows() if args.cuda else []
        info = _info(rows)
        args.out.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r.pop("seconds", None)
        table = json.dumps(dict(info=info, triton=rows, cuda=cuda), indent=1)
        (args.out / "compiled_sm90.json").write_text(table + "\n")
        (args.out / "compiled_sm90.md").write_text(markdown(rows, cuda, info))
        print(f"compiled_code: wrote {args.out / 'compiled_sm90.md'} and .json")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
