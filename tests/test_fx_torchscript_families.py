"""torch.fx, torchvision feature extraction, TorchScript and torch.jit.trace on patched and sparsified
torchvision / open_clip / transformers ViTs: what works on the unpatched model works after
``patch_vit`` and ``sparsify_`` (the timm family: test_fx_torchscript.py).

transformers models do not script (``torch.jit.script`` fails on their config classes) and do not
trace with plain torch.fx (transformers 5 dropped its own FX tracer), patched or not; they are checked
with ``torch.jit.trace`` and ``torch.export``, the routes transformers documents."""

import copy
import io
import warnings

import pytest
import torch

import lotus_kernels as lk
from lotus_kernels.nn import BlockSparseLinear, MaskedLinear, SemiStructuredFallbackWarning, SemiStructuredLinear

from .test_families import hf_model, oc_model, output, tv_model

TOL = dict(rtol=1e-5, atol=1e-5)
VARIANTS = ["patch", "block", "patch+block", "patch+unstructured", "patch+2:4"]
FAMILY_NAME = {"tv": "torchvision", "oc": "open_clip", "hf": "transformers"}


@pytest.fixture(autouse=True)
def _quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SemiStructuredFallbackWarning)
        yield


def dense(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "tv":
        return tv_model().eval()
    if family == "oc":
        return oc_model(ls_init_value=0.5).eval()
    return hf_model(family[3:]).eval()


def pair(family: str, variant: str):
    """(reference, transformed): the reference is the transformed model densified and unpatched (an
    nn.Linear holding the pruned weights, the family's own class)."""
    model = dense(family)
    cls = type(model)
    for step in variant.split("+"):
        if step == "patch":
            lk.patch_vit(model)
        elif step == "2:4":
            lk.sparsify_(model, layout="2:4")
        else:
            lk.sparsify_(model, sparsity=0.5, layout=step, block_size=16)
    ref = lk.densify_(copy.deepcopy(model))
    ref.__class__ = cls
    return ref, model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


def n_sparse(model) -> int:
    return sum(isinstance(m, (MaskedLinear, BlockSparseLinear, SemiStructuredLinear)) for m in model.modules())


CASES = [(f, v) for f in ("tv", "oc") for v in VARIANTS]


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_fx_trace_forward_and_backward_match_eager(family, variant):
    ref, model = pair(family, variant)
    x = images()
    gm = torch.fx.symbolic_trace(model)
    # the model's own inputs only: a keep argument is refused, never silently ignored
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == [n.target for n in torch.fx.symbolic_trace(ref).graph.nodes if n.op == "placeholder"]
    with pytest.raises(TypeError, match="keep_idx"):
        gm(x, keep_idx=torch.zeros(2, 1, dtype=torch.long))
    if "+" in variant or variant != "patch":
        # every sparse layer traced through to one call of its op wrapper
        wrappers = (lk.ops.masked_linear, lk.ops.block_sparse_linear)
        assert sum(n.op == "call_function" and n.target in wrappers for n in gm.graph.nodes) == n_sparse(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), **TOL)
    model.train()
    gm = torch.fx.symbolic_trace(model)
    model(x).square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    gm(x).square().mean().backward()
    got = dict(gm.named_parameters())
    assert want and set(want) <= set(got)
    for n, g in want.items():
        torch.testing.assert_close(got[n].grad, g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("variant", ["patch+block", "patch+unstructured", "patch+2:4"])
def test_torchvision_feature_extractor_node_names_and_outputs(variant):
    """torchvision's create_feature_extractor: the node names of the dense model, the same outputs."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    ref, model = pair("tv", variant)
    assert get_graph_node_names(model) == get_graph_node_names(ref)
    nodes = {"encoder.layers.encoder_layer_1.mlp": "mlp", "encoder.ln": "ln", "heads": "out"}
    x = images()
    with torch.no_grad():
        got = create_feature_extractor(model, return_nodes=nodes)(x)
        want = create_feature_extractor(ref, return_nodes=nodes)(x)
        torch.testing.assert_close(got["out"], ref(x), **TOL)
    for k in nodes.values():
        torch.testing.assert_close(got[k], want[k], **TOL)


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_torchscript_matches_eager_and_saves(family, variant):
    ref, model = pair(family, variant)
    x = images()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.script(model)
    said = [str(w.message) for w in caught if "TorchScript compiles the model's own" in str(w.message)]
    assert said == ([f"{type(model).__name__}: TorchScript compiles the model's own ({FAMILY_NAME[family]}) "
                     "forward; keep_idx / keep_ratio / scores exist in eager mode and under torch.compile only"]
                    if "patch" in variant else [])  # fmt: skip
    with torch.no_grad():
        want = ref(x)
        torch.testing.assert_close(scripted(x), want, **TOL)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.jit.load(buf)(x), want, **TOL)
        torch.testing.assert_close(torch.jit.script(torch.fx.symbolic_trace(model))(x), want, **TOL)
        if "patch" in variant:  # scripting left the eager model its kept-patch path
            idx = torch.tensor([[0, 3, 9], [1, 2, 15]])
            assert model(x, keep_idx=idx).shape == want.shape


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("family", ["tv", "oc"])
def test_jit_trace_matches_eager(family):
    # check_trace=False: the trace check fails on the unpatched torchvision / open_clip models too
    ref, model = pair(family, "patch+block")
    y = images(3)  # another batch size than the traced one
    with torch.no_grad():
        traced = torch.jit.trace(model, images(), check_trace=False)
        torch.testing.assert_close(traced(y), ref(y), **TOL)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks seen as constants, as in the model
@pytest.mark.parametrize("name", ["vit", "dinov2", "clip"])
def test_transformers_jit_trace_and_export_match_eager(name):
    ref, model = pair(f"hf:{name}", "patch+block")
    x = images()
    with torch.no_grad():
        want = output(ref(x))
        traced = torch.jit.trace(model, x, strict=False)  # strict=False: transformers returns a dict
        torch.testing.assert_close(main_output(traced(x)), want, **TOL)
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(main_output(exported(x)), want, **TOL)


def main_output(out: dict) -> torch.Tensor:
    """logits / image_embeds / pooler_output of a transformers output or of a traced graph's dict."""
    return next(out[k] for k in ("logits", "image_embeds", "pooler_output") if out.get(k) is not None)
