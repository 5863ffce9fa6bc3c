import numpy as np
import pytest
import torch

from lotus import LotusError
from lotus.data import (
    Images,
    ImageSet,
    default_config,
    load_eval,
    load_image_folder,
    load_npz,
    load_split,
    loader,
    my_positions,
    normalize,
    split,
    stratified,
)

from ._tiny import make_fake_cifar10, make_image_folder, make_npz, patch_cifar_md5


def test_load_npz_roundtrip(tmp_path):
    p = make_npz(tmp_path / "d.npz", n=10, size=8, classes=3)
    d = load_npz(p)
    with np.load(p) as f:
        assert torch.equal(d.x, torch.from_numpy(f["x"])) and torch.equal(d.y, torch.from_numpy(f["y"]))
    assert d.x.dtype == torch.uint8 and d.num_classes == int(d.y.max()) + 1 and d.img_size == 8
    assert load_npz(p, num_classes=7).num_classes == 7


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(x=None), "lacks key.*x"),
        (dict(y=None), "lacks key.*y"),
        (dict(x=np.zeros((4, 3, 8, 8), np.float32)), "x must be uint8"),
        (dict(x=np.zeros((4, 8, 8), np.uint8)), r"shape \[N, 3, H, W\]"),
        (dict(x=np.zeros((4, 1, 8, 8), np.uint8)), r"shape \[N, 3, H, W\]"),
        (dict(x=np.zeros((4, 3, 8, 6), np.uint8)), "square"),
        (dict(y=np.zeros(64, np.int32)), "y must be int64"),
        (dict(y=np.zeros(5, np.int64)), r"y must have shape \[N\] = \[64\]"),
        (dict(y=np.full(64, -1, np.int64)), "labels out of range: found -1"),
    ],
)
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


def _cfg(data, **kw):
    return dict(
        dict(
            data=str(data),
            data_root="data",
            num_classes=None,
            limit=None,
            val_fraction=0.25,
            seed=0,
            workers=0,
            img_size=16,
            data_config=None,
        ),
        **kw,
    )


def test_stratified_limit_balances_classes():
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 10, 10, 2]))  # class-sorted, one small class
    idx = stratified(labels, 12, seed=0)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 12
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    assert counts[3] == 2 and max(counts[:3]) - min(counts[:3]) <= 1  # the small class gives all it has
    assert torch.equal(idx, stratified(labels, 12, seed=0)) and not torch.equal(idx, stratified(labels, 12, seed=1))
    assert len(stratified(labels, 100, seed=0)) == 32


def test_limit_of_a_run_is_stratified(tmp_path):
    p = tmp_path / "sorted.npz"
    y = np.repeat(np.arange(4), 25).astype(np.int64)  # class-sorted: the first 20 files are all class 0
    np.savez(p, x=np.zeros((100, 3, 8, 8), np.uint8), y=y)
    tr, va = load_split(_cfg(p, limit=20))
    assert len(tr) == 15 and len(va) == 5
    assert torch.bincount(torch.cat([tr.y, va.y]), minlength=4).tolist() == [5, 5, 5, 5]
    with pytest.raises(LotusError, match="--limit"):
        load_split(_cfg(p, limit=1))


@pytest.mark.parametrize("n", [3, 10, 11])
@pytest.mark.parametrize("batch", [4, 5])
def test_loader_gives_each_rank_its_share_of_every_global_batch(n, batch):
    data = Images(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), 2)
    single = [ids.tolist() for _, _, ids in loader(data, batch, shuffle=True, seed=7, epoch=2)]
    assert sorted(sum(single, [])) == list(range(n)) and all(len(b) == batch for b in single[:-1])
    assert single != [ids.tolist() for _, _, ids in loader(data, batch, shuffle=True, seed=7, epoch=3)] or n < 4
    for world in (2, 3):
        ranks = [
            [ids.tolist() for _, _, ids in loader(data, batch, shuffle=True, seed=7, epoch=2, rank=r, world=world)]
            for r in range(world)
        ]
        assert all(len(r) == len(single) for r in ranks)  # same number of steps on every rank
        for b, glob in enumerate(single):
            assert sorted(sum((r[b] for r in ranks), [])) == sorted(glob)  # no image twice, none lost
            for r in range(world):
                pos = my_positions(b * batch, len(glob), r, world)
                assert ranks[r][b] == [glob[q] for q in pos.tolist()]


def test_folder_streams_through_the_data_config(tmp_path):
    import timm.data

    root = make_image_folder(tmp_path / "imgs", per_class=(2, 3), size=(40, 30))
    conf = {
        "input_size": (3, 24, 24),
        "interpolation": "bicubic",
        "mean": (0.1, 0.2, 0.3),
        "std": (0.5, 0.6, 0.7),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    src = load_image_folder(root)
    ds = ImageSet(src, torch.arange(5), conf)
    x, y, i = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and int(i) == 3 and int(y) == 1
    assert torch.equal(ds.view(3), x)
    # timm's complete eval transform (with its normalisation) on the decoded file, image by image
    ref = timm.data.create_transform(**conf, is_training=False)(src.folder.loader(src.folder.samples[3][0]))
    torch.testing.assert_close(ds.prepare(x[None], "cpu")[0], ref, rtol=0, atol=1e-5)
    batches0 = [(xb, ids) for xb, _, ids in loader(ds, 2, shuffle=True, seed=1)]
    batches1 = [(xb, ids) for xb, _, ids in loader(ds.with_config(conf, workers=1), 2, shuffle=True, seed=1)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches0, batches1))
    assert len(batches1) == 3


def test_in_memory_batch_is_resized_like_the_file_path():
    import timm.data
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    conf = {
        "input_size": (3, 64, 64),
        "interpolation": "bicubic",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    ds = Images(x, torch.tensor([0, 1, 0]), 2, conf)
    out = ds.prepare(ds.__getitems__([0, 2])[0], "cpu")
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    tf = timm.data.create_transform(**conf, is_training=False)
    ref = torch.stack([tf(Image.fromarray(x[i].permute(1, 2, 0).numpy())) for i in (0, 2)])
    assert (out - ref).abs().mean() < 0.02  # torch's and PIL's bicubic differ by rounding only
    assert torch.equal(Images(x, torch.tensor([0, 1, 0]), 2)[1][0], x[1])  # native size: untouched


def test_bad_image_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LotusError, match="not a usable ImageFolder"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "notes.txt").write_text("x")
    with pytest.raises(LotusError, match="not a usable ImageFolder"):
        load_image_folder(tmp_path / "noimg")
    for c in "ab":
        (tmp_path / "broken" / c).mkdir(parents=True)
        (tmp_path / "broken" / c / "x.png").write_bytes(b"not a png")
    with pytest.raises(LotusError, match="cannot decode image"):
        load_image_folder(tmp_path / "broken")


def test_fake_cifar10_uses_the_official_test_split(tmp_path, monkeypatch):
    import pickle

    sums = make_fake_cifar10(tmp_path, n_train=60, n_test=20)
    cfg = _cfg("cifar10", data_root=str(tmp_path), img_size=32)
    with pytest.raises(LotusError, match="cannot load CIFAR-10"):  # the real checksums: a damaged copy
        load_split(cfg)
    patch_cifar_md5(monkeypatch, sums)
    tr, va = load_split(cfg)
    assert len(tr) == 60 and len(va) == 20 and tr.num_classes == 10
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f)
    x, y, _ = va[4]
    assert torch.equal(x, torch.from_numpy(test["data"][4].reshape(3, 32, 32))) and int(y) == test["labels"][4]
    big = ImageSet(va.source, va.index, default_config(32) | {"input_size": (3, 224, 224)})
    assert big.prepare(big.__getitems__([0, 1])[0], "cpu").shape == (2, 3, 224, 224)  # resized to the model
    tr, va = load_split(dict(cfg, limit=20, val_fraction=0.25))
    assert len(tr) == 15 and len(va) == 5
    assert tr.source.name == "cifar10-train" and va.source.name == "cifar10-test"
    assert len(load_eval("cifar10", dict(cfg, num_classes=10))) == 20


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_breaks_mid_run_is_named(tmp_path, workers):
    root = make_image_folder(tmp_path / "imgs", per_class=(2, 2))
    bad = sorted((root / "class_1").iterdir())[1]
    bad.write_bytes(b"truncated")
    ds = ImageSet(load_image_folder(root), torch.arange(4), default_config(16), workers)
    with pytest.raises(LotusError, match=r"^--data: cannot decode image .*img_001\.png"):
        for _ in loader(ds, 2, shuffle=False):
            pass


@pytest.mark.parametrize("source", ["npz", "cifar10", "folder"])
def test_selection_split_on_every_source(tmp_path, monkeypatch, source):
    """LOTUS's selection split is a seeded share of the (stratified, --limit) train split, by image id,
    for in-memory and file sources alike; predictions and patch scores come back in image order."""
    from lotus.model import build
    from lotus.task import target_sets
    from lotus.tickets import score
    from lotus.train import predict

    if source == "npz":
        cfg = _cfg(make_npz(tmp_path / "d.npz", n=40, classes=4))
    elif source == "cifar10":
        patch_cifar_md5(monkeypatch, make_fake_cifar10(tmp_path, n_train=60, n_test=20))
        cfg = _cfg("cifar10", data_root=str(tmp_path))
    else:
        cfg = _cfg(make_image_folder(tmp_path / "imgs", per_class=(10, 10, 10, 10), size=(20, 20)))
    cfg = dict(cfg, limit=32, select_fraction=0.25, seed=3, canvas=0, target_classes=list(range(10)))
    tr0, va0 = load_split(cfg)

    def split_data(c):  # the target task of every class, without a canvas: the train split minus a selection
        return target_sets(c, load_split(c))

    tr, sel, va = split_data(cfg)
    assert len(sel) == round(0.25 * len(tr0)) and len(tr) + len(sel) == len(tr0) and torch.equal(va.index, va0.index)
    assert not set(tr.index.tolist()) & set(sel.index.tolist())  # held out of training
    assert set(tr.index.tolist()) | set(sel.index.tolist()) == set(tr0.index.tolist())
    assert sel.source.name == tr0.source.name
    if source == "cifar10":  # selection from the official training split, validation its test split
        assert sel.source.name == "cifar10-train" and va.source.name == "cifar10-test"
    assert torch.equal(split_data(cfg)[1].index, sel.index)  # seeded: every stage sees the same split
    assert split_data(dict(cfg, select_fraction=0.0))[1] is not None  # 0: the validation split chooses
    model = build(
        dict(
            model="lotus_vit",
            pretrained=False,
            checkpoint=None,
            patch_size=4,
            embed_dim=16,
            depth=1,
            heads=1,
            mlp_ratio=2.0,
        ),
        10,
        16,
    )
    pred = predict(model, sel, batch_size=3)
    x = sel.prepare(sel.__getitems__(list(range(len(sel))))[0], "cpu")
    with torch.no_grad():
        assert torch.equal(pred, model.eval()(x).argmax(1))  # one prediction per image, in image order
        torch.testing.assert_close(score(model, sel, batch_size=3, sink="none"), model.patch_scores(x, None))
