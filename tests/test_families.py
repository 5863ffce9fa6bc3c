"""patch_vit on torchvision, transformers and open_clip ViTs (tiny random models built from configs).

Every kept-patch output is compared with an independent definition built from the model's own
pieces: embed every patch the model's way, gather the prefix + kept tokens, run the rest of the
model. Patch scores are compared with the attention map the model's own attention returns."""

import io

import pytest
import torch
import torch.nn.functional as F

import lotus_kernels
from lotus_kernels import patch_vit
from lotus_kernels.ops import gather_tokens

from .conftest import assert_compiled_matches_eager

TOL = dict(rtol=1e-4, atol=1e-5)
N = 16  # 32x32 images, patch 8


# ---------------------------------------------------------------- models
def tv_model(**kw):
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10, **kw
    )
    torch.nn.init.normal_(m.heads.head.weight, std=0.1)  # torchvision zero-inits the head: the outputs would be all 0
    return m


def hf_model(name, **kw):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install lotus-kernels[hf])"
    )
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
    )
    common.update(kw)
    if name == "vit":
        return transformers.ViTForImageClassification(
            transformers.ViTConfig(intermediate_size=128, num_labels=10, **common)
        )
    if name == "deit":
        return transformers.DeiTForImageClassificationWithTeacher(
            transformers.DeiTConfig(intermediate_size=128, num_labels=10, **common)
        )
    if name == "dinov2":
        return transformers.Dinov2ForImageClassification(
            transformers.Dinov2Config(mlp_ratio=2, num_labels=10, **common)
        )
    if name == "clip":
        return transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(intermediate_size=128, projection_dim=16, **common)
        )
    if name == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(intermediate_size=128, **common))
    raise ValueError(name)


def oc_model(**kw):
    pytest.importorskip("open_clip", reason="open_clip is not installed (pip install lotus-kernels[open_clip])")
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2, output_dim=16, **kw)


HF = ["vit", "deit", "dinov2", "clip", "siglip"]
FAMILIES = ["tv", "oc:tok", "oc:avg"] + [f"hf:{n}" for n in HF]


def make(family):
    if family == "tv":
        return tv_model()
    if family.startswith("oc:"):
        return oc_model(pool_type=family[3:], ls_init_value=0.5)
    return hf_model(family[3:])


def output(out):
    """The tensor a model's output stands for (HF: logits / image_embeds / pooler_output)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(type(out))


# ---------------------------------------------------------------- independent references
def reference_kept(family, model, images, idx):
    """The model's output on kept patches ``idx``, from its own full embedding + a gather."""
    if family == "tv":
        enc = model.encoder
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + enc.pos_embedding
        x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], idx)], dim=1)
        return model.heads(enc.ln(enc.layers(enc.dropout(x)))[:, 0])
    if family.startswith("oc"):
        x = model._embeds(images)  # ln_pre included: per token, so gathering after it is the same
        x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], idx)], dim=1)
        pooled, _ = model._pool(model.transformer(x))
        return pooled @ model.proj
    # transformers: the model's own embeddings output, gathered by a forward hook
    emb = next(m for n, m in model.named_modules() if n.endswith("embeddings") and "Embeddings" in type(m).__name__)
    p = {"hf:deit": 2, "hf:siglip": 0}.get(family, 1)
    hook = emb.register_forward_hook(lambda m, i, o: torch.cat([o[:, :p], gather_tokens(o[:, p:], idx)], dim=1))
    try:
        return output(model(images))
    finally:
        hook.remove()


def twin(family):
    """Two identical models: one to patch, one left alone as the reference."""
    a, b = make(family), make(family)
    b.load_state_dict(a.state_dict())
    return a, b


# ---------------------------------------------------------------- the contract
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_patches_match_the_model_on_gathered_tokens_forward_and_backward(family):
    model, ref = twin(family)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want_plain = output(ref.eval()(images))
    patch_vit(model.eval())
    assert type(model).__name__.startswith("Lotus")
    with torch.no_grad():  # the plain forward is the model's own, bit for bit
        assert torch.equal(output(model(images)), want_plain)
        torch.testing.assert_close(output(model(images, keep_idx=torch.arange(N).expand(3, N))), want_plain, **TOL)
    idx = torch.rand(3, N).argsort(1)[:, :7].sort(1).values
    model.train(), ref.train()  # train mode too (dropout is 0 in these configs)
    got = output(model(images, keep_idx=idx))
    want = reference_kept(family, ref, images, idx)
    torch.testing.assert_close(got, want, **TOL)
    got.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            # sums over B * K patches in another order: relative to the gradient's scale
            scale = float(q.grad.abs().max())
            torch.testing.assert_close(
                p.grad, q.grad, rtol=1e-3, atol=1e-4 * scale + 1e-6, msg=lambda m: f"{name}: {m}"
            )


@pytest.mark.parametrize("family", ["tv", "oc:tok"])
def test_keep_ratio_with_scores_keeps_the_top_patches(family):
    model = patch_vit(make(family).eval())
    images, scores = torch.randn(2, 3, 32, 32), torch.randn(2, N)
    idx = lotus_kernels.select_keep(scores, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(images, keep_ratio=0.5, scores=scores), model(images, keep_idx=idx))
        assert model(images, keep_ratio=0.3).shape[0] == 2
    assert torch.equal(model.keep_indices(images, keep_ratio=0.5, scores=scores), idx)


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_keep_lists_match_each_image_on_its_own(family):
    model = patch_vit(make(family).train())
    images = torch.randn(3, 3, 32, 32)
    lists = [torch.tensor([0, 3, 5, 15]), torch.tensor([7]), torch.arange(N)]
    out = model(images, keep_idx=lists)
    got = output(out)
    for i, idx in enumerate(lists):
        alone = model(images[i : i + 1], keep_idx=idx[None])
        torch.testing.assert_close(got[i], output(alone)[0], **TOL)
    got.sum().backward()  # differentiable end to end


def test_transformers_ragged_hidden_states_are_padded_per_image():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
    )
    model = patch_vit(transformers.ViTModel(config).eval())  # last_hidden_state + pooler
    images = torch.randn(2, 3, 32, 32)
    lists = [torch.tensor([1, 2, 9]), torch.tensor([4])]
    out = model(images, keep_idx=lists)
    assert out.last_hidden_state.shape == (2, 1 + 3, 64)
    for i, idx in enumerate(lists):
        alone = model(images[i : i + 1], keep_idx=idx[None])
        k = 1 + len(idx)
        torch.testing.assert_close(out.last_hidden_state[i, :k], alone.last_hidden_state[0], **TOL)
        assert not out.last_hidden_state[i, k:].any()
        torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0], **TOL)
    with pytest.raises(NotImplementedError, match="keep_idx: ragged keep lists take no output_hidden_states"):
        model(images, keep_idx=lists, output_hidden_states=True)


def test_hf_kwargs_pass_through_labels_and_hidden_states():
    model = patch_vit(hf_model("vit"))
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    idx = torch.tensor([[0, 5, 9], [2, 3, 15]])
    out = model(images, keep_idx=idx, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert out.hidden_states[-1].shape == (2, 1 + 3, 64)  # the encoder saw the kept tokens only


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_hf_resolution_follows_the_models_own_interpolation(name):
    model, ref = twin(f"hf:{name}")
    patch_vit(model.eval())
    images = torch.randn(2, 3, 48, 40)  # a 6 x 5 grid
    kw = {} if name == "dinov2" else {"interpolate_pos_encoding": True}  # DINOv2 always interpolates
    with torch.no_grad():
        want = output(ref.eval()(images, **kw))
        got = output(model(images, keep_idx=torch.arange(30).expand(2, 30), **kw))
    torch.testing.assert_close(got, want, **TOL)
    if name == "vit":
        with pytest.raises(ValueError, match="images: expected spatial size \\(32, 32\\).*interpolate_pos_encoding"):
            model(images, keep_ratio=0.5)


# ---------------------------------------------------------------- patch scores
def reference_scores(family, model, images, blocks="last"):
    """[B, N] from the attention maps the model's own attention layers return (the last one's, or
    the mean of every layer's)."""
    if family.startswith("hf"):
        atts = model(images, output_attentions=True).attentions  # each [B, H, T, T], eager attention
        att = atts[-1] if blocks == "last" else torch.stack(atts).mean(0)
        if family == "hf:siglip":
            return att.mean(1).mean(1)  # received attention, every query a patch
        p = 2 if family == "hf:deit" else 1
        return att[:, :, 0, p:].mean(1)
    seen = []
    layers = list(model.encoder.layers if family == "tv" else model.transformer.resblocks)
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in layers]
    model(images)
    for h in hooks:
        h.remove()
    maps = []
    for blk, x in zip(layers, seen):
        h = blk.ln_1(x)
        attn = blk.self_attention if family == "tv" else blk.attn
        maps.append(attn(h, h, h, need_weights=True, average_attn_weights=True)[1][:, 0, 1:])
    return maps[-1] if blocks == "last" else torch.stack(maps).mean(0)


@pytest.mark.parametrize("blocks", ["last", "mean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_scores_match_the_models_own_attention_map(family, blocks):
    model, ref = twin(family)
    patch_vit(model.eval())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = reference_scores(family, ref.eval(), images, blocks)
    got = model.patch_scores(images, sink=None, blocks=blocks)
    assert got.shape == (2, N)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(model.patch_scores(images, blocks=blocks), got)  # "first" never touches a patch
    if blocks == "mean":  # the earlier layer counts
        assert not torch.allclose(got, model.patch_scores(images, sink=None), **TOL)


# ---------------------------------------------------------------- state, pickling, compile
@pytest.mark.parametrize("family", ["tv", "oc:tok", "hf:vit", "hf:clip"])
def test_state_dict_round_trip_and_torch_save(family):
    model, plain = twin(family)
    patch_vit(model.eval())
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    images, idx = torch.randn(2, 3, 32, 32), torch.tensor([[0, 4, 8], [1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(output(loaded(images, keep_idx=idx)), output(model(images, keep_idx=idx)))


@pytest.mark.slow  # inductor compiles one model per family: ~1-3 min each on 2 shared cores
@pytest.mark.parametrize("family", ["tv", "oc:tok", "hf:vit"])
def test_torch_compile_fullgraph_with_keep_idx_matches_eager(family):
    model = patch_vit(make(family).eval())
    params = [p for p in model.parameters() if p.requires_grad]

    def step(images, idx, *_):
        return output(model(images, keep_idx=idx)).square().sum()

    images, idx = torch.randn(2, 3, 32, 32), torch.tensor([[0, 4, 8, 9], [1, 2, 3, 15]])
    assert_compiled_matches_eager(step, (images, idx, *params), params, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- bad input
def test_unsupported_model_gets_one_line_naming_class_and_families():
    with pytest.raises(
        TypeError,
        match=r"model: patch_vit does not support torch.nn.modules.linear.Linear; "
        r"supported: timm .*torchvision.*transformers.*open_clip",
    ) as e:
        patch_vit(torch.nn.Linear(2, 2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["tv", "oc:tok", "hf:vit"])
def test_bad_keep_idx_and_image_size_name_the_argument(family):
    model = patch_vit(make(family))
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(IndexError, match=r"keep_idx: index 16 is out of range; expected values in \[0, 16\)"):
        model(images, keep_idx=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match=r"images: expected spatial size \(32, 32\) \(the model's patch grid 4x4"):
        model(torch.randn(2, 3, 40, 40), keep_ratio=0.5)
    with pytest.raises(ValueError, match="keep_idx: give either keep_idx or keep_ratio"):
        model(images, keep_idx=torch.tensor([[0], [1]]), keep_ratio=0.5)
    with pytest.raises(ValueError, match="scores: given without keep_ratio"):
        model(images, scores=torch.randn(2, N))
    with pytest.raises(IndexError, match=r"keep_idx\[1\]: index -1 is out of range"):
        model(images, keep_idx=[torch.tensor([0]), torch.tensor([-1])])
