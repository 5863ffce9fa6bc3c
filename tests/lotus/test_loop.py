"""The training loop's data path: tickets follow image ids through shuffled batches, augmentation
is drawn per global batch, gradient clipping, the timing stage's one-model-at-a-time, recipes."""

import gc
import weakref

import pytest
import torch

from lotus import recipe
from lotus.data import Images
from lotus.model import build
from lotus.tickets import _Table  # the fixed-ticket policy's keep_fn
from lotus.train import augment_batch, flip_patch_indices, time_steps, train

from .test_model import CFG


def _numbered(n=24, classes=3):
    """Image i is filled with the value i, so a batch tells which images it holds."""
    x = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 16, 16).contiguous()
    return Images(x, torch.arange(n) % classes, classes)


def test_tickets_follow_image_ids_through_shuffled_batches():
    data = _numbered()
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    keep = torch.stack([torch.tensor([i % 16, (i + 5) % 16]) for i in range(len(data))])  # a row per image
    seen = []

    def hook(mod, args, kwargs):
        ids = (args[0][:, 0, 0, 0] * data.std[0] + data.mean[0]) * 255  # undo the normalisation
        seen.append((ids.round().long(), kwargs["keep_idx"].cpu()))

    m.register_forward_pre_hook(hook, with_kwargs=True)
    train(m, data, None, epochs=2, lr=1e-3, batch_size=5, seed=3, keep_idx=keep)
    order = torch.cat([ids for ids, _ in seen])
    assert sorted(order.tolist()) == sorted(list(range(24)) * 2) and order[:24].tolist() != list(range(24))
    for ids, k in seen:
        assert torch.equal(k, keep[ids])
    with pytest.raises(ValueError, match="one row per training image"):
        train(m, data, None, epochs=1, lr=1e-3, batch_size=5, seed=3, keep_idx=keep[:10])


def test_keep_fn_gets_the_image_ids_of_the_batch_it_sees():
    """A per-step policy is called with the batch as the model sees it and that batch's image ids
    (shuffled, uneven last batch), and its choice reaches the model (issue 10's hook on issue 11's loop)."""
    data = _numbered()
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    calls, given = [], []

    def keep_fn(x, ids):
        shown = (x[:, 0, 0, 0] * data.std[0] + data.mean[0]) * 255  # undo the normalisation
        calls.append((shown.round().long(), ids.clone()))
        return torch.stack([torch.tensor([int(i) % 16, (int(i) + 3) % 16]) for i in ids])

    m.register_forward_pre_hook(lambda mod, args, kwargs: given.append(kwargs["keep_idx"].cpu()), with_kwargs=True)
    train(m, data, None, epochs=2, lr=1e-3, batch_size=5, seed=3, keep_fn=keep_fn)
    assert [len(ids) for _, ids in calls] == [5, 5, 5, 5, 4] * 2
    order = torch.cat([ids for _, ids in calls])
    assert sorted(order.tolist()) == sorted(list(range(24)) * 2) and order[:24].tolist() != list(range(24))
    for (shown, ids), k in zip(calls, given):
        assert torch.equal(shown, ids)  # ids name the images in x
        assert torch.equal(k[:, 0], ids % 16)  # the policy's patches are what the model got


def test_clip_grad_reaches_every_stage_that_trains(tmp_path, monkeypatch):
    """--clip-grad (the pretrained recipe's 1.0) applies to pretraining, the weak copies of ISP / ISSP /
    Instant Soup, Instant Soup's main-model passes, the recovery pass and every fine-tuning arm."""
    from lotus import finetune, pipeline
    from lotus.cli import main

    from ._tiny import TINY, make_npz

    seen = []

    def recording(real):
        def wrapper(*args, **kw):
            seen.append((kw.get("desc"), kw.get("clip_grad")))
            return real(*args, **kw)

        return wrapper

    monkeypatch.setattr(pipeline, "train", recording(pipeline.train))
    monkeypatch.setattr(finetune, "train", recording(finetune.train))
    main(
        [
            "run",
            "--data",
            str(make_npz(tmp_path / "d.npz", n=40)),
            "--out",
            str(tmp_path / "run"),
            *TINY,
            "--seeds",
            "1",
            "--main-seeds",
            "1",
            "--prune-seeds",
            "1",
            "--arms",
            "dense/full,block-isp/fixed",
            "--no-matched",
            "--timing-rounds",
            "0",
            "--compare-sparsities",
            "",
            "--clip-grad",
            "0.7",
            "--overlay-images",
            "0",
        ]
    )
    kinds = {d.split()[0] for d, _ in seen}
    assert {"pretrain", "isp", "issp", "recover", "instant", "finetune"} <= kinds, kinds
    assert any(d.startswith("instant main") for d, _ in seen)
    assert all(c == 0.7 for _, c in seen), seen


def test_augmentation_is_drawn_for_the_global_batch():
    x = torch.randn(7, 3, 8, 8)
    whole = augment_batch(x, torch.Generator().manual_seed(4), shift=2)
    for rank, pos in enumerate((torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5]))):
        part = augment_batch(x[pos], torch.Generator().manual_seed(4), shift=2, positions=pos, total=7)
        assert torch.equal(part, whole[pos]), rank


def test_clip_grad():
    data = _numbered(n=16)
    runs = {}
    for clip in (None, 1e6, 1e-3):
        torch.manual_seed(0)
        m = build(CFG, 3, 16)
        train(m, data, None, epochs=1, lr=1e-2, batch_size=8, seed=0, clip_grad=clip)
        runs[clip] = m.head.weight.detach().clone()
    assert torch.equal(runs[None], runs[1e6])  # a bound never reached changes nothing
    assert not torch.allclose(runs[None], runs[1e-3])


def test_timing_holds_one_model_at_a_time():
    data = _numbered(n=16)
    alive, built = [], []

    def make():
        gc.collect()
        alive.append(sum(r() is not None for r in built))
        m = build(CFG, 3, 16)
        built.append(weakref.ref(m))
        return m

    keep = torch.arange(4).repeat(16, 1)
    med = time_steps(
        {"a": (make, {}), "b": (make, {"keep_idx": keep}), "c": (make, {"patch_drop_keep": 0.5})},
        data,
        batch_size=8,
        rounds=2,
        seed=0,
    )
    assert set(med) == {"a", "b", "c"} and all(t > 0 for t in med.values())
    assert len(built) == 6 and max(alive) == 0  # every earlier model was gone when the next was built


def test_recipes(monkeypatch):
    base = dict(
        batch_size=256,
        pretrained=False,
        checkpoint=None,
        lr=None,
        optimizer=None,
        weight_decay=None,
        clip_grad=None,
        pretrain_epochs=None,
        isp_lr=None,
        finetune_lr=None,
        bf16=None,
        finetune_epochs=None,
        cost_basis="auto",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = recipe.resolve(dict(base))
    assert (s["recipe"], s["optimizer"], s["lr"], s["pretrain_epochs"], s["bf16"]) == (
        "scratch",
        "adamw",
        2e-3,
        30,
        False,
    )
    assert s["cost_basis"] == "cpu"  # no GPU: process CPU seconds
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = recipe.resolve(dict(base, checkpoint="/x.pt", lr=0.1))
    assert p["recipe"] == "pretrained" and p["optimizer"] == "sgd" and p["weight_decay"] == 0
    assert p["lr"] == 0.1 and p["finetune_lr"] == pytest.approx(0.015) and p["clip_grad"] == 1.0  # given values win
    assert p["pretrain_epochs"] == 0 and p["finetune_epochs"] == 5  # the checkpoint as it is; ViT's 5-epoch fine-tune
    assert p["bf16"] is True and recipe.resolve(dict(base, bf16=False))["bf16"] is False
    assert p["cost_basis"] == "wall"  # a GPU: wall seconds


def test_flip_patch_indices_mirrors_columns():
    idx = torch.tensor([[0, 5, 15], [0, 5, 15]])  # a 4-wide grid: (row, col) (0,0) (1,1) (3,3)
    out = flip_patch_indices(idx, torch.tensor([True, False]), 4)
    assert out.tolist() == [[3, 6, 12], [0, 5, 15]]


@pytest.mark.parametrize("how", ["keep_fn", "keep_idx"])
def test_flipped_images_train_on_the_patches_of_their_own_ticket(how):
    """With flips, a ticket of the stored image must keep the same pixels: the kept patches of the
    (flipped) batch are the ticket's patches of the stored image, mirrored. Recomputed from the raw
    images, patch by patch."""
    g = torch.Generator().manual_seed(5)
    n, p, grid = 20, 4, 4
    data = Images(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(n) % 3, 3)
    table = torch.rand(n, grid * grid, generator=g).topk(6, dim=1).indices.sort(dim=1).values
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    seen = []
    m.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].detach().clone(), kwargs["keep_idx"].cpu())), with_kwargs=True
    )
    kw = {"keep_fn": _Table(table)} if how == "keep_fn" else {"keep_idx": table}
    train(m, data, None, epochs=2, lr=1e-3, batch_size=6, seed=2, augment="flip", **kw)

    def patches(img, idx):  # [3, 16, 16] -> [K, 3, p, p] at row-major patch indices
        return torch.stack(
            [img[:, (i // grid) * p : (i // grid + 1) * p, (i % grid) * p : (i % grid + 1) * p] for i in idx]
        )

    stored = data.prepare(data.x, "cpu")
    flipped = kept = 0
    for x, k in seen:
        for img, idx in zip(x, k):
            (j, was_flipped), *more = [
                (j, f)
                for j in range(n)
                for f in (False, True)
                if torch.equal(img, stored[j].flip(-1) if f else stored[j])
            ]
            assert not more  # the random images are told apart
            want = patches(stored[j], table[j])
            # the same pixels: as stored, or every ticket patch mirrored and moved to its mirrored column
            assert torch.equal(patches(img, idx), want.flip(-1) if was_flipped else want)
            flipped += was_flipped
            kept += 1
    assert kept == 2 * n and 0 < flipped < kept  # both kinds happened


def test_flips_and_shifts_are_refused_with_tickets_of_the_stored_image():
    data = _numbered()
    m = build(CFG, 3, 16)
    table = torch.arange(4).repeat(len(data), 1)
    for kw in ({"keep_idx": table}, {"keep_fn": _Table(table)}):
        with pytest.raises(ValueError, match="augment: flips \\+ shifts not with tickets"):
            train(m, data, None, epochs=1, lr=1e-3, batch_size=5, seed=0, augment="flip_shift", **kw)
    with pytest.raises(ValueError, match="augment: expected a bool or one of none, flip, flip_shift"):
        train(m, data, None, epochs=1, lr=1e-3, batch_size=5, seed=0, augment="shift")


def test_finetune_augment_reaches_every_arm(tmp_path, monkeypatch):
    """--finetune-augment flip: every arm's training flips (tickets of the stored image mirrored with
    it, their object recall still counted); aug_rescore keeps its own flips + shifts; the report says so."""
    from lotus import finetune, rundir
    from lotus.cli import main

    from ._tiny import TINY, make_npz

    seen = {}

    def recording(*args, **kw):
        seen[kw["desc"]] = (kw["augment"], getattr(kw["keep_fn"], "image_frame", None))
        return real(*args, **kw)

    real = finetune.train
    monkeypatch.setattr(finetune, "train", recording)
    out = tmp_path / "run"
    args = ["run", "--data", str(make_npz(tmp_path / "d.npz", n=40)), "--out", str(out), *TINY]
    args += ["--seeds", "1", "--main-seeds", "1", "--prune-seeds", "1", "--no-matched", "--timing-rounds", "0"]
    args += ["--arms", "dense/full,dense/fixed,dense/rescore_step,dense/aug_rescore", "--compare-sparsities", ""]
    main([*args, "--overlay-images", "0", "--finetune-augment", "flip"])
    assert seen == {
        "finetune dense/full s0": ("flip", None),
        "finetune dense/fixed s0": ("flip", True),
        "finetune dense/rescore_step s0": ("flip", False),
        "finetune dense/aug_rescore s0": ("flip_shift", False),
    }
    run = rundir.RunDir(out)
    recall = {a: run.result(f"finetune/{a}/s0")["object_recall"] for a in ("dense/fixed", "dense/rescore_step")}
    assert 0 <= recall["dense/fixed"] <= 1 and recall["dense/rescore_step"] is None  # batch frame: not counted
    assert run.config()["finetune_augment"] == "flip"
    assert "random flips (tickets mirrored with the image)" in (out / "report.md").read_text()
