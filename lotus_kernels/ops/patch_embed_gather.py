"""``patch_embed_gather``: the ViT patch embedding computed for the kept patches only.

For images [B, Cin, H, W], a Conv2d patch projection ``weight`` [D, Cin, ph, pw] (stride = kernel),
and kept patch indices ``idx`` [B, K] into the row-major (H/ph) x (W/pw) grid:

    out[b, k] = im2col(images[b])[idx[b, k]] @ weight.view(D, -1).T + bias + pos_embed[idx[b, k]]

Dropped patches are never unfolded nor multiplied. The im2col of kept patches (``im2col_gather``)
and its adjoint (``col2im_scatter``) are ops of their own, used by the backward.
"""

from __future__ import annotations

import torch

from .. import _backend, _checks
from .token_gather import scatter_tokens


# ---------------------------------------------------------------- references (ground truth)
def im2col_gather_reference(images: torch.Tensor, idx: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    B, C, H, W = images.shape
    cols = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
    cols = cols.reshape(B, (H // ph) * (W // pw), C * ph * pw)
    return torch.gather(cols, 1, idx.unsqueeze(-1).expand(-1, -1, cols.shape[-1]))


def col2im_scatter_reference(
    cols: torch.Tensor, idx: torch.Tensor, ph: int, pw: int, height: int, width: int
) -> torch.Tensor:
    B, K, L = cols.shape
    C, gh, gw = L // (ph * pw), height // ph, width // pw
    grid = cols.new_zeros(B, gh * gw, L).scatter_add_(1, idx.unsqueeze(-1).expand_as(cols), cols)
    return grid.reshape(B, gh, gw, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, height, width)


def patch_embed_gather_reference(images, idx, weight, bias=None, pos_embed=None):
    """Embeds every patch with ``F.conv2d``, then keeps rows ``idx``: independent of the kernels'
    im2col path, so it checks that path too."""
    emb = torch.nn.functional.conv2d(images, weight, bias, stride=weight.shape[-2:])
    emb = emb.flatten(2).transpose(1, 2)
    if pos_embed is not None:
        emb = emb + pos_embed.reshape(1, -1, weight.shape[0])
    return torch.gather(emb, 1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))


# ---------------------------------------------------------------- checks
def _check_images(images, ph, pw, name="images"):
    _checks.tensor(name, images, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    H, W = images.shape[-2:]
    if H % ph or W % pw:
        raise ValueError(f"{name}: expected height and width divisible by the patch size ({ph}, {pw}), got ({H}, {W})")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got batch size 0")
    return (H // ph) * (W // pw)


def _check_patch_embed(images, idx, weight, bias, pos_embed):
    _checks.tensor("weight", weight, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    D, Cin, ph, pw = weight.shape
    n = _check_images(images, ph, pw)
    if images.shape[1] != Cin:
        raise ValueError(
            f"images: expected {Cin} channels to match weight [D, Cin, ph, pw] = {tuple(weight.shape)}, "
            f"got {images.shape[1]}"
        )
    _checks.index_tensor("idx", idx, batch=images.shape[0], batch_name="images")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        if bias.shape[0] != D:
            raise ValueError(f"bias: expected shape ({D},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        _checks.tensor("pos_embed", pos_embed)
        if pos_embed.numel() != n * D or pos_embed.shape[-1] != D or pos_embed.dim() not in (2, 3):
            raise ValueError(
                f"pos_embed: expected shape ({n}, {D}) or (1, {n}, {D}) (one row per patch, no "
                f"class-token row), got {tuple(pos_embed.shape)}"
            )
    _checks.same_device(images=images, idx=idx, weight=weight, bias=bias, pos_embed=pos_embed)
    _checks.same_dtype(images=images, weight=weight, bias=bias, pos_embed=pos_embed)
    return n


# ---------------------------------------------------------------- im2col_gather / col2im_scatter ops
@torch.library.custom_op("lotus_kernels::im2col_gather", mutates_args=())
def _im2col_gather(images: torch.Tensor, idx: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    B, C, H, W = images.shape
    _checks.index_range("idx", idx, (H // ph) * (W // pw))
    backend = _backend.select(images.device, "patch_embed_gather")
    if backend == "reference":
        return im2col_gather_reference(images, idx, ph, pw)
    out = _backend.new_output((B, idx.shape[1], C * ph * pw), images)
    _backend.launch(backend, "patch_embed_gather", "im2col_gather", images.contiguous(), idx.contiguous(), ph, pw, out)
    return out


@_im2col_gather.register_fake
def _(images, idx, ph, pw):
    return images.new_empty(images.shape[0], idx.shape[1], images.shape[1] * ph * pw)


@torch.library.custom_op("lotus_kernels::col2im_scatter", mutates_args=())
def _col2im_scatter(cols: torch.Tensor, idx: torch.Tensor, ph: int, pw: int, height: int, width: int) -> torch.Tensor:
    _checks.index_range("idx", idx, (height // ph) * (width // pw))
    backend = _backend.select(cols.device, "patch_embed_gather")
    if backend == "reference":
        return col2im_scatter_reference(cols, idx, ph, pw, height, width)
    out = _backend.new_output((cols.shape[0], cols.shape[2] // (ph * pw), height, width), cols)
    _backend.launch(backend, "patch_embed_gather", "col2im_scatter", cols.contiguous(), idx.contiguous(), ph, pw, out)
    return out


@_col2im_scatter.register_fake
def _(cols, idx, ph, pw, height, width):
    return cols.new_empty(cols.shape[0], cols.shape[2] // (ph * pw), height, width)


def _im2col_setup(ctx, inputs, output):
    images, idx, ph, pw = inputs
    ctx.save_for_backward(idx)
    ctx.geom = (ph, pw, images.shape[2], images.shape[3])


def _im2col_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _col2im_scatter(grad, idx, *ctx.geom), None, None, None


def _col2im_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.patch = inputs[2:4]


def _col2im_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return _im2col_gather(grad, idx, *ctx.patch), None, None, None, None, None


_im2col_gather.register_autograd(_im2col_backward, setup_context=_im2col_setup)
_col2im_scatter.register_autograd(_col2im_backward, setup_context=_col2im_setup)


# ---------------------------------------------------------------- positional-table gradient
@torch.library.custom_op("lotus_kernels::index_sum", mutates_args=())
def _index_sum(rows: torch.Tensor, idx: torch.Tensor, n: int, by_token: bool) -> torch.Tensor:
    """[n, D]: the sum of ``rows`` [M, D] per index ``idx`` [M]."""
    _checks.index_range("idx", idx, n)
    if by_token:
        # torch's sort-based index_put (CUDA: one thread block per (distinct index, channel slice),
        # rows summed in sorted order: deterministic). unsafe=True skips its own range check, a
        # min/max read back to the host (the public index_put_ and _unsafe_index_put both do it),
        # which the device-side check above replaces.
        out = rows.new_zeros(n, rows.shape[-1])
        return torch.ops.aten._index_put_impl_(out, [idx], rows, True, True)
    return scatter_tokens(rows[None], idx[None], n)[0]


@_index_sum.register_fake
def _(rows, idx, n, by_token):
    return rows.new_empty(n, rows.shape[-1])


def _index_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _index_sum_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return grad.index_select(0, idx), None, None, None


_index_sum.register_autograd(_index_sum_backward, setup_context=_index_sum_setup)


def table_grad(rows: torch.Tensor, idx: torch.Tensor, n: int, *, by_token: bool | None = None) -> torch.Tensor:
    """d table [n, D] of a table whose rows ``idx`` [M] were gathered: the sum of ``rows`` [M, D] per
    index (duplicates add; untouched rows are 0). One table is shared by the whole batch, so all
    B*K kept rows land in it.

    ``by_token`` (default: on GPUs): torch's sort-based index_put with accumulation, which on CUDA
    sums each token's rows in one thread block per (token, channel slice): parallel over tokens and
    channels, deterministic, fp32 accumulation. Otherwise (CPU) one ``scatter_tokens`` of all rows
    with B = 1, whose C++ kernel splits the channels across threads (on a GPU that would be
    ceil(D/128) programs each adding B*K rows in sequence). A registered op either way, so that
    ``torch.compile`` keeps it (inductor would lower an index_put to atomic adds)."""
    if by_token is None:
        by_token = rows.device.type != "cpu"
    return _index_sum(rows, idx, n, by_token)


# ---------------------------------------------------------------- the fused op
@torch.library.custom_op("lotus_kernels::patch_embed_gather", mutates_args=())
def _patch_embed_gather(
    images: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
) -> torch.Tensor:
    D, _, ph, pw = weight.shape
    _checks.index_range("idx", idx, (images.shape[2] // ph) * (images.shape[3] // pw))
    backend = _backend.select(images.device, "patch_embed_gather")
    if backend == "reference":
        return patch_embed_gather_reference(images, idx, weight, bias, pos_embed)
    bias = None if bias is None else bias.contiguous()
    pos = None if pos_embed is None else pos_embed.reshape(-1, D).contiguous()
    out = _backend.new_output((images.shape[0], idx.shape[1], D), images)
    _backend.launch(
        backend,
        "patch_embed_gather",
        "patch_embed_gather",
        images.contiguous(),
        idx.contiguous(),
        weight.contiguous(),
        bias,
        pos,
        out,
    )
    return out


@_patch_embed_gather.register_fake
def _(images, idx, weight, bias, pos_embed):
    return images.new_empty(images.shape[0], idx.shape[1], weight.shape[0])


def _pe_setup(ctx, inputs, output):
    images, idx, weight, bias, pos_embed = inputs
    ctx.save_for_backward(images, idx, weight)
    ctx.has_bias = bias is not None
    ctx.pos_shape = None if pos_embed is None else pos_embed.shape


def _pe_backward(ctx, grad):
    images, idx, weight = ctx.saved_tensors
    D, _, ph, pw = weight.shape
    B, K, _ = grad.shape
    g2 = grad.reshape(B * K, D)
    need_img, _, need_w, need_b, need_pos = ctx.needs_input_grad
    d_img = d_w = d_b = d_pos = None
    if need_w:
        cols = _im2col_gather(images, idx, ph, pw)
        d_w = (g2.t() @ cols.reshape(B * K, -1)).reshape(weight.shape)
    if need_b and ctx.has_bias:
        d_b = g2.sum(0)
    if need_pos and ctx.pos_shape is not None:
        n = (images.shape[2] // ph) * (images.shape[3] // pw)
        d_pos = table_grad(g2, idx.reshape(-1), n).reshape(ctx.pos_shape)
    if need_img:
        d_cols = (g2 @ weight.reshape(D, -1)).reshape(B, K, -1)
        d_img = _col2im_scatter(d_cols, idx, ph, pw, images.shape[2], images.shape[3])
    return d_img, None, d_w, d_b, d_pos


_patch_embed_gather.register_autograd(_pe_backward, setup_context=_pe_setup)


# ---------------------------------------------------------------- public API
def im2col_gather(images: torch.Tensor, idx: torch.Tensor, patch_size) -> torch.Tensor:
    """Unfold only the kept patches: [B, Cin, H, W] -> [B, K, Cin*ph*pw] (Conv2d weight order)."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    _check_images(images, ph, pw)
    _checks.index_tensor("idx", idx, batch=images.shape[0], batch_name="images")
    _checks.same_device(images=images, idx=idx)
    return _im2col_gather(images, idx, ph, pw)


def patch_embed_gather(
    images: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding of the kept patches only: [B, Cin, H, W] -> [B, K, D].

    ``weight`` [D, Cin, ph, pw] and ``bias`` [D] are a stride-(ph, pw) Conv2d's (timm's
    ``patch_embed.proj``); ``pos_embed`` [N, D] or [1, N, D] holds the patch rows of the positional
    table (no class-token row); ``idx`` [B, K] int64 indexes the row-major patch grid. Under
    ``torch.autocast`` the float inputs are cast to the autocast dtype first, as timm's ``F.conv2d``
    patch embedding and ``F.linear`` are."""
    images, weight, bias, pos_embed = _checks.autocast_inputs(images, weight, bias, pos_embed)
    _check_patch_embed(images, idx, weight, bias, pos_embed)
    return _patch_embed_gather(images, idx, weight, bias, pos_embed)
