"""SIGKILL a `lotus run` mid-run, `--resume` it, and compare with the uninterrupted run."""
import json
import signal
import subprocess
import time

import torch

from lotus.report import strip_timing

from ._tiny import REPO, TINY, env, lotus_cmd


def _same(a, b) -> bool:
    """Equal, recursively through dicts and lists of tensors (optimizer states)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    return a == b


def _wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not list(path.parent.glob(path.name)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_and_resume_reproduces_the_run(tiny_run, tmp_path):
    ref, data = tiny_run
    out = tmp_path / "run"
    proc = subprocess.Popen(lotus_cmd("run", "--data", data, "--out", out, *TINY), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The block-layout pruning stage is now under way; resumed, it retrains the round-1 weak copies it
    # shared with the unstructured stage in the uninterrupted run (a cache) and must still come out identical
    _wait_for(out / "stages" / "prune__unstructured@*.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((out / "stages").glob("finetune__*")) and not (out / "report.md").exists()
    done = subprocess.run(lotus_cmd("run", "--resume", out), env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stage pretrain" not in done.stdout  # finished stages are not redone
    a = strip_timing(json.loads((ref / "results.json").read_text()))
    b = strip_timing(json.loads((out / "results.json").read_text()))
    assert a == b
    for sub in ("masks", "models", "preds", "tickets"):
        names = sorted(str(p.relative_to(ref)) for p in (ref / sub).rglob("*.pt"))
        assert names and names == sorted(str(p.relative_to(out)) for p in (out / sub).rglob("*.pt"))
        for name in names:
            x = torch.load(ref / name, weights_only=True)
            y = torch.load(out / name, weights_only=True)
            assert x.keys() == y.keys()
            assert _same({k: v for k, v in x.items() if k != "seconds"},
                         {k: v for k, v in y.items() if k != "seconds"}), f"{name} differs"
    assert not list(out.rglob("*.tmp"))
