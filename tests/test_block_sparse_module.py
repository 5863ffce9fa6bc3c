import copy
import io

import pytest
import torch
from torch import nn

from lotus_kernels import densify_, sparsify_
from lotus_kernels.nn import BlockSparseLinear, MaskedLinear
from tests.conftest import assert_compiled_matches_eager
from tests.test_sparsify import images, linear_names, tiny_vit


def blocks_of(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


def block_masked(weight, block_mask, bs):
    o, i = weight.shape
    return (weight.view(o // bs, bs, i // bs, bs) * block_mask[:, None, :, None]).view(o, i)


# ---------------------------------------------------------------- the module
def test_from_linear_to_linear_is_exact_for_block_and_elementwise_masks():
    lin = nn.Linear(64, 96)
    bm = torch.rand(6, 4) < 0.5
    layer = BlockSparseLinear.from_linear(lin, bm, block_size=16)
    assert torch.equal(layer.block_mask, bm) and layer.density == pytest.approx(float(bm.float().mean()))
    back = layer.to_linear()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, block_masked(lin.weight, bm, 16)) and torch.equal(back.bias, lin.bias)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), back(x), rtol=1e-5, atol=1e-5)
    # Elementwise mask: a block is kept whole if any of its entries is.
    em = torch.zeros(96, 64, dtype=torch.bool)
    em[0, 0] = em[95, 63] = True
    layer = BlockSparseLinear.from_linear(lin, em, block_size=32)
    want = torch.zeros(3, 2, dtype=torch.bool)
    want[0, 0] = want[2, 1] = True
    assert torch.equal(layer.block_mask, want)
    assert torch.equal(layer.weight, block_masked(lin.weight, want, 32))


def test_density_keeps_the_largest_l2_blocks_and_none_means_dense():
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(4.0).repeat_interleave(16)[None, :].expand(64, 64))  # block cols 0 < 1 < 2 < 3
    layer = BlockSparseLinear.from_linear(lin, density=0.5, block_size=16)
    assert layer.block_mask[:, 2:].all() and not layer.block_mask[:, :2].any() and layer.bias is None
    assert BlockSparseLinear.from_linear(lin, block_size=16).density == 1.0


def test_constructor_is_linear_like():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.25)
    assert layer.values.shape == (2, 16, 16) and layer.bias.shape == (32,) and layer.bias.requires_grad
    assert layer(torch.randn(3, 7, 64)).shape == (3, 7, 32)
    assert "density=0.250" in repr(layer)


def test_optimizer_step_changes_only_stored_values():
    lin = nn.Linear(64, 64)
    bm = torch.rand(4, 4) < 0.5
    layer = BlockSparseLinear.from_linear(lin, bm, block_size=16)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = layer.weight.detach().clone()
    layer(torch.randn(8, 64)).square().sum().backward()
    opt.step()
    after = layer.weight.detach()
    keep = bm.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert not after[~keep].any()
    assert (after[keep] != before[keep]).all()
    assert [n for n, _ in layer.named_parameters()] == ["values", "bias"]


def test_state_dict_round_trip_and_pattern_mismatch():
    lin = nn.Linear(64, 32)
    bm = torch.rand(2, 4) < 0.6
    layer = BlockSparseLinear.from_linear(lin, bm, block_size=16)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = BlockSparseLinear.from_linear(nn.Linear(64, 32), bm, block_size=16)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), layer(x))
    other = BlockSparseLinear.from_linear(nn.Linear(64, 32), ~bm, block_size=16)
    with pytest.raises(RuntimeError, match="the state dict's block pattern .* differs from this layer's"):
        other.load_state_dict(layer.state_dict())


def test_torch_compile_fullgraph_forward_backward_matches_eager():
    layer = BlockSparseLinear.from_linear(nn.Linear(64, 48), torch.rand(3, 4) < 0.5, block_size=16)
    x = torch.randn(2, 5, 64, requires_grad=True)
    assert_compiled_matches_eager(lambda x: torch.tanh(layer(x)).square().sum(), (x,), (x, layer.values, layer.bias))


BAD = [
    (lambda: BlockSparseLinear(48, 64, block_size=32), ValueError, r"block_size: 32 does not divide"),
    (lambda: BlockSparseLinear(64, 64, block_size=8), ValueError, "block_size: expected one of 16, 32, 64, got 8"),
    (
        lambda: BlockSparseLinear(64, 64, density=0.0),
        ValueError,
        r"density: expected a fraction of blocks to keep in \(0, 1\]",
    ),
    (
        lambda: BlockSparseLinear.from_linear(nn.Linear(64, 64), torch.ones(2, 2, dtype=torch.bool), density=0.5),
        ValueError,
        "mask / density: give at most one",
    ),
    (
        lambda: BlockSparseLinear.from_linear(nn.Linear(64, 64), torch.ones(3, 2, dtype=torch.bool)),
        ValueError,
        r"mask: expected an elementwise mask of shape \(64, 64\) or a block mask of shape \(2, 2\)",
    ),
    (
        lambda: BlockSparseLinear.from_linear(nn.Linear(64, 64), torch.ones(2, 2)),
        TypeError,
        "mask: expected a bool tensor",
    ),
    (lambda: BlockSparseLinear.from_linear(nn.Conv2d(1, 1, 1)), TypeError, "linear: expected an nn.Linear"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_is_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- sparsify_(layout="block")
def test_sparsify_block_global_prunes_exact_fraction_of_smallest_blocks():
    model = tiny_vit()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    sparsify_(model, sparsity=0.5, layout="block", block_size=16)
    layers = blocks_of(model)
    assert sorted(layers) == sorted(n for n in before if n != "head")
    total = sum(m.block_mask.numel() for m in layers.values())
    kept = sum(int(m.block_mask.sum()) for m in layers.values())
    assert total - kept == round(0.5 * total)
    norms = {
        n: before[n].view(m.out_features // 16, 16, m.in_features // 16, 16).square().sum((1, 3)).sqrt()
        for n, m in layers.items()
    }
    # global: a layer may keep all its blocks or none, so compare over all layers at once
    kept_min = torch.cat([norms[n][m.block_mask] for n, m in layers.items()]).min()
    pruned_max = torch.cat([norms[n][~m.block_mask] for n, m in layers.items()]).max()
    assert pruned_max <= kept_min
    for n, m in layers.items():
        assert torch.equal(m.weight, block_masked(before[n], m.block_mask, 16))


def test_sparsify_block_layer_scope_and_outputs_match_a_block_masked_dense_model():
    dense = tiny_vit()
    model = sparsify_(
        copy.deepcopy(dense), sparsity=0.5, layout="block", block_size=16, scope="layer", include=["*.mlp.*"]
    )
    layers = blocks_of(model)
    assert sorted(layers) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    ref = copy.deepcopy(dense)
    for n, m in layers.items():
        assert int((~m.block_mask).sum()) == round(0.5 * m.block_mask.numel())
        with torch.no_grad():
            ref.get_submodule(n).weight.copy_(m.weight)
    x = images()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for n, m in layers.items():
        want = ref.get_submodule(n).weight.grad
        got = torch.zeros_like(want)
        bs = 16
        for k, (r, c) in enumerate(m.block_mask.nonzero().tolist()):
            got[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs] = m.values.grad[k]
        torch.testing.assert_close(got, block_masked(want, m.block_mask, bs), rtol=1e-4, atol=1e-5)


def test_sparsify_block_state_dict_round_trip_and_densify():
    model = sparsify_(tiny_vit(), sparsity=0.4, layout="block", block_size=16)
    with torch.no_grad():
        for m in blocks_of(model).values():
            m.values.add_(0.01)  # "trained" values
    fresh = sparsify_(tiny_vit(), sparsity=0.4, layout="block", block_size=16)
    fresh.load_state_dict(model.state_dict())
    x = images()
    want = model(x)
    assert torch.equal(fresh(x), want)
    densify_(fresh)
    assert not blocks_of(fresh) and linear_names(fresh) == linear_names(tiny_vit())
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)


def test_sparsify_block_with_masks_and_resparsify_from_other_layouts():
    model = tiny_vit()
    fc1 = model.blocks[0].mlp.fc1
    bm = torch.rand(fc1.out_features // 16, fc1.in_features // 16) < 0.5
    masks = {"blocks.0.mlp.fc1": bm}
    sparsify_(model, masks=masks, layout="block", block_size=16)
    assert list(masks) == ["blocks.0.mlp.fc1"] and masks["blocks.0.mlp.fc1"] is bm  # the caller's dict is untouched
    assert torch.equal(model.blocks[0].mlp.fc1.block_mask, bm)
    model = sparsify_(tiny_vit(), sparsity=0.3)  # unstructured first, then block on top
    sparsify_(model, sparsity=0.5, layout="block", block_size=32)
    assert not any(isinstance(m, MaskedLinear) for m in model.modules()) and len(blocks_of(model)) == 8


SPARSIFY_BAD = [
    (
        lambda m: sparsify_(m, sparsity=0.5, layout="block", block_size=64),
        ValueError,
        r"block_size: 64 does not divide blocks.0.attn.qkv.weight's shape \(96, 32\)",
    ),
    (
        lambda m: sparsify_(m, sparsity=0.5, layout="block", block_size=24),
        ValueError,
        "block_size: expected one of 16, 32, 64, got 24",
    ),
    (
        lambda m: sparsify_(
            m,
            masks={"head": torch.ones(3, 3, dtype=torch.bool)},
            layout="block",
            block_size=16,
        ),
        ValueError,
        r"block_size: 16 does not divide head.weight's shape \(10, 32\)",
    ),
    (
        lambda m: sparsify_(
            m, masks={"blocks.0.mlp.fc1": torch.ones(3, 3, dtype=torch.bool)}, layout="block", block_size=16
        ),
        ValueError,
        r"masks\['blocks.0.mlp.fc1'\]: expected an elementwise mask",
    ),
]


@pytest.mark.parametrize("call,exc,match", SPARSIFY_BAD)
def test_sparsify_block_bad_input(call, exc, match):
    model = tiny_vit()
    with pytest.raises(exc, match=match):
        call(model)
    assert not blocks_of(model)
