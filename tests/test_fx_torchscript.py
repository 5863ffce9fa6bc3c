"""Patched and sparsified timm ViTs keep timm's model-level features: torch.fx tracing (plain and
timm / torchvision feature extraction) forward and backward, TorchScript (direct and of an FX
graph), features_only, forward_intermediates and the default-config API. Written after the
properties timm's own tests/test_models.py checks, on tiny configs of the real timm models.
"""

import copy
import inspect
import io
import warnings

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import lotus_kernels as lk
from lotus_kernels.nn import BlockSparseLinear, MaskedLinear, SemiStructuredFallbackWarning, SemiStructuredLinear

# Tiny configs of three timm ViT families: class token (vit_tiny), register tokens + avg pool, no
# class token (vit_little reg4 gap), DINOv2 (LayerScale, patch 14, registers).
ARCHS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4)),
    "reg4_gap": ("vit_little_patch16_reg4_gap_256", dict(img_size=32, patch_size=4)),
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
}
# What is done to the model: patch_vit, sparsify_ (each layout), both.
VARIANTS = ["patch", "unstructured", "block", "2:4", "patch+block"]
CASES = [("vit", v) for v in VARIANTS] + [("reg4_gap", "patch+block"), ("dinov2", "patch+block")]
CASE_IDS = [f"{a}-{v}" for a, v in CASES]


def dense_model(arch: str, **kw) -> torch.nn.Module:
    name, cfg = ARCHS[arch]
    cfg = dict(cfg, embed_dim=32, depth=2, num_heads=2, num_classes=10, mlp_ratio=4.0)
    cfg.update(kw)
    return timm.create_model(name, pretrained=False, **cfg).eval()


def transform(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """Apply ``variant`` to every timm VisionTransformer in ``model`` (in place)."""
    for step in variant.split("+"):
        if step == "patch":
            for m in model.modules():
                if isinstance(m, timm.models.VisionTransformer):
                    lk.patch_vit(m)
        elif step == "2:4":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SemiStructuredFallbackWarning)
                lk.sparsify_(model, layout="2:4")
        else:
            lk.sparsify_(model, sparsity=0.5, layout=step, block_size=16)
    return model


def pair(arch: str, variant: str, **kw):
    """(dense reference, transformed copy): same weights, the copy patched / sparsified. For sparse
    variants the reference is the sparse model densified (nn.Linear holding the pruned weights)."""
    model = transform(dense_model(arch, **kw), variant)
    ref = lk.densify_(copy.deepcopy(model))
    if isinstance(ref, lk.vit.KeptPatchesMixin):
        ref.__class__ = timm.models.VisionTransformer
    return ref, model


def images(arch: str, n: int = 2) -> torch.Tensor:
    size = ARCHS[arch][1]["img_size"]
    return torch.randn(n, 3, size, size)


TIMM_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SemiStructuredFallbackWarning)
        yield


# ---------------------------------------------------------------- torch.fx
@pytest.mark.parametrize("arch,variant", CASES, ids=CASE_IDS)
def test_fx_trace_forward_and_backward_match_eager(arch, variant):
    ref, model = pair(arch, variant)
    x = images(arch)
    gm = torch.fx.symbolic_trace(model)
    # The graph takes the inputs timm's forward takes (no placeholder for a keep argument) ...
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == [n.target for n in torch.fx.symbolic_trace(ref).graph.nodes if n.op == "placeholder"]
    with pytest.raises(TypeError, match="keep_idx"):
        gm(x, keep_idx=torch.zeros(2, 1, dtype=torch.long))
    # ... and computes the model's own forward, and its gradients, in train mode too.
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-5, atol=1e-5)
    model.train()
    gm = torch.fx.symbolic_trace(model)
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    gm(x).square().mean().backward()
    got = dict(gm.named_parameters())
    assert set(got) == set(want)
    for n, g in want.items():
        torch.testing.assert_close(got[n].grad, g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("variant", ["unstructured", "block", "2:4"])
def test_fx_records_sparse_layers_as_one_node_each(variant):
    _, model = pair("vit", variant)
    gm = torch.fx.symbolic_trace(model)
    wrapper = {"unstructured": lk.ops.masked_linear, "block": lk.ops.block_sparse_linear, "2:4": lk.ops.masked_linear}[
        variant
    ]  # a traced 2:4 layer runs its masked product
    n_sparse = sum(isinstance(m, (MaskedLinear, BlockSparseLinear, SemiStructuredLinear)) for m in model.modules())
    assert n_sparse == 8  # qkv, proj, fc1, fc2 of 2 blocks (not the head)
    assert sum(n.op == "call_function" and n.target is wrapper for n in gm.graph.nodes) == n_sparse


@pytest.mark.parametrize("arch,variant", CASES[:4], ids=CASE_IDS[:4])
def test_timm_feature_extraction_keeps_sparse_layers_as_named_leaves(arch, variant):
    """timm's tracer settings (its leaf modules and autowrapped functions, as timm's FX feature
    extraction uses): a sparse layer is one node named like the nn.Linear it replaced, and a
    feature extractor returns what the module outputs."""
    ref, model = pair(arch, variant)
    assert get_graph_node_names(model, tracer_kwargs=TIMM_TRACER) == get_graph_node_names(
        ref, tracer_kwargs=TIMM_TRACER
    )
    nodes = {"blocks.1.mlp.fc1": "fc1", "blocks.1.attn.qkv": "qkv", "norm": "norm"}
    fe = create_feature_extractor(model, return_nodes=nodes, tracer_kwargs=TIMM_TRACER)
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
        for n, k in nodes.items()
    ]
    x = images(arch)
    with torch.no_grad():
        out = fe(x)
        model(x)
    for h in hooks:
        h.remove()
    for k in nodes.values():
        torch.testing.assert_close(out[k], seen[k], rtol=0, atol=0)


# ---------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("arch,variant", CASES, ids=CASE_IDS)
def test_torchscript_matches_eager_and_saves(arch, variant):
    ref, model = pair(arch, variant)
    x = images(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.script(model)
    said = [str(w.message) for w in caught if "TorchScript compiles the model's own (timm) forward" in str(w.message)]
    assert len(said) == ("patch" in variant)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(scripted(x), want, rtol=1e-5, atol=1e-5)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.jit.load(buf)(x), want, rtol=1e-5, atol=1e-5)


def test_torchscript_second_model_and_patched_model_unchanged():
    """Scripting a second model with the same layer classes works, and scripting leaves the eager
    model its kept-patch path (TorchScript compiles timm's forward: it has no keep arguments)."""
    for variant in ("patch+block", "patch+unstructured"):
        _, first = pair("vit", variant)
        _, second = pair("vit", variant, depth=1, qkv_bias=False)
        torch.jit.script(first)
        scripted = torch.jit.script(second)
        x, idx = images("vit"), torch.tensor([[0, 5, 9], [1, 2, 63]])
        with torch.no_grad():
            kept = second(x, keep_idx=idx)
            assert kept.shape == (2, 10)
            with pytest.raises(RuntimeError):
                scripted(x, keep_idx=idx)
        assert type(second).__name__ == "LotusVisionTransformer"


@pytest.mark.parametrize("variant", ["patch+block", "unstructured", "2:4"])
def test_fx_graph_scripts(variant):
    """An FX graph of the model scripts (timm's test_model_forward_fx_torchscript), plain and with
    timm's leaf modules."""
    ref, model = pair("vit", variant)
    x = images("vit")
    last = get_graph_node_names(model, tracer_kwargs=TIMM_TRACER)[1][-1]
    timm_fx = create_feature_extractor(model, return_nodes={last: "out"}, tracer_kwargs=TIMM_TRACER)
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(torch.jit.script(torch.fx.symbolic_trace(model))(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(timm_fx)(x)["out"], want, rtol=1e-5, atol=1e-5)


def test_semi_structured_strict_refuses_graphs():
    layer = SemiStructuredLinear.from_linear(torch.nn.Linear(16, 8), strict=True)
    with pytest.raises(RuntimeError, match="strict=True.*torch.fx graph runs the dense masked product"):
        torch.fx.symbolic_trace(layer)
    with pytest.raises(RuntimeError, match="strict=True.*TorchScript would run the dense masked product"):
        torch.jit.script(layer)


def test_block_sparse_op_checks_sizes_without_the_wrapper():
    """Graphs and torch.ops calls reach the op without the wrapper's checks: the op itself refuses
    sizes the kernels would index out of bounds with."""
    layer = BlockSparseLinear.from_linear(torch.nn.Linear(32, 16), density=0.5, block_size=16)
    args = (layer.values, layer.crow, layer.col, layer.ccol, layer.row, layer.perm)
    op = torch.ops.lotus_kernels.block_sparse_linear
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 32\] \(in_features\), got \(3, 48\)"):
        op(torch.randn(3, 48), *args, layer.bias)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\)"):
        op(torch.randn(3, 32), *args, torch.zeros(8))
    with pytest.raises(ValueError, match=r"values: expected shape \[nnzb = 1, bs, bs\]"):
        op(torch.randn(3, 32), torch.zeros(3, 16, 16), *args[1:], None)
    scripted = torch.jit.script(layer)
    with pytest.raises(Exception, match=r"x: expected shape \[\.\.\., 32\]"):
        scripted(torch.randn(3, 48))


# ---------------------------------------------------------------- features / default-config API
@pytest.mark.parametrize("arch,variant", CASES, ids=CASE_IDS)
def test_features_only_and_forward_intermediates(arch, variant):
    x = images(arch, 1)
    name, cfg = ARCHS[arch]
    cfg = dict(cfg, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
    feat = transform(timm.create_model(name, features_only=True, out_indices=(0, 1), **cfg).eval(), variant)
    ref, model = pair(arch, variant)
    with torch.no_grad():
        got = feat(x)
        want_final, want = ref.forward_intermediates(x)
        final, inter = model.forward_intermediates(x)
    assert [f.shape for f in got] == [w.shape for w in want]
    assert [f.shape[1] for f in got] == feat.feature_info.channels()
    for a, b in zip(inter, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, want_final, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch,variant", CASES[:5], ids=CASE_IDS[:5])
def test_default_cfg_api(arch, variant):
    """forward_features / forward_head(pre_logits) / reset_classifier behave as on the dense model."""
    ref, model = pair(arch, variant)
    x = images(arch, 1)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, ref.forward_features(x), rtol=1e-5, atol=1e-5)
        assert feats.shape[-1] == model.num_features
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).shape == feats.shape
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state


def test_patched_forward_signature_and_arguments():
    """The patched forward shows timm's parameters plus the keyword-only keep arguments, runs timm's
    forward on timm's arguments, and refuses timm's other arguments together with a keep argument."""
    ref, model = pair("vit", "patch")
    params = inspect.signature(model.forward).parameters
    # timm's own arguments: attn_mask since timm 1.0.16, is_causal in newer releases (not in 1.0.17)
    base = list(inspect.signature(timm.models.VisionTransformer.forward).parameters)[1:]
    assert list(params) == [*base, "keep_idx", "keep_ratio", "scores"] and base[:2] == ["x", "attn_mask"]
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("keep_idx", "keep_ratio", "scores"))
    x, idx = images("vit"), torch.tensor([[0, 5, 9], [1, 2, 63]])
    mask = torch.zeros(65, 65, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), ref(x, mask), rtol=0, atol=0)
        with pytest.raises(ValueError, match="attn_mask: not supported together with keep_idx"):
            model(x, mask, keep_idx=idx)
        if "is_causal" in base:
            torch.testing.assert_close(model(x=x, is_causal=True), ref(x, is_causal=True), rtol=0, atol=0)
            with pytest.raises(ValueError, match="is_causal: not supported together with keep_idx"):
                model(x, is_causal=True, keep_ratio=0.5)
        n = len(base)
        with pytest.raises(TypeError, match=f"at most {n} positional arguments"):
            model(x, *[None] * (n - 1), idx, keep_idx=idx)
        torch.testing.assert_close(model(x=x, attn_mask=None, keep_idx=idx), model(x, keep_idx=idx), rtol=0, atol=0)


def test_torch_export_with_keep_idx():
    """torch.export binds call arguments by inspect.signature(forward), which shows the keep arguments."""
    _, model = pair("vit", "patch+block")
    x, idx = images("vit"), torch.tensor([[0, 5, 9], [1, 2, 63]])
    ep = torch.export.export(model, (x,), kwargs={"keep_idx": idx})
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, keep_idx=idx), model(x, keep_idx=idx), rtol=1e-5, atol=1e-5)
