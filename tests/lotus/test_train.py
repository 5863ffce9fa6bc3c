import pytest
import torch
from timm.layers import PatchDropout

from lotus.data import Images
from lotus.model import build
from lotus.train import augment_batch, epochs_to_within, evaluate, lr_at, train

from .test_model import CFG


def _data(n=48, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[:, 0] = (y * 120).to(torch.uint8)[:, None, None]
    return Images(x, y, classes)


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_train_learns_and_is_deterministic():
    data = _data()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build(CFG, 3, 16)
        h = train(m, data, data, epochs=4, lr=3e-3, batch_size=16, seed=1)
        runs.append((m, h))
    (m1, h1), (m2, h2) = runs
    assert h1["train_loss"][-1] < h1["train_loss"][0]
    assert h1["val_acc"] == h2["val_acc"] and h1["train_loss"] == h2["train_loss"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert h1["step_time_s"] > 0 and len(h1["val_acc"]) == 4
    assert evaluate(m1, data) == h1["val_acc"][-1]


def test_train_on_tickets_and_patch_dropout():
    data = _data()
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    keep = torch.arange(4).repeat(len(data), 1)  # only the first 4 of 16 patches
    h = train(m, data, None, epochs=1, lr=1e-3, batch_size=16, seed=0, keep_idx=keep)
    assert h["val_acc"] == [] and len(h["train_loss"]) == 1
    seen = []
    m.patch_drop.register_forward_hook(lambda mod, i, o: seen.append(o.shape[1]))
    train(m, data, None, epochs=1, lr=1e-3, batch_size=16, seed=0, patch_drop_keep=0.5)
    assert not isinstance(m.patch_drop, PatchDropout)  # restored after training
    with pytest.raises(ValueError, match="choose one"):
        train(m, data, None, epochs=1, lr=1e-3, batch_size=16, seed=0, keep_idx=keep, patch_drop_keep=0.5)


def test_epochs_to_within():
    assert epochs_to_within([10, 50, 60, 60.5]) == 3
    assert epochs_to_within([70, 60]) == 1
    assert epochs_to_within([]) is None


def test_train_bf16_autocast_runs():
    data = _data(n=16)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    from lotus_kernels import sparsify_

    sparsify_(m, sparsity=0.3)  # MaskedLinear under autocast too
    h = train(
        m, data, data, epochs=1, lr=1e-3, batch_size=8, seed=0, bf16=True, keep_idx=torch.arange(8).repeat(len(data), 1)
    )
    assert torch.isfinite(torch.tensor(h["train_loss"])).all() and len(h["val_acc"]) == 1


def test_augment_batch_flips_and_shifts_deterministically():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) + 1
    a = augment_batch(x, torch.Generator().manual_seed(3), shift=2)
    b = augment_batch(x, torch.Generator().manual_seed(3), shift=2)
    assert a.shape == x.shape and torch.equal(a, b)
    for i in range(2):  # each output is a flip and/or a shift of its own input: its content survives
        cands = []
        for img in (x[i], x[i].flip(-1)):
            p = torch.nn.functional.pad(img, (2,) * 4)
            cands += [p[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], c) for c in cands)
    many = augment_batch(x.repeat(32, 1, 1, 1), torch.Generator().manual_seed(0), shift=2)
    assert not all(torch.equal(many[0], m) for m in many[2::2])  # not the identity for everyone


def test_train_with_augmentation_learns_and_refuses_tickets():
    data = _data()
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    h = train(m, data, data, epochs=3, lr=3e-3, batch_size=16, seed=1, augment=True)
    assert h["train_loss"][-1] < h["train_loss"][0]
    with pytest.raises(ValueError, match="augment: flips \\+ shifts not with tickets"):
        train(
            m,
            data,
            None,
            epochs=1,
            lr=1e-3,
            batch_size=16,
            seed=0,
            augment=True,
            keep_idx=torch.arange(4).repeat(len(data), 1),
        )


def test_keep_fn_sees_each_batch_and_decides_its_patches():
    data = _data(n=32)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    seen, epochs, tokens = [], [], []

    class Policy:
        def __call__(self, x, idx):
            seen.append(idx.clone())
            assert x.shape == (len(idx), 3, 16, 16) and x.dtype == torch.float32
            return torch.arange(5).repeat(len(idx), 1)

        def new_epoch(self, model, epoch):
            epochs.append(epoch)

    m.blocks[0].register_forward_hook(lambda mod, i, o: tokens.append(o.shape[1]))
    h = train(m, data, None, epochs=2, lr=1e-3, batch_size=8, seed=0, keep_fn=Policy())
    assert epochs == [0, 1] and h["train_s"] > 0
    assert len(seen) == 8 and sorted(torch.cat(seen[:4]).tolist()) == list(range(32))  # every image once per epoch
    assert set(tokens) == {1 + 5}  # class token + the 5 patches the policy kept
    with pytest.raises(ValueError, match="choose one"):
        train(m, data, None, epochs=1, lr=1e-3, batch_size=8, seed=0, keep_fn=Policy(), patch_drop_keep=0.5)


def test_optimizer_state_is_carried_between_calls():
    data = _data(n=16)
    torch.manual_seed(0)
    m = build(CFG, 3, 16)
    state = {}
    train(m, data, None, epochs=1, lr=1e-3, batch_size=8, seed=0, optimizer_state=state)
    assert state["state"] and all(int(s["step"]) == 2 for s in state["state"].values())
    train(m, data, None, epochs=1, lr=1e-3, batch_size=8, seed=0, optimizer_state=state)
    assert all(int(s["step"]) == 4 for s in state["state"].values())  # continued, not restarted


def test_predict_matches_evaluate():
    from lotus.train import predict

    data = _data(n=20)
    m = build(CFG, 3, 16)
    p = predict(m, data, batch_size=7)
    assert p.shape == (20,) and p.dtype == torch.int64
    assert 100.0 * float((p == data.y).double().mean()) == pytest.approx(evaluate(m, data, batch_size=8))
