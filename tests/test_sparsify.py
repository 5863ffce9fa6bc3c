import copy

import pytest
import timm
import torch
from torch import nn

from lotus_kernels import densify_, sparsify_
from lotus_kernels.nn import MaskedLinear

from .conftest import assert_compiled_matches_eager


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
    ).eval()


def images(n=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def linear_names(model, cls=nn.Linear):
    return sorted(n for n, m in model.named_modules() if type(m) is cls)


def masked(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def masked_reference(dense, sparse):
    """A copy of the dense model with each pruned layer's weight multiplied by its mask."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for n, m in masked(sparse).items():
            ref.get_submodule(n).weight.mul_(m.mask)
    return ref


# ---------------------------------------------------------------- which weights are pruned
def test_global_sparsity_is_exact_and_thresholded_across_layers():
    model = tiny_vit()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    sparsify_(model, sparsity=0.3)
    layers = masked(model)
    assert sorted(layers) == sorted(n for n in before if n != "head")
    total = sum(m.mask.numel() for m in layers.values())
    pruned = sum(int((~m.mask).sum()) for m in layers.values())
    assert pruned == round(0.3 * total)
    kept_min = min(before[n].abs()[m.mask].min() for n, m in layers.items())
    pruned_max = max(before[n].abs()[~m.mask].max() for n, m in layers.items())
    assert pruned_max <= kept_min
    for n, m in layers.items():
        assert not m.weight[~m.mask].any()
        assert torch.equal(m.weight[m.mask], before[n][m.mask])
    assert type(model.head) is nn.Linear and torch.equal(model.head.weight, before["head"])


def test_layer_scope_prunes_each_layer_exactly():
    model = sparsify_(tiny_vit(), sparsity=0.55, scope="layer")
    for m in masked(model).values():
        assert int((~m.mask).sum()) == round(0.55 * m.mask.numel())


def test_ties_are_broken_towards_the_lower_index():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.fill_(1.0)
    sparsify_(model, sparsity=0.25)  # 8 of 32 weights tie: the first 8 in module, then row-major order
    assert not model[0].mask[:2].any() and model[0].mask[2:].all() and model[2].mask.all()


def test_zero_sparsity_keeps_everything_dense():
    model = sparsify_(tiny_vit(), sparsity=0.0)
    assert all(m.density == 1.0 for m in masked(model).values())


def test_include_and_exclude():
    model = sparsify_(tiny_vit(), sparsity=0.5, include=["blocks.*.mlp.fc1"])
    assert sorted(masked(model)) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    model = sparsify_(tiny_vit(), sparsity=0.5, exclude=["blocks.1.*", "*.qkv"])
    assert sorted(masked(model)) == ["blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    model = sparsify_(tiny_vit(), sparsity=0.5, include=["head"])  # the head only when asked for
    assert sorted(masked(model)) == ["head"]


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_linears_that_are_not_plain_are_left_alone():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    layer.norm1 = ScaledLinear(16, 16)  # its own forward: a MaskedLinear would drop the 2x
    sparsify_(layer, sparsity=0.5)
    assert sorted(masked(layer)) == ["linear1", "linear2"]  # MHA reads out_proj.weight directly


def test_a_nested_head_is_skipped_by_default():
    model = nn.Sequential()
    model.add_module("backbone", nn.Linear(4, 8))
    model.add_module("cls", nn.Sequential())
    model.cls.add_module("head", nn.Linear(8, 2))
    sparsify_(model, sparsity=0.5)
    assert sorted(masked(model)) == ["backbone"]


def test_masks_are_applied_as_given():
    model = tiny_vit()
    fc1 = model.blocks[0].mlp.fc1.weight
    masks = {"blocks.0.mlp.fc1": torch.rand(fc1.shape) < 0.3, "head": torch.rand(model.head.weight.shape) < 0.9}
    sparsify_(model, masks=masks)
    layers = masked(model)
    assert sorted(layers) == sorted(masks)
    for n, mask in masks.items():
        assert torch.equal(layers[n].mask, mask)


def test_resparsifying_updates_existing_masks():
    model = sparsify_(tiny_vit(), sparsity=0.3)
    sparsify_(model, sparsity=0.6)  # already-pruned zeros rank lowest, so the 30% stay pruned
    layers = masked(model)
    assert sum(int((~m.mask).sum()) for m in layers.values()) == round(
        0.6 * sum(m.mask.numel() for m in layers.values())
    )


# ---------------------------------------------------------------- the pruned model computes the masked one
def test_outputs_and_grads_match_a_masked_dense_model():
    dense = tiny_vit()
    model = sparsify_(copy.deepcopy(dense), sparsity=0.4)
    ref = masked_reference(dense, model)
    x = images()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)  # the same GEMMs on the same weights
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for n, m in masked(model).items():
        want = ref.get_submodule(n).weight.grad * m.mask
        torch.testing.assert_close(m.weight.grad, want, rtol=1e-5, atol=1e-6)
        assert not m.weight.grad[~m.mask].any()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    ],
    ids=["sgd_momentum_wd", "adamw"],
)
def test_optimizer_steps_keep_pruned_weights_at_zero(make_opt):
    model = sparsify_(tiny_vit(), sparsity=0.5).train()
    start = {n: m.weight.detach().clone() for n, m in masked(model).items()}
    opt = make_opt(model.parameters())
    for _ in range(3):
        nn.functional.cross_entropy(model(images()), torch.tensor([1, 7])).backward()
        opt.step()
        opt.zero_grad()
    for n, m in masked(model).items():
        assert not m.weight[~m.mask].any()
        assert not torch.equal(m.weight[m.mask], start[n][m.mask])  # the kept ones did train


# ---------------------------------------------------------------- state dict, conversions
def test_state_dict_round_trip_into_a_fresh_sparsified_model():
    model = sparsify_(tiny_vit(0), sparsity=0.3)
    fresh = sparsify_(tiny_vit(1), sparsity=0.7)  # other weights, other masks: all overwritten
    fresh.load_state_dict(model.state_dict())
    x = images()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for n, m in masked(fresh).items():
        assert torch.equal(m.mask, masked(model)[n].mask)


def test_loading_nonzero_pruned_weights_re_zeroes_them():
    model = sparsify_(tiny_vit(), sparsity=0.5)
    sd = model.state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.randn_like(sd["blocks.0.mlp.fc1.weight"]) + 5  # no zeros at all
    for assign in (False, True):
        fresh = sparsify_(tiny_vit(), sparsity=0.5)
        fresh.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=assign)
        fc1 = fresh.blocks[0].mlp.fc1
        assert not fc1.weight[~fc1.mask].any() and fc1.weight[fc1.mask].all()
        assert fc1.mask.dtype == torch.bool


def test_from_linear_to_linear_reproduces_the_masked_weight():
    linear = nn.Linear(33, 65)
    original = linear.weight.detach().clone()
    mask = torch.rand(65, 33) < 0.5
    layer = MaskedLinear.from_linear(linear, mask)
    back = layer.to_linear()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, original * mask) and torch.equal(back.bias, linear.bias)
    assert torch.equal(linear.weight, original)  # the source layer is untouched
    x = torch.randn(4, 33)
    torch.testing.assert_close(layer(x), back(x), rtol=0, atol=0)
    assert layer.density == pytest.approx(mask.float().mean().item())


def test_masked_linear_module_defaults():
    layer = MaskedLinear(6, 3, bias=False, dtype=torch.float64)
    assert layer.mask.dtype == torch.bool and layer.mask.all() and layer.bias is None
    assert layer.weight.dtype == torch.float64 and layer.density == 1.0
    assert repr(layer) == "MaskedLinear(in_features=6, out_features=3, bias=False, density=1.000)"
    layer.set_mask_(torch.eye(3, 6, dtype=torch.bool))
    assert layer.weight.count_nonzero() == 3 and layer.density == pytest.approx(0.5 / 3)


def test_densify_restores_nn_linear():
    model = sparsify_(tiny_vit(), sparsity=0.3)
    x = images()
    want = model(x)
    densify_(model)
    assert not masked(model) and linear_names(model) == linear_names(tiny_vit())
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_torch_compile_fullgraph_forward_backward_matches_eager():
    layer = MaskedLinear.from_linear(nn.Linear(24, 40), torch.rand(40, 24) < 0.5)
    x = torch.randn(3, 5, 24, requires_grad=True)
    got_grads = assert_compiled_matches_eager(
        lambda x: torch.tanh(layer(x)).square().sum(), (x,), (x, layer.weight, layer.bias)
    )
    assert not got_grads[1][~layer.mask].any()


# ---------------------------------------------------------------- bad input
LIN = nn.Linear(3, 4)
BAD = [
    (
        lambda m: sparsify_(m, sparsity=0.3, layout="2:4"),
        ValueError,
        "sparsity: layout '2:4' prunes exactly 0.5 \\(2 of every 4 weights\\); got 0.3",
    ),
    (lambda m: sparsify_(m, layout="2:4", scope="layer"), ValueError, "scope: not used with layout '2:4'"),
    (
        lambda m: sparsify_(m, layout="2:4", masks={"head": torch.ones(10, 32, dtype=torch.bool)}),
        ValueError,
        "masks\\['head'\\]: expected a 2:4 pattern .* row 0, columns 0..3 keep 4",
    ),
    (
        lambda m: sparsify_(m, sparsity=0.5, layout="csr"),
        ValueError,
        "layout: expected one of 'unstructured', 'block', '2:4', 'auto', got 'csr'",
    ),
    (lambda m: sparsify_(m, sparsity=1.0), ValueError, "sparsity: expected a fraction in \\[0, 1\\), got 1.0"),
    (lambda m: sparsify_(m, sparsity=-0.1), ValueError, "sparsity: expected a fraction in \\[0, 1\\), got -0.1"),
    (lambda m: sparsify_(m, sparsity="0.5"), ValueError, "sparsity: expected a fraction in \\[0, 1\\), got '0.5'"),
    (
        lambda m: sparsify_(m),
        ValueError,
        "sparsity: expected a fraction in \\[0, 1\\) to prune, or masks=...; got neither",
    ),
    (
        lambda m: sparsify_(m, sparsity=0.5, scope="model"),
        ValueError,
        "scope: expected one of 'global', 'layer', got 'model'",
    ),
    (lambda m: sparsify_(m, sparsity=0.5, masks={}), ValueError, "sparsity: must be None when masks is given"),
    (
        lambda m: sparsify_(m, masks={"head": torch.ones(10, 32, dtype=torch.bool)}, include=["head"]),
        ValueError,
        "include / exclude: not used with masks",
    ),
    (
        lambda m: sparsify_(m, masks={"blocks.0.norm1": torch.ones(32, dtype=torch.bool)}),
        ValueError,
        "masks: 'blocks.0.norm1' is not an nn.Linear \\(nor a lotus sparse linear\\) in the model",
    ),
    (
        lambda m: sparsify_(m, masks={"head": torch.ones(32, 10, dtype=torch.bool)}),
        ValueError,
        "masks\\['head'\\]: expected shape \\(10, 32\\) to match head.weight, got \\(32, 10\\)",
    ),
    (
        lambda m: sparsify_(m, masks={"head": torch.ones(10, 32)}),
        TypeError,
        "masks\\['head'\\]: expected a bool tensor",
    ),
    (
        lambda m: sparsify_(m, sparsity=0.5, include=["blocks.*.mlp.fc3"]),
        ValueError,
        "include: pattern 'blocks.\\*.mlp.fc3' matches no nn.Linear",
    ),
    (lambda m: sparsify_(m, sparsity=0.5, exclude=[3]), TypeError, "exclude: expected a list of fnmatch patterns"),
    (lambda m: sparsify_(m, sparsity=0.5, exclude=["*"]), ValueError, "model: has no nn.Linear to sparsify"),
    (lambda m: sparsify_(LIN, sparsity=0.5), ValueError, "model: is itself a linear layer"),
    (
        lambda m: MaskedLinear.from_linear(LIN, torch.ones(4, 3)),
        TypeError,
        "mask: expected a bool tensor \\(True = keep\\), got float32",
    ),
    (
        lambda m: MaskedLinear.from_linear(LIN, torch.ones(3, 4, dtype=torch.bool)),
        ValueError,
        "mask: expected shape \\(4, 3\\) to match linear.weight",
    ),
    (
        lambda m: MaskedLinear.from_linear(nn.Conv2d(1, 1, 1), torch.ones(1, 1, dtype=torch.bool)),
        TypeError,
        "linear: expected an nn.Linear, got Conv2d",
    ),
    (
        lambda m: MaskedLinear(3, 4).set_mask_(torch.ones(4, 3, dtype=torch.uint8)),
        TypeError,
        "mask: expected a bool tensor",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_is_a_clear_error(call, exc, match):
    model = tiny_vit()
    with pytest.raises(exc, match=match):
        call(model)
    assert not masked(model)  # nothing was swapped before the error


# ---------------------------------------------------------------- 2:4
def test_semi_structured_layout_swaps_every_target_and_densify_restores():
    from lotus_kernels.nn import SemiStructuredFallbackWarning, SemiStructuredLinear

    dense = tiny_vit()
    model = sparsify_(copy.deepcopy(dense), layout="2:4")
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, SemiStructuredLinear)}
    assert sorted(swapped) == [n for n in linear_names(dense) if n != "head"]
    for n, m in swapped.items():
        kept = m.mask.reshape(m.out_features, -1, 4).sum(-1)
        assert (kept == 2).all(), n
        w = dense.get_submodule(n).weight.abs().reshape(m.out_features, -1, 4)
        # every kept weight is at least as large as every pruned one of its group
        g = m.mask.reshape_as(w)
        assert (w.masked_fill(~g, float("inf")).amin(-1) >= w.masked_fill(g, -1).amax(-1)).all(), n
    with pytest.warns(SemiStructuredFallbackWarning):
        got = model(images())
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for n, m in swapped.items():
            ref.get_submodule(n).weight.mul_(m.mask)
    torch.testing.assert_close(got, ref(images()), rtol=1e-5, atol=1e-5)
    densify_(model)
    assert linear_names(model) == linear_names(dense)
    torch.testing.assert_close(model(images()), ref(images()), rtol=1e-5, atol=1e-5)
