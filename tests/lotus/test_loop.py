"""The training loop's data path: tickets follow image ids through shuffled batches, augmentation
is drawn per global batch, gradient clipping, the timing stage's one-model-at-a-time, recipes."""

import gc
import weakref

import pytest
import torch

from lotus import recipe
from lotus.data import Images
from lotus.model import build
from lotus.train import augment_batch, time_steps, train

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
