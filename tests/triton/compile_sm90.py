"""Compile every Triton kernel of the package for a GPU target without a GPU (Triton ships ptxas):
catches what the interpreter cannot, e.g. dot shapes / dtypes the GPU lowering rejects (it found the
fp64 MMA assertion that made attention compute fp64 products by hand) and tiles needing more shared
memory than a block may have. Not collected by pytest (a
full run takes minutes on 2 cores):

    PYTHONPATH=. python tests/triton/compile_sm90.py            # default configs, every dtype
    PYTHONPATH=. python tests/triton/compile_sm90.py --autotune # also every autotune config (slow)
    PYTHONPATH=. python tests/triton/compile_sm90.py --only attention   # one module's kernels
"""
from __future__ import annotations

import argparse
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lotus_kernels.triton import attention as att
from lotus_kernels.triton import block_sparse_linear as bsl
from lotus_kernels.triton import patch_embed_gather as pe
from lotus_kernels.triton import token_gather as tg

PTR = {"fp64": "*fp64", "fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
ACC = {"fp64": tl.float64, "fp32": tl.float32, "bf16": tl.float32, "fp16": tl.float32}
I = "i32"


SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90 (227 KiB)


def compile_one(kernel, sig, consts, warps, stages, target) -> str | None:
    src = ASTSource(fn=kernel, signature={**sig, **{c: "constexpr" for c in consts}},
                    constexprs={(kernel.arg_names.index(c),): v for c, v in consts.items()})
    try:
        compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:300]}"
    shared = compiled.metadata.shared
    if shared > SMEM_LIMIT:  # a launch would raise OutOfResources (the autotuner skips such configs)
        return f"too big: needs {shared} bytes of shared memory (> {SMEM_LIMIT})"
    return None


def cases(autotune: bool):
    for dt in ("fp64", "fp32", "bf16", "fp16"):
        acc, lse = ACC[dt], "*fp64" if dt == "fp64" else "*fp32"
        flags = dict(ACC_DTYPE=acc, INPUT_PRECISION="ieee", DOT_IN_ACC_DTYPE=False, BF16_BY_HAND=False)
        prod = [(c.kwargs, c.num_warps, c.num_stages) for c in bsl._PRODUCT_CONFIGS] if autotune and dt != "fp64" \
            else [({"BLOCK_M": 64, "GROUP_M": 8, "KB": 1}, 4, 3), ({"BLOCK_M": 128, "GROUP_M": 8, "KB": 2}, 8, 3)]
        wgrad = [(c.kwargs, c.num_warps, c.num_stages) for c in bsl._WGRAD_CONFIGS] if autotune and dt != "fp64" \
            else [({"BLOCK_M": 64}, 4, 3)]
        for bs in (16, 32, 64):
            for meta, w, s in prod:
                for trans in (True, False):
                    sig = dict(a_ptr=PTR[dt], v_ptr=PTR[dt], ptr_ptr="*i64", idx_ptr="*i64", perm_ptr="*i64",
                               bias_ptr=PTR[dt], out_ptr=PTR[dt], M=I, A_COLS=I, OUT_COLS=I, SLOTS=I, M_KEY=I)
                    yield (bsl._bsr_product_kernel, sig, dict(BS=bs, TRANS_W=trans, HAS_PERM=not trans, HAS_BIAS=trans,
                                                             **flags, **meta), w, s)
            for meta, w, s in wgrad:
                for partial in (False, True):
                    sig = dict(dy_ptr=PTR[dt], x_ptr=PTR[dt], crow_ptr="*i64", col_ptr="*i64",
                               dst_ptr=(lse if partial else PTR[dt]), M=I, IN=I, OUT=I, R=I, NNZB=I, ROWS_PER_SPLIT=I,
                               M_KEY=I)
                    yield (bsl._bsr_bwd_weight_kernel, sig, dict(BS=bs, SEARCH_STEPS=6, PARTIAL=partial, **flags, **meta),
                           w, s)
        yield (bsl._sum_partials_kernel, dict(part_ptr=lse, out_ptr=PTR[dt], S=I, NUMEL=I),
               dict(BF16_BY_HAND=False, BLOCK=1024), 4, 3)
        by_hand = dt == "fp64"
        tiles = [({"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_N"]}, c.num_warps, c.num_stages)
                 for c in att._CONFIGS] if autotune and not by_hand else \
            [({"BLOCK_M": 16 if by_hand else 64, "BLOCK_N": 16 if by_hand else 64}, 4, 2)]
        for D in (64, 128):
            for meta, w, s in tiles:
                for varlen in (False, True):
                    common = dict(HAS_MASK=not varlen, VARLEN=varlen, ACC_DTYPE=acc, IEEE=dt in ("fp32", "fp64"),
                                  UPCAST=False, BY_HAND=by_hand, BLOCK_D=D, **meta)
                    qkv = dict(q_ptr=PTR[dt], k_ptr=PTR[dt], v_ptr=PTR[dt])
                    tail = dict(N=I, T=I, D=I, scale="fp32", H=I, N_KEY=I)
                    bwd = dict(**qkv, do_ptr=PTR[dt], o_ptr=PTR[dt], lse_ptr=lse, mask_ptr="*i1", cu_ptr="*i64")
                    for cu in ("*i64", "*i32") if varlen else ("*i64",):  # packed offsets are read as given
                        for cls in (False, True):
                            yield (att._attention_fwd_kernel, dict(**qkv, mask_ptr="*i1", cu_ptr=cu, out_ptr=PTR[dt],
                                                                   lse_ptr=lse, s0_ptr=lse, **tail),
                                   {**common, "CLS": cls}, w, s)
                        bwd = {**bwd, "cu_ptr": cu}
                        yield (att._attention_bwd_dkdv_kernel, dict(**bwd, dk_ptr=PTR[dt], dv_ptr=PTR[dt], **tail), common,
                               w, s)
                        yield (att._attention_bwd_dq_kernel, dict(**bwd, dq_ptr=PTR[dt], **tail), common, w, s)
        if dt != "bf16" and dt != "fp16":  # the score kernel reads lse-typed buffers only
            for varlen, cu in ((False, "*i64"), (True, "*i64"), (True, "*i32")):
                for sink in (False, True):
                    yield (att._cls_scores_kernel, dict(s0_ptr=lse, lse_ptr=lse, mask_ptr="*i1", cu_ptr=cu, out_ptr=lse,
                                                        N=I, T=I, H=I),
                           dict(HAS_MASK=not varlen, VARLEN=varlen, SINK=sink, BLOCK=256), 4, 3)
        if dt == "fp32":
            for cu in ("*i64", "*i32"):
                yield (att._cu_seqlens_ok_kernel, dict(cu_ptr=cu, ok_ptr="*i32", B=I, T=I, MAX_SEQLEN=I),
                       dict(BLOCK=256), 4, 3)
        yield (tg._scatter_tokens_kernel, dict(src_ptr=PTR[dt], idx_ptr="*i64", out_ptr=PTR[dt], B=I, K=I, N=I, C=I, G=I),
               dict(ACC_DTYPE=acc, BF16_BY_HAND=False, BLOCK_R=16, BLOCK_K=32, BLOCK_C=128), 4, 1)
        yield (pe._col2im_scatter_kernel, dict(cols_ptr=PTR[dt], idx_ptr="*i64", out_ptr=PTR[dt], B=I, K=I, L=I, NP=I,
                                               CHW=I, HW=I, W=I, GW=I, G=I),
               dict(PH=16, PW=16, ACC_DTYPE=acc, BF16_BY_HAND=False, BLOCK_R=16, BLOCK_K=32, BLOCK_L=128), 4, 1)
        yield (pe._patch_embed_gather_kernel, dict(img_ptr=PTR[dt], idx_ptr="*i64", w_ptr=PTR[dt], bias_ptr=PTR[dt],
                                                   pos_ptr=PTR[dt], out_ptr=PTR[dt], M=I, K=I, D=I, L=I, CHW=I, HW=I, W=I,
                                                   GW=I),
               dict(PH=16, PW=16, HAS_BIAS=True, HAS_POS=True, **flags, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4, 3)
        yield (tg._gather_tokens_kernel, dict(x_ptr=PTR[dt], idx_ptr="*i64", out_ptr=PTR[dt], M=I, K=I, N=I, C=I),
               dict(BLOCK_R=8, BLOCK_C=256), 4, 3)
        yield (pe._im2col_gather_kernel, dict(img_ptr=PTR[dt], idx_ptr="*i64", out_ptr=PTR[dt], M=I, K=I, L=I, CHW=I,
                                              HW=I, W=I, GW=I), dict(PH=16, PW=16, BLOCK_R=8, BLOCK_L=256), 4, 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--autotune", action="store_true", help="every autotune config too")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--only", default="", help="only kernels whose module.name contains this, e.g. attention")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    t0, n, failed, too_big = time.time(), 0, 0, 0
    for kernel, sig, consts, warps, stages in cases(args.autotune):
        if args.only not in f"{kernel.fn.__module__}.{kernel.fn.__name__}":
            continue
        n += 1
        err = compile_one(kernel, sig, consts, warps, stages, target)
        if err and err.startswith("too big") and args.autotune:
            too_big += 1  # an autotune config the tuner will skip (OutOfResources): fine if others fit
            continue
        if err:
            failed += 1
            print(f"FAIL {kernel.fn.__name__} {consts} warps={warps} stages={stages}: {err}", flush=True)
    print(f"{n} kernel variants compiled for sm_{args.arch}: {failed} failed, {too_big} autotune configs too big "
          f"for shared memory (skipped by the tuner) ({time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
