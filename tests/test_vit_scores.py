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


def hooked_scores(model, images):
    """What users do today: the unfused attention path and a hook on the softmax output."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    probs = []
    hook = attn.attn_drop.register_forward_hook(lambda m, inp, out: probs.append(out))
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
        attn.fused_attn = True
    return apply_sink(probs[0][:, :, 0, :].mean(1))[:, model.num_prefix_tokens :]


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
