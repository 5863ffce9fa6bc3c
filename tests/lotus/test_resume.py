"""SIGKILL a `lotus run` at several points (twice in the middle of writing a checkpoint, once in the
block-layout pruning stage after the unstructured one, then at random moments), `--resume` it each
time, and compare everything with the uninterrupted run."""

import os
import random
import select
import signal
import subprocess
import sys
import time

from ._tiny import REPO, TINY, assert_same_run, env, lotus_cmd

# Runs the CLI with os.fsync patched so that the atomic write of one file (rundir._write_bytes:
# temp file, fsync, os.replace) dies half-way: the temp file is cut to half its size, then SIGKILL.
# The target is DIR/NAME within the run directory (the temp file is DIR/.NAME.*.tmp).
_CRASH_IN_WRITE = """
import os, signal, sys
target, real_fsync = os.environ["LOTUS_TEST_CRASH_IN"], os.fsync
folder, name = os.path.split(target)
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if os.path.basename(path).startswith("." + name + ".") and os.path.dirname(path).endswith(os.sep + folder):
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
from lotus.cli import main
main(sys.argv[1:])
"""


def _crash_writing(name, *args):
    e = dict(env(), LOTUS_TEST_CRASH_IN=name)
    r = subprocess.run(
        [sys.executable, "-c", _CRASH_IN_WRITE, *map(str, args)],
        env=e,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


def _kill_after_start(out, delay, timeout=300):
    """Resume ``out``, SIGKILL it ``delay`` s after it reports its first stage; False if it finished first."""
    proc = subprocess.Popen(
        lotus_cmd("run", "--resume", out),
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
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


def _wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not list(path.parent.glob(path.name)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_kill_anywhere_and_resume_reproduces_the_run(tiny_run, tmp_path):
    ref, data = tiny_run
    out = tmp_path / "run"
    # 1. killed while writing the first checkpoint: a half-written temp file, no pretrained.pt, no marker
    _crash_writing("models/pretrained.pt", "run", "--data", data, "--out", out, *TINY)
    assert list((out / "models").glob(".pretrained.pt.*.tmp")) and not (out / "models" / "pretrained.pt").exists()
    assert not (out / "stages" / "pretrain.json").exists()
    # 2. resumed, and killed again while writing the start model's tickets
    _crash_writing("tickets/start.pt", "run", "--resume", out)
    assert (out / "stages" / "probe.json").exists() and not (out / "tickets" / "start.pt").exists()
    assert not (out / "stages" / "score.json").exists()
    # 3. resumed and killed in the block-layout pruning stage: resumed, it retrains the round-1 weak
    # copies it shared with the unstructured stage in the uninterrupted run (a cache) and must still
    # come out identical
    proc = subprocess.Popen(
        lotus_cmd("run", "--resume", out),
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(out / "stages" / "prune__unstructured@*.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((out / "stages").glob("finetune__*")) and not (out / "report.md").exists()
    # 4. resumed and killed at random moments (seeded; the seed is in the failure message)
    seed = int(os.environ.get("LOTUS_TEST_SEED", random.randrange(1 << 16)))
    rng = random.Random(seed)
    kills = [round(rng.uniform(0.0, 3.0), 2) for _ in range(3)]
    progress = []
    for delay in kills:
        _kill_after_start(out, delay)
        progress.append(sorted(p.stem for p in (out / "stages").glob("*.json")))
    done = subprocess.run(
        lotus_cmd("run", "--resume", out), env=env(), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    assert "stage pretrain" not in done.stdout  # finished stages are not redone
    context = f"LOTUS_TEST_SEED={seed}, kills after {kills} s, stages done after each: {progress}"
    print(context)
    assert_same_run(ref, out, context)
    assert not list(out.rglob("*.tmp")), context
