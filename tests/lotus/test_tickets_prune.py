import math

import pytest
import torch

from lotus.data import normalize
from lotus.model import build
from lotus.prune import (
    Pruner,
    block_counts,
    check_layout,
    disagreement,
    essential_sparsity,
    instant_soup_prune,
    magnitude_masks,
    masks_of,
    soup_prune,
    sparsity_of,
    sweep,
    vote,
)
from lotus.tickets import POLICIES, keep_indices, make_policy, overlay_figure, score, ticket_predict
from lotus.train import train
from lotus_kernels import sparsify_
from lotus_kernels.nn import BlockSparseLinear
from lotus_kernels.vit_scores import apply_patch_sink, outliers

from .test_model import CFG
from .test_train import _data


# ---------------------------------------------------------------- tickets and sink rules
def test_score_and_keep():
    data = _data(n=20)
    m = build(CFG, 3, 16)
    s = score(m, data, batch_size=8)
    assert s.shape == (20, 16) and torch.isfinite(s).all()
    assert torch.allclose(s, m.patch_scores(normalize(data.x)), atol=1e-5)
    k = keep_indices(s, 0.5)
    assert k.shape == (20, 8) and k.dtype == torch.int64
    top = s.gather(1, k).min(1).values
    dropped = s.masked_fill(torch.zeros_like(s, dtype=torch.bool).scatter_(1, k, True), float("-inf")).max(1).values
    assert (top >= dropped).all()
    s2, flagged = score(m, data, batch_size=8, sink="outlier", return_flagged=True)
    fig = overlay_figure(data, s2, 0.5, patch_size=4, n_images=3, flagged=flagged, rule="outlier")
    assert len(fig.axes) == 9 and fig.axes[3].get_ylabel().startswith("CLS attention, last block")
    fig = overlay_figure(data, s2, 0.5, patch_size=4, n_images=3, blocks="mean")
    assert fig.axes[3].get_ylabel() == "CLS attention, mean of blocks"  # the score row names its blocks


def test_scores_from_the_mean_of_blocks_reach_the_policies():
    torch.manual_seed(0)
    data = _data(n=12)
    m = build(dict(CFG, depth=2), 3, 16).eval()
    x = normalize(data.x)
    s = score(m, data, batch_size=5, sink="none", blocks="mean")
    assert torch.allclose(s, m.patch_scores(x, None, blocks="mean"), atol=1e-6)
    assert not torch.allclose(s, score(m, data, batch_size=5, sink="none"), atol=1e-4)
    idx = torch.arange(len(data))
    for policy in ("rescore_step", "aug_rescore"):
        fn, _ = make_policy(policy, model=m, train_data=data, scores=s, keep=0.5, seed=1, sink="none", blocks="mean")
        assert torch.equal(fn(x, idx), keep_indices(s, 0.5))
    fn, _ = make_policy("rescore_epoch", model=m, train_data=data, scores=s, keep=0.5, seed=1, blocks="mean")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fn.new_epoch(m, 1)
    assert torch.equal(fn.table, keep_indices(score(m, data, sink="first", blocks="mean"), 0.5))


def test_outlier_rule_replaces_only_outliers_by_the_mean():
    s = torch.tensor([[1.0, 1.1, 0.9, 1.0, 9.0, 1.05, 0.95, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    f = outliers(s)
    assert f.tolist() == [[False] * 4 + [True] + [False] * 3, [False] * 8]  # a flat row flags nothing
    out = apply_patch_sink(s, f)
    assert out[0, 4] == pytest.approx(float(s[0, [0, 1, 2, 3, 5, 6, 7]].mean()))
    assert torch.equal(out[:, [0, 1, 2, 3, 5, 6, 7]], s[:, [0, 1, 2, 3, 5, 6, 7]]) and torch.equal(out[1], s[1])


def test_sink_rules_on_a_vit():
    torch.manual_seed(0)
    m = build(CFG, 3, 16).eval()
    x = torch.randn(4, 3, 16, 16)
    raw = m.patch_scores(x, None)
    # LOTUS's literal rule only rewrites the class token's own score, which is dropped: no patch changes
    assert torch.equal(m.patch_scores(x, "first"), raw)
    out, f = m.patch_scores(x, "outlier", return_flagged=True)
    assert torch.equal(f, outliers(raw.log(), 3.5)) and torch.allclose(out, apply_patch_sink(raw, f))
    # the norm rule flags by the tokens entering the last block, computed here independently
    seen = []
    h = m.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, 1:].norm(dim=-1)))
    m(x)
    h.remove()
    out, f = m.patch_scores(x, "norm", return_flagged=True)
    assert torch.equal(f, outliers(seen[0])) and torch.allclose(out, apply_patch_sink(raw, f))
    with pytest.raises(ValueError, match="sink"):
        m.patch_scores(x, "mean")


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_keep_the_same_token_count(policy):
    data = _data(n=12)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    s = score(m, data)
    fn, augment = make_policy(policy, model=m, train_data=data, scores=s, keep=0.6, seed=1, sink="norm")
    assert augment == (policy == "aug_rescore")
    idx = torch.tensor([3, 0, 7])
    x = normalize(data.x[idx])
    k = fn(x, idx)
    want = math.ceil(0.6 * 16)
    assert k.shape == (3, want) and k.dtype == torch.int64
    assert (k.diff(dim=1) > 0).all() and k.min() >= 0 and k.max() < 16  # sorted, distinct, in range
    if policy == "fixed":
        assert torch.equal(k, keep_indices(s, 0.6)[idx])
    if policy == "mix":  # the top half of the kept patches by the fixed scores are always there
        top = torch.sort(s[idx], dim=1, descending=True, stable=True).indices[:, : round(0.5 * want)]
        assert all(set(t.tolist()) <= set(r.tolist()) for t, r in zip(top, k))
    if policy in ("random", "mix"):
        assert not torch.equal(fn(x, idx), fn(x, idx))  # redrawn every step
    if policy in ("fixed", "fixed_random"):
        assert torch.equal(fn(x, idx), k)
    if policy == "rescore_epoch":
        fn.new_epoch(m, 0)
        assert torch.equal(fn(x, idx), k)  # the first epoch uses the start model's tickets
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        fn.new_epoch(m, 1)
        assert torch.equal(fn.table, keep_indices(score(m, data, sink="norm"), 0.6))
    if policy in ("rescore_step", "aug_rescore"):
        assert torch.equal(k, keep_indices(m.patch_scores(x, "norm"), 0.6))
    with pytest.raises(ValueError):
        make_policy("best", model=m, train_data=data, scores=s, keep=0.6, seed=1)
    p = ticket_predict(m, data, keep_indices(s, 0.5))
    assert p.shape == (12,) and p.dtype == torch.int64
    assert torch.equal(p, m.eval()(normalize(data.x), keep_idx=keep_indices(s, 0.5)).argmax(1))


# ---------------------------------------------------------------- masks per layout
def test_essential_sparsity_rule():
    pts = [{"sparsity": s, "accuracy": a} for s, a in [(0, 80), (0.1, 79.5), (0.2, 79.2), (0.3, 78.5), (0.4, 80)]]
    assert essential_sparsity(pts, 1.0) == 0.2  # 0.4 is back in tolerance but 0.3 broke the chain
    assert essential_sparsity(pts, 2.0) == 0.4
    assert essential_sparsity(pts[:1], 1.0) == 0
    with pytest.raises(ValueError, match="sparsity 0"):
        essential_sparsity(pts[1:], 1.0)


def test_vote():
    a = {"l": torch.tensor([True, True, False, False])}
    b = {"l": torch.tensor([True, False, True, False])}
    c = {"l": torch.tensor([True, False, False, False])}
    assert vote([a, b, c], "any")["l"].tolist() == [True, True, True, False]
    assert vote([a, b, c], "majority")["l"].tolist() == [True, False, False, False]
    assert vote([a, b], "majority")["l"].tolist() == [True, False, False, False]
    assert vote([a, b, c], "all")["l"].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="vote"):
        vote([a], "some")
    d = disagreement([a, b, c])
    assert d["jaccard"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3) and d["single_copy_share"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("score_name", ["l1", "l2", "grad"])
def test_block_masks_exact_counts_and_pruned_blocks_stay_zero(score_name):
    torch.manual_seed(0)
    data = _data(n=24)
    m = build(CFG, 3, 16)  # qkv [96, 32], proj [32, 32], fc1 [64, 32], fc2 [32, 64] x 2 blocks: 64 blocks of 16x16
    pr = Pruner(layout="block", block_size=16, score=score_name, grad_data=data, grad_images=16)
    masks = pr.masks(m, 0.3)
    counts = block_counts(masks, 16)  # raises unless every mask is constant on 16x16 blocks
    assert sum(t for _, t in counts.values()) == 64
    assert sum(t - k for k, t in counts.values()) == round(0.3 * 64)
    assert sparsity_of(masks) == pytest.approx(round(0.3 * 64) / 64)
    # the pruned blocks are those of lowest score, over all layers together
    sc = pr.scores(m)
    kept = torch.cat([sc[n].flatten()[masks[n][::16, ::16].flatten()] for n in sc])
    pruned = torch.cat([sc[n].flatten()[~masks[n][::16, ::16].flatten()] for n in sc])
    assert pruned.max() <= kept.min()
    # fine-tune on BlockSparseLinear: only the kept blocks are stored and train; pruned blocks stay zero
    sparsify_(m, masks=masks, layout="block", block_size=16)
    assert sum(isinstance(x, BlockSparseLinear) for x in m.modules()) == 8 and not isinstance(m.head, BlockSparseLinear)
    before = {n: x.weight.clone() for n, x in m.named_modules() if isinstance(x, BlockSparseLinear)}
    train(m, data, None, epochs=1, lr=1e-2, batch_size=8, seed=0)
    for n, x in m.named_modules():
        if isinstance(x, BlockSparseLinear):
            w = x.weight
            assert (w[~masks[n]] == 0).all() and not torch.equal(w, before[n])
    assert masks_of(m).keys() == masks.keys() and all(torch.equal(masks_of(m)[n], masks[n]) for n in masks)


def test_unstructured_and_24_masks():
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    u = magnitude_masks(m, 0.4)
    total = sum(x.numel() for x in u.values())
    assert sum(int((~x).sum()) for x in u.values()) == round(0.4 * total)
    s = Pruner(layout="2:4").masks(m, 0.5)
    for n, x in s.items():
        assert (x.reshape(x.shape[0], -1, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="2:4"):
        Pruner(layout="2:4").masks(m, 0.3)


def test_check_layout_names_the_layer():
    from lotus import LotusError

    m = build(CFG, 3, 16)
    check_layout(m, "block", 16)
    check_layout(m, "2:4", 16)
    with pytest.raises(LotusError, match=r"--block-size: 64 does not divide blocks\.0\.attn\.qkv\.weight \[96, 32\]"):
        check_layout(m, "block", 64)
    with pytest.raises(LotusError, match="--layout"):
        check_layout(m, "rows", 16)


def test_sweep_matches_sparsity():
    m = build(CFG, 3, 16)
    pts = sweep(m, [0.0, 0.5], lambda x: sparsity_of(masks_of(x)) if masks_of(x) else 0.0)
    assert [p["accuracy"] for p in pts] == pytest.approx([0.0, 0.5], abs=1e-3)
    pts = sweep(
        m,
        [0.0, 0.25],
        lambda x: sparsity_of(masks_of(x)) if masks_of(x) else 0.0,
        Pruner(layout="block", block_size=16),
    )
    assert [p["accuracy"] for p in pts] == pytest.approx([0.0, 16 / 64])


# ---------------------------------------------------------------- ISP / ISSP / control / Instant Soup
def _copy_trainer(calls, lr=1e-2):
    def train_copy(model, d, seed, desc):
        calls.append((len(d), seed, False))
        train(model, d, None, epochs=1, lr=lr, batch_size=8, seed=seed)

    return train_copy


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_soup_prune_isp_issp(layout):
    data = _data(n=32)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    pr = Pruner(layout=layout, block_size=16)
    calls, cache = [], {}
    isp, masks, log = soup_prune(
        m,
        data,
        target=0.4,
        rounds=2,
        copies=3,
        subset=0.5,
        train_copy=_copy_trainer(calls),
        merge="majority",
        seed=1,
        pruner=pr,
        weak_cache=cache,
    )
    assert len(calls) == 6 and all(n == 16 for n, _, _ in calls) and len({s for _, s, _ in calls}) == 6
    assert [r["round_target"] for r in log] == pytest.approx([0.2, 0.4])
    assert all(r["reused_cost"] == {"wall": 0.0, "cpu": 0.0} for r in log)  # every copy trained here
    assert masks_of(isp).keys() == masks.keys() and sparsity_of(masks) == pytest.approx(log[-1]["merged_sparsity"])
    for n, layer in isp.named_modules():
        if n in masks:
            assert (layer.weight[~masks[n]] == 0).all()
    if layout == "block":
        block_counts(masks, 16)  # block-constant
    # ISSP: a union calibrated to the target: its sparsity is the target (to one pruning unit), each copy
    # prunes harder, and the union keeps weights that a single copy alone would not
    calls.clear()
    issp, umasks, ulog = soup_prune(
        m,
        data,
        target=0.4,
        rounds=2,
        copies=3,
        subset=0.5,
        train_copy=_copy_trainer(calls),
        merge="union",
        seed=1,
        pruner=pr,
        weak_cache=cache,
    )
    assert len(calls) == 3  # round-1 copies shared with ISP (same start, same seeds) ...
    assert ulog[0]["reused_cost"]["cpu"] > 0 and ulog[1]["reused_cost"]["cpu"] == 0  # ... and their cost counted
    unit = 1 / sum(x.numel() for x in umasks.values()) * pr.granule()
    assert abs(sparsity_of(umasks) - 0.4) <= 3 * unit * 3 + 1e-9
    assert all(r["copy_sparsity"] >= r["round_target"] - 1e-9 for r in ulog)
    assert ulog[-1]["single_copy_share"] > 0 and ulog[-1]["jaccard"] < 1  # not one copy's mask


@pytest.mark.parametrize("layout", ["unstructured", "block"])
def test_instant_soup_prune_as_published(layout):
    data = _data(n=40)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    pr = Pruner(layout=layout, block_size=16, score="l1")
    calls, mains, lrs = [], [], iter([1e-3 * (0.9**t) for t in range(100)])

    def train_main(model, d, seed):
        mains.append((len(d), masks_of(model) and sparsity_of(masks_of(model))))
        train(model, d, None, epochs=1, lr=1e-3, batch_size=8, seed=seed)
        return next(lrs)

    def train_copy(model, d, seed, desc, lr):
        calls.append((len(d), lr))
        train(model, d, None, epochs=1, lr=lr, batch_size=8, seed=seed)

    main, masks, log = instant_soup_prune(
        m,
        data,
        target=0.5,
        copies=5,
        copy_subset=0.1,
        main_subset=0.5,
        step=0.2,
        stop_within=0.05,
        train_copy=train_copy,
        train_main=train_main,
        seed=3,
        pruner=pr,
    )
    its = [r for r in log if r["round"] != "final"]
    # the main model trains on half of the data before every iteration, and once more before it stops
    assert len(mains) == len(its) + 1 and all(n == 20 for n, _ in mains)
    assert len(calls) == 5 * len(its) and all(n == 4 for n, _ in calls)  # K = 5 copies on 10% each
    assert [lr for _, lr in calls[::5]] == pytest.approx([1e-3 * 0.9**t for t in range(len(its))])  # carried lr
    prev = 0.0
    for r in its:  # each copy prunes another 20% of what is left; the union keeps what any copy keeps
        assert 0.5 - prev >= 0.05  # iterates only while more than 5 points from the target
        assert r["round_target"] == pytest.approx(1 - (1 - prev) * 0.8)
        assert all(s == pytest.approx(r["round_target"], abs=0.02) for s in r["copy_sparsities"])
        assert prev <= r["merged_sparsity"] <= r["round_target"] + 1e-9
        prev = r["merged_sparsity"]
    assert 0.5 - prev < 0.05 and log[-1]["round"] == "final"
    # then one-shot to the target (a last union that overshot it stays, as in the published code)
    assert sparsity_of(masks) == pytest.approx(max(0.5, prev), abs=1e-3)
    for n, layer in main.named_modules():
        if n in masks:
            assert (layer.weight[~masks[n]] == 0).all()


def test_arm_names():
    from lotus.finetune import default_arms, parse_arm

    assert parse_arm("dense/full") == {
        "start": "dense",
        "layout": "dense",
        "method": None,
        "policy": "full",
        "keep": None,
        "budget": None,
    }
    assert parse_arm("block-isp/random@0.7") == {
        "start": "block-isp",
        "layout": "block",
        "method": "isp",
        "policy": "random",
        "keep": 0.7,
        "budget": None,
    }
    assert parse_arm("dense/matched-cheapest")["budget"] == "matched-cheapest"
    assert parse_arm("2:4-control/mix")["layout"] == "2:4"
    for bad in (
        "dense",
        "block-isp/full@0.5",
        "rows-isp/full",
        "block-soup/full",
        "dense/best",
        "dense/fixed@1.5",
        "dense/fixed@x",
        "block-isp/matched-headline",
    ):
        with pytest.raises(ValueError, match="arm"):
            parse_arm(bad)
    arms = default_arms("block", ["fixed", "random"], extra_keeps=[0.7])
    assert arms == [
        "dense/full",
        "unstructured-isp/full",
        "block-isp/full",
        "dense/fixed",
        "dense/fixed_random",
        "dense/random",
        "block-isp/fixed",
        "block-isp/random",
        "block-isp/fixed@0.7",
        "block-isp/random@0.7",
    ]
    assert default_arms("unstructured", ["fixed"])[:3] == ["dense/full", "unstructured-isp/full", "dense/fixed"]


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_pruned_moments_zeroed_in_the_optimizers_own_order(weight_decay):
    """timm's optimizer factory numbers parameters by group (undecayed, then decayed) when weight
    decay is on: the moments zeroed must be those of the pruned layer's own weight."""
    from lotus.prune import _mask_optimizer_state
    from lotus.train import make_optimizer

    data = _data(n=16)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    sparsify_(m, sparsity=0.0)
    state = {}
    train(m, data, None, epochs=1, lr=1e-3, batch_size=8, seed=0, weight_decay=weight_decay, optimizer_state=state)
    masks = magnitude_masks(m, 0.5)
    before = make_optimizer(m, "adamw", 1e-3, weight_decay)
    before.load_state_dict(state)
    old = {id(p): {k: v.clone() for k, v in st.items()} for p, st in before.state.items()}
    _mask_optimizer_state(m, state, masks)
    after = make_optimizer(m, "adamw", 1e-3, weight_decay)
    after.load_state_dict(state)
    layers = dict(m.named_modules())
    pruned = {id(layers[n].weight): mk for n, mk in masks.items()}
    for p, st in after.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            if id(p) in pruned:
                mk = pruned[id(p)]
                assert (st[k][~mk] == 0).all() and torch.equal(st[k][mk], old[id(p)][k][mk])
                assert (old[id(p)][k][~mk] != 0).any()  # there was something to zero
            else:
                assert torch.equal(st[k], old[id(p)][k])  # other parameters untouched
