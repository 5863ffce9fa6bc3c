"""SIGKILL a `lotus run` mid-run, `--resume` it, and compare with the uninterrupted run."""
import json
import signal
import subprocess
import time

import torch

from lotus.report import strip_timing

from ._tiny import REPO, TINY, env, lotus_cmd


def _wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_and_resume_reproduces_the_run(tiny_run, tmp_path):
    ref, data = tiny_run
    out = tmp_path / "run"
    proc = subprocess.Popen(lotus_cmd("run", "--data", data, "--out", out, *TINY), env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # ISSP is now under way; resumed, it retrains the round-1 weak copies it shared with ISP in the
    # uninterrupted run (a cache) and must still come out identical
    _wait_for(out / "stages" / "prune__isp.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "finetune__full.json").exists() and not (out / "report.md").exists()
    done = subprocess.run(lotus_cmd("run", "--resume", out), env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stage pretrain" not in done.stdout  # finished stages are not redone
    a = strip_timing(json.loads((ref / "results.json").read_text()))
    b = strip_timing(json.loads((out / "results.json").read_text()))
    assert a == b
    for sub in ("masks", "models"):
        names = sorted(p.name for p in (ref / sub).iterdir())
        assert names == sorted(p.name for p in (out / sub).iterdir())
        for name in names:
            x = torch.load(ref / sub / name, weights_only=True)
            y = torch.load(out / sub / name, weights_only=True)
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x), f"{sub}/{name} differs"
    assert not list(out.rglob("*.tmp"))
