"""sparsify_ on the torchvision / transformers / open_clip families, and layout="auto" (with an
injected fake timer: nothing here depends on how fast this machine is)."""

import json

import pytest
import torch

from lotus_kernels import patch_vit, sparsify_
from lotus_kernels.nn import BlockSparseLinear

from .test_families import make, output


def sparse_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, BlockSparseLinear)}


def per_layer(*names, layers=2, prefix):
    """``prefix`` with ``{i}`` for the layer index."""
    return {f"{prefix.format(i=i)}.{n}" for i in range(layers) for n in names}


EXPECTED = {
    # nn.MultiheadAttention keeps its fused in_proj (a Parameter, not a Linear) and its out_proj (read
    # by the functional attention, never called): the attention stays dense, the MLP is pruned.
    "tv": per_layer("mlp.0", "mlp.3", prefix="encoder.layers.encoder_layer_{i}"),
    "oc:tok": per_layer("mlp.c_fc", "mlp.c_proj", prefix="transformer.resblocks.{i}"),
    # transformers >= 5.10 names (q/k/v/o_proj, mlp.fc1/fc2); classifier / pooler / projection dense
    "hf:vit": per_layer(
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
        prefix="vit.layers.{i}",
    ),
    "hf:deit": per_layer(
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
        prefix="deit.layers.{i}",
    ),
    "hf:dinov2": per_layer(
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "mlp.fc1",
        "mlp.fc2",
        prefix="dinov2.encoder.layer.{i}",
    ),
    "hf:clip": per_layer(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
        prefix="vision_model.encoder.layers.{i}",
    ),
    "hf:siglip": per_layer(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
        prefix="encoder.layers.{i}",
    ),
}


# DINOv2 kept the older attention names for some 5.x releases (e.g. 5.17: attention.attention.query,
# attention.output.dense) after ViT / DeiT moved to q/k/v/o_proj: expect whichever the model has.
OLD_ATTENTION = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
}


def expected(family, model):
    names = {n for n, _ in model.named_modules()}
    want = EXPECTED[family]
    if family.startswith("hf") and not any(n.endswith("attention.q_proj") for n in names):
        for new, old in OLD_ATTENTION.items():
            want = {n.replace(new, old) for n in want}
    return want


@pytest.mark.parametrize("family", list(EXPECTED))
def test_default_targets_are_the_block_linears_and_heads_stay_dense(family):
    model = make(family).eval()
    if family.startswith("hf"):
        import transformers

        if tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 10):
            pytest.skip("layer names of transformers < 5.10 differ (query/key/value, intermediate/output)")
    patch_vit(model)
    want = expected(family, model)
    sparsify_(model, sparsity=0.5, layout="block", block_size=16)
    assert sparse_names(model) == want
    images = torch.randn(2, 3, 32, 32)
    out = output(model(images, keep_idx=torch.tensor([[0, 3, 9], [2, 5, 15]])))  # patched + sparse
    out.sum().backward()


def test_include_and_exclude_patterns_work_on_family_names():
    model = make("hf:vit")
    sparsify_(model, sparsity=0.5, layout="block", block_size=16, include=["*.mlp.*"], exclude=["vit.layers.1.*"])
    assert sparse_names(model) == {"vit.layers.0.mlp.fc1", "vit.layers.0.mlp.fc2"}
    with pytest.raises(ValueError, match="include: pattern 'encoder.layers.0.self_attention.in_proj' matches no"):
        sparsify_(make("tv"), sparsity=0.5, include=["encoder.layers.0.self_attention.in_proj"])


# ---------------------------------------------------------------- layout="auto"
class FakeTimer:
    """dense: 1 s per call; block b: ``speed[b]`` s for layers wider than 64 in, 3 s otherwise."""

    def __init__(self, speed):
        self.speed, self.calls = speed, []

    def __call__(self, case):
        self.calls.append(case)
        if case.layout == "dense":
            return 1.0
        return self.speed[int(case.layout[5:])] if case.in_features > 64 else 3.0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    monkeypatch.setenv("LOTUS_KERNELS_AUTO_CACHE", str(path))
    return path


def test_auto_keeps_slow_layers_dense_and_picks_the_fastest_block_size(cache):
    model = make("tv")
    timer = FakeTimer({16: 0.6, 32: 0.4, 64: 0.5})
    sparsify_(model, sparsity=0.5, layout="auto", measure=timer)
    # mlp.0 is 64 -> 128 (in 64: sparse "3 s", stays dense); mlp.3 is 128 -> 64: block 32 at 0.4 s
    assert sparse_names(model) == per_layer("mlp.3", prefix="encoder.layers.encoder_layer_{i}")
    assert {m.block_size for m in model.modules() if isinstance(m, BlockSparseLinear)} == {32}
    report = model.sparsify_report
    by = {c.name: c for c in report}
    assert by.keys() == EXPECTED["tv"]
    fc2 = by["encoder.layers.encoder_layer_0.mlp.3"]
    assert fc2.layout == "block" and fc2.block_size == 32 and fc2.speedup == pytest.approx(2.5)
    assert "2.50x dense (>= min_speedup 1)" in fc2.reason
    assert "0.33x dense (< min_speedup 1)" in by["encoder.layers.encoder_layer_0.mlp.0"].reason
    assert "block32" in str(report)
    # half of the chosen layers' blocks pruned (scope "global" among the layers of one block size)
    masks = [m.block_mask for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert sum(int(b.sum()) for b in masks) == sum(b.numel() for b in masks) // 2


def test_auto_min_speedup_and_the_cache(cache):
    timer = FakeTimer({16: 0.6, 32: 0.4, 64: 0.5})
    model = sparsify_(make("tv"), sparsity=0.5, layout="auto", measure=timer, min_speedup=3.0)
    assert sparse_names(model) == set()  # 2.5x is not enough
    assert all(c.layout == "dense" for c in model.sparsify_report)
    # one measurement per distinct case (2 shapes x (dense + 3 block sizes)), then the cached file
    assert len(timer.calls) == 2 * 4
    table = json.loads(cache.read_text())
    assert len(table) == 8 and all(f"threads={torch.get_num_threads()}" in k for k in table)

    def fail(case):
        raise AssertionError(f"measured again: {case}")

    sparsify_(make("tv"), sparsity=0.5, layout="auto", measure=fail)  # everything from the cache
    # another sparsity is another case: measured
    timer2 = FakeTimer({16: 0.6, 32: 0.4, 64: 0.5})
    sparsify_(make("tv"), sparsity=0.3, layout="auto", measure=timer2)
    assert len(timer2.calls) == 8


def test_auto_bad_arguments(cache):
    with pytest.raises(ValueError, match="masks: not used with layout 'auto'"):
        sparsify_(make("tv"), layout="auto", masks={})
    with pytest.raises(ValueError, match="min_speedup: expected a positive number"):
        sparsify_(make("tv"), sparsity=0.5, layout="auto", min_speedup=0, measure=FakeTimer({}))
    with pytest.raises(ValueError, match="measure: expected a positive time in seconds"):
        sparsify_(make("tv"), sparsity=0.5, layout="auto", measure=lambda case: 0.0)


def test_default_timer_runs_inside_sparsify(cache):
    """The real timer (under sparsify_'s no_grad) measures each case once; which layout wins is not tested."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    sparsify_(model, sparsity=0.5, layout="auto", tokens=8)
    assert [c.name for c in model.sparsify_report] == ["0", "2"]
    assert all(
        c.dense_ms > 0 and set(c.sparse_ms) == {16, 32} - ({32} if c.shape[0] == 16 else set())
        for c in model.sparsify_report
    )
    assert len(json.loads(cache.read_text())) == 3 + 2  # (dense, block16, block32) + (dense, block16)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    from lotus_kernels.sparse_auto import cache_path

    monkeypatch.delenv("LOTUS_KERNELS_AUTO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path() == tmp_path / "lotus_kernels" / "sparse_auto.json"
    monkeypatch.setenv("LOTUS_KERNELS_AUTO_CACHE", str(tmp_path / "x.json"))
    assert cache_path() == tmp_path / "x.json"
