"""Under torch.autocast the ops take the autocast dtype, as F.linear / SDPA do, and gradients flow
back to the fp32 parameters (pruned weights' gradients stay exactly zero)."""

import pytest
import torch

from lotus_kernels.nn import BlockSparseLinear, MaskedLinear
from lotus_kernels.ops import attention


def _layers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    mask = torch.rand(32, 64) < 0.5
    return {
        "masked": MaskedLinear.from_linear(lin, mask),
        "block": BlockSparseLinear.from_linear(lin, density=0.5, block_size=16),
    }


@pytest.mark.parametrize("kind", ["masked", "block"])
def test_sparse_linears_follow_autocast(kind):
    layer = _layers()[kind]
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    params = dict(layer.named_parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())
    if kind == "masked":
        assert not params["weight"].grad[~layer.mask].any()


def test_attention_follows_autocast_and_leaves_float64_alone():
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, scores = attention(q, k, v, return_scores="cls")
        out64 = attention(q.double(), k.double(), v.double())
    assert out.dtype == torch.bfloat16 and out64.dtype == torch.float64
    torch.testing.assert_close(out.float(), attention(q, k, v), rtol=2e-2, atol=2e-2)


def test_block_sparse_fp32_input_needs_no_cast_nodes():
    """An fp32 input (a LayerNorm output under CPU bf16 autocast) goes into the block-sparse op as it is:
    no cast of x in the graph, dx comes back fp32 (from the kernels' fp32 sums on avx512_bf16) and
    matches the gradient of the same input cast first."""
    layer = _layers()["block"]
    x = torch.randn(7, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_cast = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_cast)
    x_edge = y.grad_fn.next_functions[0][0]  # the op's first input: x itself, not a cast of it
    assert type(x_edge).__name__ == "AccumulateGrad" and x_edge.variable is x
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    (dx_cast,) = torch.autograd.grad(y_cast.float().sum(), x)
    assert dx.dtype == torch.float32
    torch.testing.assert_close(dx, dx_cast, rtol=2**-7, atol=2**-7)
