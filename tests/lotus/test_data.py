import numpy as np
import pytest
import torch

from lotus import LotusError
from lotus.data import load_npz, normalize, split

from ._tiny import make_npz


def test_load_npz_roundtrip(tmp_path):
    p = make_npz(tmp_path / "d.npz", n=10, size=8, classes=3)
    d = load_npz(p)
    with np.load(p) as f:
        assert torch.equal(d.x, torch.from_numpy(f["x"])) and torch.equal(d.y, torch.from_numpy(f["y"]))
    assert d.x.dtype == torch.uint8 and d.num_classes == int(d.y.max()) + 1 and d.img_size == 8
    assert load_npz(p, num_classes=7).num_classes == 7


@pytest.mark.parametrize("override, match", [
    (dict(x=None), "lacks key.*x"),
    (dict(y=None), "lacks key.*y"),
    (dict(x=np.zeros((4, 3, 8, 8), np.float32)), "x must be uint8"),
    (dict(x=np.zeros((4, 8, 8), np.uint8)), r"shape \[N, 3, H, W\]"),
    (dict(x=np.zeros((4, 1, 8, 8), np.uint8)), r"shape \[N, 3, H, W\]"),
    (dict(x=np.zeros((4, 3, 8, 6), np.uint8)), "square"),
    (dict(y=np.zeros(64, np.int32)), "y must be int64"),
    (dict(y=np.zeros(5, np.int64)), r"y must have shape \[N\] = \[64\]"),
    (dict(y=np.full(64, -1, np.int64)), "labels out of range: found -1"),
])
def test_load_npz_rejects_bad_files(tmp_path, override, match):
    p = make_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(LotusError, match=match):
        load_npz(p)


def test_load_npz_label_range_and_missing_and_corrupt(tmp_path):
    p = make_npz(tmp_path / "d.npz", classes=4)
    with pytest.raises(LotusError, match=r"labels out of range: found 3, expected labels in \[0, 2\)"):
        load_npz(p, num_classes=2)
    with pytest.raises(LotusError, match="file not found"):
        load_npz(tmp_path / "nope.npz")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(p.read_bytes()[:100])
    with pytest.raises(LotusError, match="cannot read"):
        load_npz(bad)


def test_split_is_deterministic_disjoint_and_complete():
    tr, va = split(50, 0.2, seed=3)
    tr2, va2 = split(50, 0.2, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(va) == 10 and len(tr) == 40
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(50))
    assert not torch.equal(split(50, 0.2, seed=4)[1], va)
    with pytest.raises(LotusError, match="val-fraction"):
        split(50, 1.0, seed=0)


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out[0, 0], torch.full((2, 2), (1 - 0.4914) / 0.2470))
