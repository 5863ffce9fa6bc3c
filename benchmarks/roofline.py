"""Roofline predictions for the rows of ``bench_gpu.py``, written before any GPU measured them.

Each benchmark row is modelled as the kernels it launches; each kernel takes max(bytes / HBM bandwidth,
FLOPs / peak for its math) and costs a fixed launch overhead on top:

    floor_ms     = sum over the row's kernels of max(bytes / BW, FLOPs / peak)   (the physical floor)
    predicted_ms = floor_ms + kernels * LAUNCH_US                                (what the first run should show)

Machine: an H200 (132 SMs, HBM3e): BW = 4.3 TB/s (copy bandwidth measured on the lent machine) and
790 TFLOP/s for a dense bf16 / fp16 GEMM (cuBLAS, measured); the other peaks scaled from the datasheet
by the same 790 / 989 = 0.8 (TF32 half of bf16; fp32 / fp64 without tensor cores ~54 TFLOP/s; 2:4
sparse twice bf16). ``measured / predicted`` is then the inverse of the fraction of the roofline a
row reached: the first GPU run tells which kernels sit far from it (docs/design/gpu_kernels.md).
"""

from __future__ import annotations

import dataclasses

BW = 4.3e12  # bytes / s
PEAK = {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 54e12, "fp64": 54e12, "sparse24": 1580e12}
LAUNCH_US = 3.0  # per kernel: launch gap + ramp-up / tail at these sizes
E = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp64": 8}  # bytes per element
_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}  # str(torch dtype)[6:]


@dataclasses.dataclass
class K:
    """One kernel: FLOPs, bytes moved to / from HBM, the peak its math runs at."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    peak: str = "bf16"

    def seconds(self) -> float:
        return max(self.bytes / BW, self.flops / PEAK[self.peak])


def summarise(kernels: list[K]) -> dict:
    floor = sum(k.seconds() for k in kernels)
    flops = sum(k.flops for k in kernels)
    nbytes = sum(k.bytes for k in kernels)
    mem = sum(k.bytes / BW for k in kernels if k.bytes / BW >= k.flops / PEAK[k.peak])
    return dict(
        floor_ms=1e3 * floor,
        predicted_ms=1e3 * floor + 1e-3 * LAUNCH_US * len(kernels),
        kernels=len(kernels),
        gflop=flops / 1e9,
        mbytes=nbytes / 1e6,
        bound="memory" if mem >= floor / 2 else "compute",
    )


# ---------------------------------------------------------------- linear layers
def linear(
    M: int, fin: int, fout: int, dtype="bf16", density=1.0, bias=True, backward=True, sparse_launches=0, prefix=""
) -> list[K]:
    """y = x W^T (+ b) and, with ``backward``, dx, dW (the stored fraction ``density`` of it) and db.
    Activations are read and written whole whatever the density; only W's traffic and the FLOPs shrink."""
    e = E[dtype]
    x, y, w = M * fin * e, M * fout * e, fin * fout * e * density
    f = 2.0 * M * fin * fout * density
    ks = [K(f"{prefix}fwd", f, x + w + y, dtype)]
    if backward:
        ks += [K(f"{prefix}dgrad", f, y + w + x, dtype), K(f"{prefix}wgrad", f, y + x + w, dtype)]
        if bias:
            ks.append(K(f"{prefix}db", M * fout, y, dtype))
    ks += [K(f"{prefix}partials", 0, 0) for _ in range(sparse_launches)]
    return ks


def weight_grad_splits(M: int, nnzb: int, bs: int, sms: int = 132) -> int:
    """As triton/block_sparse_linear.weight_grad_splits: S > 1 adds an fp32 partial pass (a launch)."""
    programs = -(-nnzb // max(1, 64 // bs))
    return max(1, min(-(-4 * sms // programs), -(-M // 256)))


def block_row(row: dict) -> list[K] | None:
    fin, fout = (int(s) for s in row["shape"].split("->"))
    M, d, bs = row["M"], row["density"], row.get("block", 32)
    dtype = _NAMES.get(row.get("dtype", "bf16"), row.get("dtype", "bf16"))
    fwd_only = row.get("pass") == "fwd"
    cfg = row["config"]
    if cfg.startswith("dense"):
        return linear(M, fin, fout, dtype, backward=not fwd_only)
    if cfg.startswith("lotus"):
        nnzb = round(d * (fin // bs) * (fout // bs))
        extra = 0 if fwd_only else int(weight_grad_splits(M, nnzb, bs) > 1)
        return linear(M, fin, fout, dtype, density=d, backward=not fwd_only, sparse_launches=extra)
    if cfg == "torch BSR":  # (W_bsr @ x^T)^T + b: the product, then the add reads y^T and writes y
        e = E[dtype]
        return linear(M, fin, fout, dtype, density=d, backward=False) + [K("add bias", M * fout, 2 * M * fout * e)]
    return None


# ---------------------------------------------------------------- attention
def attention_fwd(B, H, N, D, dtype="bf16") -> K:
    t = B * H * N * D * E[dtype]
    return K("attention fwd", 4.0 * B * H * N * N * D, 4 * t + B * H * N * 4, dtype)


def attention_bwd(B, H, N, D, dtype="bf16", fused=False) -> list[K]:
    """flash bwd (SDPA): one kernel recomputing P (10 BHN^2D FLOPs) + a dO.O pre-pass and a dq cast; ours: a
    dK/dV kernel and a dQ kernel (P and dP recomputed in each: 14 BHN^2D)."""
    t = B * H * N * D * E[dtype]
    if fused:
        return [
            K("attention bwd dkdv", 8.0 * B * H * N * N * D, 7 * t, dtype),
            K("attention bwd dq", 6.0 * B * H * N * N * D, 6 * t, dtype),
        ]
    return [
        K("attention bwd pre", B * H * N * D, 2 * t),
        K("attention bwd", 10.0 * B * H * N * N * D, 8 * t, dtype),
        K("attention bwd dq cast", 0, 3 * t),
    ]


def cls_row(B, H, N, D, dtype="bf16") -> K:
    """The first-query kernel of the "sdpa" path: reads all of K once (the GEMV of q_cls against it) and
    writes the raw scores (fp32) for the score kernel."""
    return K("cls-row scores", 2.0 * B * H * N * D, B * H * N * D * E[dtype] + B * H * N * 4, dtype)


def fused_cls(B, H, N) -> K:
    """The fused path's score kernel: reads the forward's first-query scores and lse, writes [B, N]."""
    return K("cls scores from s0", 2.0 * B * H * N, 2 * B * H * N * 4 + B * N * 4, "fp32")


def attention_row(row: dict) -> list[K] | None:
    B, H, N, D = (int(s) for s in row["shape"].split("x"))
    cfg, path = row["config"], row.get("path", "sdpa")
    fwd = attention_fwd(B, H, N, D)
    if cfg.startswith("SDPA"):
        return [fwd] + (attention_bwd(B, H, N, D) if "bwd" in cfg else [])
    if "cls" in cfg:
        use = "fused" if "fused" in cfg else ("sdpa" if "sdpa" in cfg else path)
        return [fwd] + ([cls_row(B, H, N, D)] if use == "sdpa" else []) + [fused_cls(B, H, N)]
    if cfg.startswith("lotus"):
        return [fwd] + (attention_bwd(B, H, N, D, fused=path == "fused") if "bwd" in cfg else [])
    return None


# ---------------------------------------------------------------- 2:4 MLP
def semi24_row(row: dict) -> list[K] | None:
    """fc1 -> GELU -> fc2, fwd + bwd + a weight touch (p.add_(0)). 2:4: the forward GEMMs (and dx with a
    transposable mask) at the sparse peak, dW dense then masked, each weight compressed per call."""
    M, dim, hidden = row["M"], row["dim"], row["hidden"]
    e = 2
    cfg = row["config"]
    if not (cfg == "dense" or cfg.startswith("2:4 ") and "mask" in cfg):
        return None
    sparse = cfg != "dense"
    transposable = "transposable" in cfg
    ks = []
    for name, fi, fo in (("fc1", dim, hidden), ("fc2", hidden, dim)):
        f = 2.0 * M * fi * fo
        x, y, w = M * fi * e, M * fo * e, fi * fo * e
        ks += [
            K(f"{name} fwd", f, x + y + (0.56 if sparse else 1) * w, "sparse24" if sparse else "bf16"),
            K(f"{name} dgrad", f, x + y + w, "sparse24" if sparse and transposable else "bf16"),
            K(f"{name} wgrad", f, x + y + w, "bf16"),
            K(f"{name} db", M * fo, y),
        ]
        if sparse:  # compression of W (and W^T), the dW mask, per call
            ks += [K(f"{name} compress", 0, 1.56 * w)] * (2 if transposable else 1) + [K(f"{name} mask dW", 0, 2.1 * w)]
    h = M * hidden * e
    ks += [K("gelu", 8.0 * M * hidden, 2 * h), K("gelu bwd", 8.0 * M * hidden, 3 * h)]
    params = (2 * dim * hidden + dim + hidden) * e
    ks += [K("weight touch", 0, 2 * params)]
    return ks


# ---------------------------------------------------------------- ViT-B/16 train step
def vit_step(batch: int, tokens_kept: int, patches_embedded: int, block_sparse: float = 1.0) -> list[K]:
    """ViT-B/16 (C = 768, 12 blocks, MLP 3072, 12 heads) fwd + bwd under bf16 autocast + fused AdamW on
    86.6M fp32 parameters. Per block: the four linears (fwd, dgrad, wgrad) on ``tokens_kept`` tokens per
    image (the MLP at density ``block_sparse``), attention (flash fwd + bwd), and the elementwise work
    around them, ~180 bytes x C per token per block (counted from the ops timm's block runs under bf16
    autocast, fp32 residual stream: forward LN 8C x 2, casts 6C x 2, head transpose 4C, residual adds 10C x 2,
    GELU 16C = 68C; backward ~110C incl. the bias gradients' reads of dy). The patch embedding on
    ``patches_embedded`` patches per image."""
    C, depth, hidden, heads = 768, 12, 3072, 12
    M = batch * tokens_kept
    ks = []
    for _ in range(depth):
        ks += linear(M, C, 3 * C, prefix="qkv ") + linear(M, C, C, prefix="proj ")
        ks += linear(M, C, hidden, density=block_sparse, prefix="fc1 ") + linear(
            M, hidden, C, density=block_sparse, prefix="fc2 "
        )
        ks += [attention_fwd(batch, heads, tokens_kept, C // heads)] + attention_bwd(
            batch, heads, tokens_kept, C // heads
        )
        ks += [K("elementwise", 0, 180 * C * M / 20) for _ in range(20)]  # ~20 kernels per block, fwd + bwd
    ks += linear(batch * patches_embedded, 768, C, bias=True, prefix="patch embed ")
    ks += [K("head + loss", 2.0 * batch * C * 1000 * 3, batch * C * 4 * 3)]
    params = 86.6e6
    ks += [K("autocast weight casts", 0, params * 6 * 2)]  # fp32 -> bf16 copies, fwd and bwd
    ks += [K("AdamW (fused)", 10 * params, params * 4 * 7) for _ in range(1)]  # p, g, m, v read; p, m, v written
    return ks


def vit_row(row: dict) -> list[K] | None:
    batch, n, kept = row.get("batch"), row.get("patches"), row.get("kept")
    if batch is None or row.get("median_ms") is None:
        return None
    cfg = row["config"]
    if cfg == "dense":
        return vit_step(batch, n + 1, n)
    if cfg.startswith("timm PatchDropout"):
        return vit_step(batch, kept + 1, n)  # embeds every patch, then drops
    if cfg.startswith("lotus keep"):
        return vit_step(batch, kept + 1, kept, block_sparse=0.5 if "block MLP" in cfg else 1.0)
    return None


MODELS = {"block": block_row, "attention": attention_row, "semi24": semi24_row, "vit_step": vit_row}


def predict(row: dict) -> dict | None:
    """{floor_ms, predicted_ms, kernels, gflop, mbytes, bound} of a bench_gpu row, or None (no model)."""
    model = MODELS.get(row.get("section"))
    try:
        ks = model(row) if model else None
    except (KeyError, ValueError, TypeError):
        return None
    return summarise(ks) if ks else None
