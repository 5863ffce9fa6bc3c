"""A training step of a token-dropped, block-sparse ViT reads nothing back from the device (so on a
GPU it never waits for its queue and can be captured in a CUDA graph), and the whole step, forward +
backward + optimizer update, compiles into one graph.

On this CPU the GPU code path of the value checks is forced (``_checks.host_reads_are_free`` patched
to False: checks on the device instead of reads); on a GPU the same tests run on CUDA tensors, where
``torch.cuda.set_sync_debug_mode("error")`` also fails any synchronising call the counter could miss."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lotus_kernels import _checks, patch_vit, sparsify_

from ._host_reads import host_reads

timm = pytest.importorskip("timm")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_vit(device):
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5
    )
    patch_vit(model)
    sparsify_(model, sparsity=0.5, layout="block", block_size=16, include=["*.mlp.*"])
    return model.to(device).train()


def make_step(model, lr=0.05, momentum=0.9, amp=False):
    """Forward on the kept patches (under bf16 autocast with ``amp``), backward, SGD with momentum
    written out (torch.optim's step graph-breaks on purpose: optimizer.py ``_use_grad``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    bufs = [torch.zeros_like(p) for p in params]

    def step(images, keep_idx, labels):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images, keep_idx=keep_idx), labels)
        loss.backward()
        with torch.no_grad():
            for p, b in zip(params, bufs):
                b.mul_(momentum).add_(p.grad)
                p.add_(b, alpha=-lr)
                p.grad = None
        return loss.detach()

    return step


def batch(device, seed, ragged=False):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    labels = torch.randint(0, 5, (3,), generator=g)
    if ragged:
        keep = [torch.randperm(16, generator=g)[:k].sort().values.to(device) for k in (5, 16, 9)]
    else:
        keep = torch.rand(3, 16, generator=g).topk(8, dim=1).indices.sort(dim=1).values.to(device)
    return images.to(device), keep, labels.to(device)


@pytest.fixture
def gpu_checks(monkeypatch):
    """The value checks take their GPU path (device-side) whatever the device."""
    monkeypatch.setattr(_checks, "host_reads_are_free", lambda device: False)
    monkeypatch.delenv(_checks.ENV_SYNC_CHECKS, raising=False)


def sync_debug(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")


def no_sync_debug(device):
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("ragged", [False, True], ids=["keep_idx", "ragged"])
@pytest.mark.parametrize("device", DEVICES)
def test_train_step_reads_nothing_back(gpu_checks, device, ragged, amp):
    step = make_step(tiny_vit(device), amp=amp)
    step(*batch(device, 0, ragged))  # warm-up: the sparse layers' pattern checks run once per layer
    for seed in (1, 2):  # fresh keep indices every step, as in training
        args = batch(device, seed, ragged)
        sync_debug(device)
        try:
            with host_reads() as reads:
                step(*args)
        finally:
            no_sync_debug(device)
        assert reads == [], f"host reads in a training step: {reads}"


def test_the_counter_sees_host_reads():
    # The CPU path of the checks reads the index values (free on a CPU): the counter must see it,
    # else the zero above would prove nothing.
    step = make_step(tiny_vit("cpu"))
    step(*batch("cpu", 0))
    with host_reads() as reads:
        step(*batch("cpu", 1))
    assert any(r in ("Tensor.__int__", "aten._local_scalar_dense") for r in reads), reads
    with host_reads() as reads:
        x = torch.arange(5.0)
        x[x > 2].sum().item()
    assert "aten.index with a boolean mask" in reads and "Tensor.item" in reads


def test_device_side_checks_still_refuse_bad_indices(gpu_checks):
    # On the device path a bad index fails through torch._assert_async (synchronously on the CPU).
    model = tiny_vit("cpu")
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="idx: an index is out of range; expected values in \\[0, 16\\)"):
        model(images, keep_idx=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(RuntimeError, match="keep_idx: an index is out of range"):
        model(images, keep_idx=[torch.tensor([0]), torch.tensor([-1, 3])])


@pytest.mark.slow  # ~30 s of inductor compilation on 2 cores
@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"),
    reason="this torch cannot trace Tensor.backward() inside a graph (no trace_autograd_ops)",
)
@pytest.mark.parametrize("device", DEVICES)
def test_whole_train_step_compiles_fullgraph_and_matches_eager(device):
    eager_model = tiny_vit(device)
    compiled_model = copy.deepcopy(eager_model)
    eager, compiled = make_step(eager_model), make_step(compiled_model)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(compiled, fullgraph=True)
        for seed in range(3):
            args = batch(device, seed)
            torch.testing.assert_close(compiled(*args), eager(*args), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", [None, "triton"])  # PyTorch ops, or the Triton path's one check kernel
def test_varlen_attention_checks_cu_seqlens_on_the_device_when_max_seqlen_is_given(gpu_checks, backend):
    import lotus_kernels
    from lotus_kernels.ops import attention

    if backend is not None and not lotus_kernels.backends()[backend]:
        pytest.skip(f"no {backend} backend here")
    q = torch.randn(5, 2, 8)
    with lotus_kernels.use_backend(backend):
        with host_reads() as reads:
            out, sc = attention(q, q, q, cu_seqlens=torch.tensor([0, 2, 5]), max_seqlen=3, return_scores="cls")
        assert reads == [] and out.shape == q.shape and sc.shape == (5,)
        for cu, max_seqlen in (
            ([0, 3, 5], 2),
            ([0, 4, 3], 4),
            ([1, 2, 5], 4),
            ([0, 2, 4], 4),
            ([0, 2, 6], 4),
            ([0, 6, 5], 6),
            ([5], 4),
        ):
            for offsets in (torch.tensor(cu), torch.tensor(cu, dtype=torch.int32)):
                with pytest.raises(RuntimeError, match="cu_seqlens: expected non-decreasing offsets from 0 to T = 5"):
                    attention(q, q, q, cu_seqlens=offsets, max_seqlen=max_seqlen)


def test_positional_gradient_by_token_reads_nothing_back(gpu_checks):
    # The GPU path of the pos-embed gradient (sort-based index_put without torch's own range check,
    # which reads min/max back) runs here on CPU tensors.
    from lotus_kernels.ops.patch_embed_gather import table_grad

    rows, idx = torch.randn(40, 8), torch.randint(0, 16, (40,))
    with host_reads() as reads:
        got = table_grad(rows, idx, 16, by_token=True)
    assert reads == []
    torch.testing.assert_close(got, torch.zeros(16, 8).index_add_(0, idx, rows))


def test_remembered_checks_work_under_inference_mode():
    """Tensors made under ``torch.inference_mode`` have no version counter: the remembered checks must
    neither crash on them (they did: "Inference tensors do not track version counter") nor trust a
    memory they cannot keep. A model built in inference mode (every buffer an inference tensor) runs
    too, and a bad index is still refused on every call."""
    model = tiny_vit("cpu").eval()
    images, keep, _ = batch("cpu", 3)
    expected = model(images, keep_idx=keep).detach()
    with torch.inference_mode():
        keep_inf = keep.clone()  # an inference tensor
        assert torch.equal(model(images, keep_idx=keep_inf), expected)
        assert torch.equal(model(images, keep_idx=keep_inf), expected)  # second call: no stale memory
        bad = keep_inf.clone()
        bad[0, 0] = 16
        with pytest.raises(IndexError, match="out of range"):
            model(images, keep_idx=bad)
        built_inside = copy.deepcopy(tiny_vit("cpu")).eval()
    with torch.inference_mode():
        fresh = tiny_vit("cpu").eval()  # parameters and pattern buffers are inference tensors
        assert torch.equal(fresh(images, keep_idx=keep_inf), built_inside(images, keep_idx=keep))
