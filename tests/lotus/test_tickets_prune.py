import pytest
import torch

from lotus.model import build
from lotus.prune import essential_sparsity, magnitude_masks, masks_of, soup_prune, sparsity_of, sweep, vote
from lotus.tickets import keep_indices, overlay_figure, score
from lotus.train import train

from .test_model import CFG
from .test_train import _data


def test_score_and_keep():
    data = _data(n=20)
    m = build(CFG, 3, 16)
    s = score(m, data, batch_size=8)
    assert s.shape == (20, 16) and torch.isfinite(s).all()
    assert torch.allclose(s, m.patch_scores(__import__("lotus.data").data.normalize(data.x)), atol=1e-5)
    k = keep_indices(s, 0.5)
    assert k.shape == (20, 8) and k.dtype == torch.int64
    top = s.gather(1, k).min(1).values
    dropped = s.masked_fill(torch.zeros_like(s, dtype=torch.bool).scatter_(1, k, True), float("-inf")).max(1).values
    assert (top >= dropped).all()
    fig = overlay_figure(data, s, 0.5, patch_size=4, n_images=3)
    assert len(fig.axes) == 9


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


def test_sweep_matches_sparsity():
    m = build(CFG, 3, 16)
    data = _data(n=16)
    pts = sweep(m, [0.0, 0.5], lambda x: sparsity_of(masks_of(x)))
    assert [p["accuracy"] for p in pts] == pytest.approx([0.0, 0.5], abs=1e-3)


@pytest.mark.parametrize("merge, offsets", [("majority", (0.0,)), ("any", (0.0, 0.2))])
def test_soup_prune(merge, offsets):
    data = _data(n=32)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    calls = []

    def train_copy(model, d, seed, desc):
        calls.append((len(d), seed))
        train(model, d, None, epochs=1, lr=1e-3, batch_size=8, seed=seed)

    cache = {}
    soup, masks, log = soup_prune(m, data, target=0.4, rounds=2, copies=3, subset=0.5, train_copy=train_copy,
                                  merge=merge, seed=1, offsets=offsets, weak_cache=cache)
    assert len(calls) == 6 and all(n == 16 for n, _ in calls) and len({s for _, s in calls}) == 6
    assert [r["round_target"] for r in log] == pytest.approx([0.2, 0.4])
    assert masks_of(soup).keys() == masks.keys()
    actual = sparsity_of(masks)
    assert actual == pytest.approx(log[-1]["merged_sparsity"])
    if merge == "majority":
        assert abs(actual - 0.4) < 0.05
    else:  # a union of masks at 0.4 and 0.6 keeps more than either
        assert 0.2 < actual <= 0.4 + 1e-6
    for n, layer in soup.named_modules():
        if n in masks:
            assert (layer.weight[~masks[n]] == 0).all()
    # round-1 copies are cached, so a second run (e.g. ISSP after ISP) trains only round 2
    calls.clear()
    soup_prune(m, data, target=0.4, rounds=2, copies=3, subset=0.5, train_copy=train_copy, merge="any", seed=1,
               offsets=(0.0, 0.1), weak_cache=cache)
    assert len(calls) == 3
    assert magnitude_masks(m, 0.0).keys() == masks.keys()
