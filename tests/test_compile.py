import torch

from lotus_kernels.ops import gather_tokens, patch_embed_gather, scatter_tokens

from .conftest import assert_compiled_matches_eager


def step(images, idx, w, b, pos):
    x = patch_embed_gather(images, idx, w, b, pos)
    y = gather_tokens(torch.tanh(x), idx[:, :3].clamp(max=x.shape[1] - 1))
    return scatter_tokens(y, idx[:, :3] % 5, 5).square().sum()


def test_torch_compile_fullgraph_forward_and_backward_match_eager():
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    idx = torch.tensor([[0, 3, 7, 15], [1, 2, 2, 9]])
    w, b, pos = (
        torch.randn(6, 3, 4, 4, requires_grad=True),
        torch.randn(6, requires_grad=True),
        torch.randn(1, 16, 6, requires_grad=True),
    )
    assert_compiled_matches_eager(step, (images, idx, w, b, pos), (images, w, b, pos), rtol=1e-4, atol=1e-4)


def test_opcheck_registrations():
    # torch's own checker: schema, fake (meta) impl, autograd registration agree with the kernels.
    idx = torch.tensor([[0, 3, 3], [1, 2, 0]])
    x = torch.randn(2, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.lotus_kernels.gather_tokens.default, (x, idx))
    torch.library.opcheck(
        torch.ops.lotus_kernels.scatter_tokens.default, (torch.randn(2, 3, 5, requires_grad=True), idx, 4)
    )
    images = torch.randn(2, 3, 8, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.lotus_kernels.im2col_gather.default, (images, idx, 4, 4))
    for by_token in (False, True):
        torch.library.opcheck(
            torch.ops.lotus_kernels.index_sum.default,
            (torch.randn(6, 5, requires_grad=True), idx.reshape(-1), 4, by_token),
        )
    torch.library.opcheck(
        torch.ops.lotus_kernels.patch_embed_gather.default,
        (images, idx, torch.randn(6, 3, 4, 4, requires_grad=True), torch.randn(6), None),
    )


def test_block_sparse_mixed_call_under_autocast_compiles():
    """fp32 x into a bf16 block-sparse op under autocast (the mixed call: fake impls give y bf16, dx
    fp32) compiles with fullgraph and matches eager."""
    from lotus_kernels.nn import BlockSparseLinear

    torch.manual_seed(0)
    layer = BlockSparseLinear.from_linear(torch.nn.Linear(64, 32), density=0.5, block_size=16)
    x = torch.randn(5, 64, requires_grad=True)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        return y.float().square().sum()

    (dx,) = assert_compiled_matches_eager(step, (x,), (x,), rtol=1e-2, atol=1e-2)
    assert dx.dtype == torch.float32
