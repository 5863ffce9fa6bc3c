"""Canvas data (lotus.canvas, lotus.task): objects at random positions on a clutter of other images'
pieces, their boxes, object-patch recall, the source / target tasks, and bad canvas options."""

import numpy as np
import pytest
import torch

from lotus import task
from lotus.canvas import boxes_in_model_pixels, compose, coverage, object_recall
from lotus.cli import main
from lotus.data import default_config

from ._tiny import TINY, make_npz


def _flat_images(n, side=8):
    """n images, image i one flat colour (i + 1, 2 * i + 1, 3 * i + 1) mod 256: every pixel says whose it is."""
    c = torch.stack([(torch.arange(n) + 1), (2 * torch.arange(n) + 1), (3 * torch.arange(n) + 1)], 1) % 256
    return c[:, :, None, None].expand(n, 3, side, side).to(torch.uint8).contiguous()


def _owner(canvas, colours):
    """Index of the image each pixel of canvas [3, S, S] comes from."""
    px = canvas.permute(1, 2, 0).reshape(-1, 1, 3).long()
    return (px == colours[None].long()).all(-1).float().argmax(1).reshape(canvas.shape[1:])


def test_compose_places_the_object_on_other_images_pieces():
    x = _flat_images(20)
    colours = x[:, :, 0, 0]
    canv, boxes = compose(x, 24, seed=3, tile=4)
    assert canv.shape == (20, 3, 24, 24) and canv.dtype == torch.uint8 and boxes.shape == (20, 4)
    assert (boxes[:, 2:] == 8).all() and (boxes[:, :2] >= 0).all() and (boxes[:, :2] <= 16).all()
    for i in range(20):
        top, left, h, w = boxes[i].tolist()
        assert torch.equal(canv[i, :, top : top + h, left : left + w], x[i])  # the object, untouched
        owner = _owner(canv[i], colours)
        inside = torch.zeros(24, 24, dtype=torch.bool)
        inside[top : top + h, left : left + w] = True
        assert (owner[~inside] != i).all()  # the background never shows the image itself
        assert len(owner[~inside].unique()) > 3  # a clutter of several other images
        # the background is tiled: every 4x4 tile (outside the object) is one other image's piece
        for a in range(0, 24, 4):
            for b in range(0, 24, 4):
                tile = owner[a : a + 4, b : b + 4][~inside[a : a + 4, b : b + 4]]
                assert len(tile.unique()) <= 1
    again, boxes2 = compose(x, 24, seed=3, tile=4)
    assert torch.equal(again, canv) and torch.equal(boxes2, boxes)  # deterministic in the seed
    assert not torch.equal(compose(x, 24, seed=4, tile=4)[1], boxes)
    # real (not flat) images: a tile is a crop of another image at some offset
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (6, 3, 8, 8)).astype(np.uint8))
    canv, boxes = compose(real, 16, seed=0, tile=4)
    top, left = boxes[0, :2].tolist()
    if top >= 4 or left >= 4:  # the top-left tile lies outside the object
        tile = canv[0, :, :4, :4]
        crops = [real[j, :, a : a + 4, b : b + 4] for j in range(1, 6) for a in range(5) for b in range(5)]
        assert any(torch.equal(tile, c) for c in crops)


def test_boxes_follow_the_models_resize_and_crop():
    boxes = torch.tensor([[10, 20, 32, 32]])
    conf = default_config(128)  # a 64-px canvas seen at 128 px: everything doubles
    assert boxes_in_model_pixels(boxes, 64, conf).tolist() == [[20.0, 40.0, 64.0, 64.0]]
    conf = dict(default_config(112), crop_pct=0.875)  # resize to 128, centre-crop 112: 8 px off each side
    assert boxes_in_model_pixels(boxes, 64, conf).tolist() == [[12.0, 32.0, 64.0, 64.0]]


def test_object_recall_known_example():
    # a 32-px image, 8-px patches (4 x 4 grid). Object 1 covers exactly patches 5, 6, 9, 10; object 2
    # is an unaligned 8 x 8 box at (4, 4): a quarter of it in each of patches 0, 1, 4, 5
    boxes = torch.tensor([[8.0, 8.0, 16.0, 16.0], [4.0, 4.0, 8.0, 8.0]])
    cov = coverage(boxes, 32, 8)
    assert cov.shape == (2, 16) and cov.sum(1).tolist() == [256.0, 64.0]
    assert cov[0].nonzero().flatten().tolist() == [5, 6, 9, 10] and (cov[0][[5, 6, 9, 10]] == 64).all()
    assert cov[1].nonzero().flatten().tolist() == [0, 1, 4, 5] and (cov[1][[0, 1, 4, 5]] == 16).all()
    keep = torch.tensor([[5, 6, 0, 1], [0, 2, 3, 15]])
    assert object_recall(keep, cov).tolist() == [0.5, 0.25]
    assert object_recall(torch.tensor([[5, 6, 9, 10], [0, 1, 4, 5]]), cov).tolist() == [1.0, 1.0]
    # random patches keep K / N of the object in expectation, wherever it is
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(4000, 16, generator=g).topk(4, dim=1).indices
    r = object_recall(rand, cov[[0, 1] * 2000])
    assert float(r.mean()) == pytest.approx(4 / 16, abs=0.01)
    with pytest.raises(ValueError, match="outside"):
        object_recall(keep[:1], coverage(torch.tensor([[40.0, 40.0, 8.0, 8.0]]), 32, 8))


def test_target_and_source_tasks_on_canvas(tmp_path):
    data = make_npz(tmp_path / "d.npz", n=80, size=8, classes=4)
    cfg = dict(
        data=str(data),
        data_root="data",
        num_classes=None,
        limit=None,
        val_fraction=0.25,
        seed=0,
        workers=0,
        select_fraction=0.2,
        canvas=16,
        canvas_tile=4,
        recipe="scratch",
        pretrain_epochs=1,
        source_classes="auto",
        target_classes="auto",
        img_size=16,
        data_config=default_config(16),
    )
    task.resolve_classes(cfg, 4)
    assert (cfg["source_classes"], cfg["target_classes"]) == ([0, 1], [2, 3])
    tr, sel, va = task.target_sets(cfg)
    src_tr, src_va = task.source_sets(cfg)
    raw = np.load(data)
    y = torch.from_numpy(raw["y"])
    assert len(tr) + len(sel) + len(va) == int((y >= 2).sum()) and len(src_tr) + len(src_va) == int((y < 2).sum())
    for d in (tr, sel, va, src_tr):
        assert d.x.shape[-1] == 16 and set(d.y.tolist()) <= {0, 1} and d.num_classes == 2
        b = d.boxes
        assert b.shape == (len(d), 4) and (b[:, 2:] == 8).all() and (b[:, :2] >= 0).all() and (b[:, :2] <= 8).all()
        # the object in its box is one of the task's images
        top, left = int(b[0, 0]), int(b[0, 1])
        obj = d.x[0, :, top : top + 8, left : left + 8]
        assert any(torch.equal(obj, torch.from_numpy(raw["x"][j])) for j in range(len(y)))
    assert task.target_sets(cfg) is task.target_sets(cfg)  # composed once per process
    # the source task's images on a plain background (their mean colour) by default, the target's on clutter
    top, left = int(src_tr.boxes[0, 0]), int(src_tr.boxes[0, 1])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[top : top + 8, left : left + 8] = False
    bg = src_tr.x[0][:, outside]
    assert (bg == bg[:, :1]).all()
    top, left = int(tr.boxes[0, 0]), int(tr.boxes[0, 1])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[top : top + 8, left : left + 8] = False
    assert len(tr.x[0][:, outside].T.unique(dim=0)) > 8
    cl_tr, _ = task.source_sets(dict(cfg, source_background="clutter"))
    assert not torch.equal(cl_tr.x, src_tr.x) and torch.equal(cl_tr.boxes, src_tr.boxes)
    # labels 2, 3 -> 0, 1; an evaluation file keeps only the target classes, on its own canvas
    ev = task.eval_set(str(data), cfg)
    assert len(ev) == int((y >= 2).sum()) and ev.boxes is not None
    assert torch.equal(ev.y, y[y >= 2] - 2)


def test_class_options():
    assert task.parse_classes("0-4") == [0, 1, 2, 3, 4] and task.parse_classes("5,7, 9") == [5, 7, 9]
    assert task.parse_classes("0-1,6") == [0, 1, 6] and task.parse_classes("all") == "all"
    for bad in ("", "a-b", "-1", "3,x"):
        with pytest.raises(ValueError):
            task.parse_classes(bad)
    cfg = {"recipe": "pretrained", "pretrain_epochs": 0, "source_classes": "auto", "target_classes": "auto"}
    task.resolve_classes(cfg, 10)
    assert cfg["source_classes"] == [] and cfg["target_classes"] == list(range(10))


@pytest.mark.parametrize(
    "args, match",
    [
        (["--canvas", "16"], r"--canvas: the canvas \(16 px\) must be larger than the images \(16 px\)"),
        (["--canvas", "8"], r"--canvas: the canvas \(8 px\) must be larger than the images \(16 px\)"),
        (["--canvas-tile", "20"], "--canvas-tile: expected 1..16"),
        (["--target-classes", "2-7"], "--target-classes: class 4 does not exist"),
        (["--target-classes", "3"], "--target-classes: the target task needs at least 2 classes"),
        (["--source-classes", "none"], "--source-classes none: a model trained from scratch needs a source task"),
        (["--headline", "dense/best"], "--headline"),
    ],
)
def test_bad_canvas_and_task_options_exit_2_and_write_nothing(tmp_path, capsys, args, match):
    data = make_npz(tmp_path / "d.npz")  # 16-px images, 4 classes
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["run", "--data", str(data), "--out", str(out), *TINY, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lotus: error: ") and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
    assert not out.exists()
