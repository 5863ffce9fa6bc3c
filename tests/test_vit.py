import io

import pytest
import timm
import torch

import lotus_kernels
from lotus_kernels import patch_vit
from lotus_kernels.ops import gather_tokens

from .conftest import BACKEND_IDS, BACKENDS


def tiny_vit(**kw):
    """A CIFAR-shaped ViT (32x32, patch 4): 64 patches, fast enough for tests."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg).eval()


def explicit_gather_forward(model, images, idx):
    """The definition of the kept-patch path in plain timm pieces: embed all, add pos, gather."""
    x = model._pos_embed(model.patch_embed(images))
    p = model.num_prefix_tokens
    x = torch.cat([x[:, :p], gather_tokens(x[:, p:], idx)], dim=1)
    x = model.norm(model.blocks(model.norm_pre(x)))
    return model.forward_head(x)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"])
def test_unpatched_forward_is_unchanged_and_keep_all_matches_timm(name):
    model = timm.create_model(name, pretrained=False, num_classes=10, depth=1).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = model(images)
        patch_vit(model)
        assert torch.equal(model(images), want)
        everything = torch.arange(196).expand(2, -1)
        torch.testing.assert_close(model(images, keep_idx=everything), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            model(images, keep_ratio=1.0, scores=torch.randn(2, 196)), want, rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(class_token=False, global_pool="avg"),
        dict(reg_tokens=2),
        dict(no_embed_class=True),
        dict(no_embed_class=True, reg_tokens=1),
    ],
)
def test_kept_patches_match_explicit_gather_forward_and_backward(backend, device, kw):
    model = tiny_vit(**kw).to(device)
    ref_model = tiny_vit(**kw).to(device)
    ref_model.load_state_dict(model.state_dict())
    patch_vit(model)
    images = torch.randn(3, 3, 32, 32, device=device)
    idx = torch.rand(3, 64, device=device).argsort(1)[:, :29].sort(1).values
    with lotus_kernels.use_backend(backend):
        out = model(images, keep_idx=idx)
        out.square().sum().backward()
    want = explicit_gather_forward(ref_model, images, idx)
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"grad of {n}: {m}")


def test_patch_embed_norm_is_applied_before_positions():
    model = tiny_vit(embed_layer=lambda **kw: timm.layers.PatchEmbed(norm_layer=torch.nn.LayerNorm, **kw))
    ref = tiny_vit(embed_layer=lambda **kw: timm.layers.PatchEmbed(norm_layer=torch.nn.LayerNorm, **kw))
    ref.load_state_dict(model.state_dict())
    patch_vit(model)
    images, idx = torch.randn(2, 3, 32, 32), torch.tensor([[0, 5, 63], [2, 2, 9]])
    torch.testing.assert_close(
        model(images, keep_idx=idx), explicit_gather_forward(ref, images, idx), rtol=1e-4, atol=1e-4
    )


def test_keep_ratio_uses_top_scores_and_works_in_eval_mode():
    model = patch_vit(tiny_vit())
    images, scores = torch.randn(2, 3, 32, 32), torch.randn(2, 64)
    idx = lotus_kernels.select_keep(scores, 0.5)
    assert not model.training
    torch.testing.assert_close(model(images, keep_ratio=0.5, scores=scores), model(images, keep_idx=idx))


def test_random_keep_really_drops_tokens():
    model = patch_vit(tiny_vit())
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model(torch.randn(2, 3, 32, 32), keep_ratio=0.25)
    assert seen == [1 + 16]


def test_state_dict_and_torch_save_round_trip():
    model = patch_vit(tiny_vit())
    images, idx = torch.randn(2, 3, 32, 32), torch.tensor([[1, 2, 3], [4, 5, 6]])
    fresh = patch_vit(tiny_vit())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(images, keep_idx=idx), model(images, keep_idx=idx), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded).__name__ == "LotusVisionTransformer"
    torch.testing.assert_close(loaded(images, keep_idx=idx), model(images, keep_idx=idx), rtol=0, atol=0)


def test_patching_twice_is_harmless():
    model = tiny_vit()
    assert patch_vit(patch_vit(model)) is model


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(keep_ratio=0.0), ValueError, "keep_ratio: expected a number in \\(0, 1\\]"),
        (dict(keep_ratio=1.5), ValueError, "keep_ratio"),
        (dict(scores=torch.randn(2, 64)), ValueError, "scores: given without keep_ratio"),
        (dict(keep_ratio=0.5, scores=torch.randn(2, 63)), ValueError, "scores: expected shape \\(2, 64\\)"),
        (dict(keep_idx=torch.tensor([[0, 64], [1, 2]])), IndexError, "idx: index 64 is out of range"),
        (
            dict(keep_idx=torch.tensor([[0, 1]])),
            ValueError,
            "keep_idx: batch size 1 does not match images's batch size 2",
        ),
        (dict(keep_idx=torch.zeros(2, 0, dtype=torch.long)), ValueError, "K >= 1"),
        (dict(keep_idx=torch.tensor([[0.0], [1.0]])), TypeError, "keep_idx: expected an int64"),
        (dict(keep_idx=torch.tensor([[0], [1]]), keep_ratio=0.5), ValueError, "either keep_idx or keep_ratio"),
        (dict(keep_idx=[torch.tensor([0])]), ValueError, "keep_idx: got 1 index tensors for a batch of 2 images"),
        (
            dict(keep_idx=[torch.tensor([0]), torch.tensor([1, 64])]),
            IndexError,
            "keep_idx\\[1\\]: index 64 is out of range",
        ),
        (
            dict(keep_idx=[torch.tensor([0]), torch.tensor([], dtype=torch.long)]),
            ValueError,
            "keep_idx\\[1\\]: expected at least one patch index",
        ),
        (dict(keep_idx=[torch.tensor([0]), torch.tensor([1.0])]), TypeError, "keep_idx\\[1\\]: expected an int64"),
        (dict(keep_idx=[torch.tensor([[0]]), torch.tensor([1])]), ValueError, "keep_idx\\[0\\]: expected a 1-D tensor"),
        (
            dict(keep_idx=[torch.tensor([0]), torch.tensor([1])], keep_ratio=0.5),
            ValueError,
            "either keep_idx or keep_ratio",
        ),
    ],
)
def test_bad_keep_arguments(kwargs, exc, match):
    model = patch_vit(tiny_vit())
    with pytest.raises(exc, match=match):
        model(torch.randn(2, 3, 32, 32), **kwargs)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match="images: expected spatial size \\(32, 32\\), got \\(48, 48\\)"):
        patch_vit(tiny_vit())(torch.randn(2, 3, 48, 48), keep_ratio=0.5)


def test_non_vit_is_refused():
    with pytest.raises(TypeError, match="model: patch_vit does not support torch.nn.modules.linear.Linear; supported"):
        patch_vit(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- ragged keep lists (varlen attention)
RAGGED_KW = [
    {},
    dict(class_token=False, global_pool="avg"),
    dict(reg_tokens=2),
    dict(no_embed_class=True),
    dict(qk_norm=True, init_values=1e-2),
    dict(global_pool="avgmax", reg_tokens=1),
]


def ragged_idx(lengths, device):
    return [torch.randperm(64, device=device)[:n] for n in lengths]


RAGGED_IDS = ["plain", "avg", "reg2", "no_embed_class", "qknorm-ls", "avgmax"]
# Every model variant in eval and train mode on the reference and C++ kernels; the Triton interpreter
# is slow, so it gets the plain model in eval mode only (same kernels, fewer calls).
RAGGED_CASES = [
    pytest.param(b, d, kw, train, id=f"{b}-{d}-{name}-{'train' if train else 'eval'}")
    for b, d in [("reference", "cpu"), *BACKENDS]
    for kw, name in zip(RAGGED_KW, RAGGED_IDS)
    for train in (False, True)
    if b != "triton" or (not kw and not train)
]


@pytest.mark.parametrize("backend,device,kw,train", RAGGED_CASES)
def test_ragged_keep_matches_each_image_alone(backend, device, kw, train):
    model = patch_vit(tiny_vit(**kw).to(device)).train(train)
    images = torch.randn(3, 3, 32, 32, device=device)
    idx = ragged_idx((29, 1, 64), device)
    params = [p for p in model.parameters()]
    with lotus_kernels.use_backend(backend):
        out = model(images, keep_idx=idx)
        grads = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
    want = torch.cat([model(images[i : i + 1], keep_idx=idx[i][None]) for i in range(3)])
    want_grads = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    for (n, _), g, w in zip(model.named_parameters(), grads, want_grads):
        if w is None:
            assert g is None or g.abs().max() == 0, n
        else:
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad of {n}: {m}")


def test_ragged_drop_path_is_per_image_and_full_drop_matches():
    """drop_path_rate = 1 (timm: 0 for block 0, 1 for the last block) drops the last block's branches
    for every image: deterministic, so it must equal each image alone; at 0.5 some images keep a
    branch that others drop, so identical images come out different."""
    model = patch_vit(tiny_vit(drop_path_rate=1.0)).train()
    images, idx = torch.randn(2, 3, 32, 32), ragged_idx((5, 11), "cpu")
    want = torch.cat([model(images[i : i + 1], keep_idx=idx[i][None]) for i in range(2)])
    torch.testing.assert_close(model(images, keep_idx=idx), want, rtol=1e-5, atol=1e-6)
    model = patch_vit(tiny_vit(drop_path_rate=0.5)).train()
    same = patch_vit(tiny_vit(drop_path_rate=0.5)).eval()
    same.load_state_dict(model.state_dict())
    images = images[:1].expand(64, -1, -1, -1)
    idx = [idx[0]] * 64  # 64 identical images: per-image draws make their outputs differ
    out = model(images, keep_idx=idx)
    assert (out - out[:1]).abs().amax(1).gt(1e-6).any() and not torch.isnan(out).any()


def test_ragged_with_gradient_checkpointing_matches():
    model = patch_vit(tiny_vit()).train()
    images, idx = torch.randn(2, 3, 32, 32), ragged_idx((7, 20), "cpu")
    want = model(images, keep_idx=idx)
    want_grad = torch.autograd.grad(want.sum(), model.blocks[0].attn.qkv.weight)[0]
    model.set_grad_checkpointing(True)
    out = model(images, keep_idx=idx)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), model.blocks[0].attn.qkv.weight)[0], want_grad)


def test_ragged_refuses_attention_dropout_in_training():
    model = patch_vit(tiny_vit(attn_drop_rate=0.1)).train()
    with pytest.raises(NotImplementedError, match="attn_drop: attention dropout"):
        model(torch.randn(2, 3, 32, 32), keep_idx=ragged_idx((3, 4), "cpu"))
    model.eval()  # no dropout in eval mode: fine
    assert model(torch.randn(2, 3, 32, 32), keep_idx=ragged_idx((3, 4), "cpu")).shape == (2, 10)
