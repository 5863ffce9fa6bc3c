import pytest
import timm
import torch

import lotus_kernels
from lotus_kernels import patch_vit
from lotus_kernels.ops.attention import apply_sink
from lotus_kernels.vit_scores import attention_forward_with_scores

from .conftest import BACKENDS

IMPLS = [("reference", "cpu"), *[(b, d) for b, d in BACKENDS if b not in ("triton", "cuda")]]


def tiny_vit(**kw):
    cfg = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def hooked_scores(model, images, blocks="last"):
    """What users do today: the unfused attention path and a hook on the softmax output (of the
    last block, or of every block averaged over blocks)."""
    attns = [model.blocks[-1].attn] if blocks == "last" else [b.attn for b in model.blocks]
    probs, hooks = [], []
    for attn in attns:
        attn.fused_attn = False
        hooks.append(attn.attn_drop.register_forward_hook(lambda m, inp, out: probs.append(out)))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for attn, hook in zip(attns, hooks):
            hook.remove()
            attn.fused_attn = True
    cls = torch.stack([pr[:, :, 0, :].mean(1) for pr in probs]).mean(0)
    return apply_sink(cls)[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("backend,device", IMPLS, ids=[f"{b}-{d}" for b, d in IMPLS])
@pytest.mark.parametrize("kw", [{}, dict(reg_tokens=2), dict(qk_norm=True)], ids=["plain", "reg2", "qknorm"])
def test_patch_scores_match_hooked_softmax(backend, device, kw):
    model = patch_vit(tiny_vit(**kw).to(device))
    images = torch.randn(2, 3, 32, 32, device=device)
    with lotus_kernels.use_backend(backend):
        got = model.patch_scores(images)
    want = hooked_scores(model, images)
    assert got.shape == (2, 64) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", IMPLS, ids=[f"{b}-{d}" for b, d in IMPLS])
@pytest.mark.parametrize(
    "kw", [dict(depth=3), dict(depth=3, reg_tokens=2, qk_norm=True, init_values=0.1)], ids=["plain", "reg2-qknorm-ls"]
)
def test_mean_of_blocks_matches_every_hooked_softmax(backend, device, kw):
    model = patch_vit(tiny_vit(**kw).to(device))
    images = torch.randn(3, 3, 32, 32, device=device)
    with lotus_kernels.use_backend(backend):
        got = model.patch_scores(images, None, blocks="mean")
        last = model.patch_scores(images, None)
    torch.testing.assert_close(got, hooked_scores(model, images, "mean"), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, last)  # the earlier blocks count


def test_blocks_rule_is_checked():
    model = patch_vit(tiny_vit())
    with pytest.raises(ValueError, match="blocks: expected one of 'last', 'mean', got 'first'"):
        model.patch_scores(torch.randn(1, 3, 32, 32), blocks="first")
    model.blocks[0] = torch.nn.Identity()
    model.patch_scores(torch.randn(1, 3, 32, 32))  # only the last block is read
    with pytest.raises(ValueError, match=r"model.blocks\[0\]: expected a timm Block"):
        model.patch_scores(torch.randn(1, 3, 32, 32), blocks="mean")


def test_attention_replica_matches_timm_block_output():
    model = tiny_vit(qk_norm=True)
    attn = model.blocks[-1].attn
    x = torch.randn(2, 65, 48)
    with torch.no_grad():
        out, _ = attention_forward_with_scores(attn, x)
        torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-5)


def test_patch_scores_need_a_class_token():
    model = patch_vit(tiny_vit(class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="model: patch scores are class-token attention"):
        model.patch_scores(torch.randn(1, 3, 32, 32))
