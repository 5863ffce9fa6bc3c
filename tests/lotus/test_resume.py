"""SIGKILL a `lotus run` at several points (twice in the middle of writing a checkpoint, then at
random moments), `--resume` it each time, and compare everything with the uninterrupted run."""
import json
import os
import random
import select
import signal
import subprocess
import sys
import time

import torch

from lotus.report import strip_timing

from ._tiny import REPO, TINY, env, lotus_cmd

# Runs the CLI with os.fsync patched so that the atomic write of one file (rundir._write_bytes:
# temp file, fsync, os.replace) dies half-way: the temp file is cut to half its size, then SIGKILL.
_CRASH_IN_WRITE = """
import os, signal, sys
target, real_fsync = os.environ["LOTUS_TEST_CRASH_IN"], os.fsync
def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("." + target + "."):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
from lotus.cli import main
main(sys.argv[1:])
"""


def _crash_writing(name, *args):
    e = dict(env(), LOTUS_TEST_CRASH_IN=name)
    r = subprocess.run([sys.executable, "-c", _CRASH_IN_WRITE, *map(str, args)], env=e, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


def _kill_after_start(out, delay, timeout=300):
    """Resume ``out``, SIGKILL it ``delay`` s after it reports its first stage; False if it finished first."""
    proc = subprocess.Popen(lotus_cmd("run", "--resume", out), env=env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if select.select([proc.stdout], [], [], 0.2)[0] and "lotus: stage" in proc.stdout.readline():
            break
    time.sleep(delay)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return not finished


def _same_files(ref, out, sub):
    names = sorted(p.name for p in (ref / sub).iterdir())
    assert names == sorted(p.name for p in (out / sub).iterdir())
    for name in names:
        x = torch.load(ref / sub / name, weights_only=True)
        y = torch.load(out / sub / name, weights_only=True)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), f"{sub}/{name} differs"


def test_kill_anywhere_and_resume_reproduces_the_run(tiny_run, tmp_path):
    ref, data = tiny_run
    out = tmp_path / "run"
    # 1. killed while writing the first checkpoint: a half-written temp file, no dense.pt, no marker
    _crash_writing("dense.pt", "run", "--data", data, "--out", out, *TINY)
    assert list((out / "models").glob(".dense.pt.*.tmp")) and not (out / "models" / "dense.pt").exists()
    assert not (out / "stages" / "pretrain.json").exists()
    # 2. resumed, and killed again while writing the tickets
    _crash_writing("tickets.pt", "run", "--resume", out)
    assert (out / "stages" / "pretrain.json").exists() and not (out / "tickets.pt").exists()
    # 3. resumed and killed at random moments (seeded; the seed is in the failure message)
    seed = int(os.environ.get("LOTUS_TEST_SEED", random.randrange(1 << 16)))
    rng = random.Random(seed)
    kills = [round(rng.uniform(0.0, 3.0), 2) for _ in range(3)]
    progress = []
    for delay in kills:
        _kill_after_start(out, delay)
        progress.append(sorted(p.stem for p in (out / "stages").glob("*.json")))
    done = subprocess.run(lotus_cmd("run", "--resume", out), env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    context = f"LOTUS_TEST_SEED={seed}, kills after {kills} s, stages done after each: {progress}"
    print(context)
    a = strip_timing(json.loads((ref / "results.json").read_text()))
    b = strip_timing(json.loads((out / "results.json").read_text()))
    assert a == b, context
    for sub in ("masks", "models"):
        _same_files(ref, out, sub)
    ta, tb = (torch.load(d / "tickets.pt", weights_only=True) for d in (ref, out))
    assert torch.equal(ta["scores"], tb["scores"]), context
    assert ta["keep"].keys() == tb["keep"].keys() and all(torch.equal(ta["keep"][k], tb["keep"][k]) for k in ta["keep"])
    assert not list(out.rglob("*.tmp")), context
