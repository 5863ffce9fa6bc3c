"""Stages in worker processes (``--jobs``): the same run as one stage at a time, and a failing stage
stops the run with its own error."""

import pytest

from lotus import pipeline
from lotus.cli import auto_jobs

from . import _workers
from ._tiny import TINY, assert_same_run, run_lotus


def test_two_jobs_reproduce_the_one_job_run(tiny_run, tmp_path):
    ref, data = tiny_run
    out = tmp_path / "run"
    r = run_lotus("run", "--data", data, "--out", out, *TINY, "--jobs", "2", timeout=900)
    assert "2 stages at a time" in (out / "report.md").read_text()
    assert_same_run(ref, out, r.stdout[-2000:], ignore_config=("jobs",))


def test_calls_run_two_at_a_time_in_worker_processes(tmp_path):
    import os

    # a and b each wait for the other: they only finish if two workers run them at once
    calls = [(_workers.rendezvous, (str(tmp_path), "a", "b")), (_workers.rendezvous, (str(tmp_path), "b", "a"))]
    calls += [(_workers.touch, (str(tmp_path), f"c{i}")) for i in range(3)]
    pipeline._parallel({"jobs": 2, "threads": 1}, calls)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(f.split(".")[0] for f in files) == ["a", "b", "c0", "c1", "c2"]  # each call once
    pids = {f.split(".")[1] for f in files}
    assert len(pids) == 2 and str(os.getpid()) not in pids


def test_one_job_runs_inline(tmp_path):
    pipeline._parallel({"jobs": 1, "threads": 1}, [(_workers.touch, (str(tmp_path), "c0"))])
    assert [p.name for p in tmp_path.iterdir()] == [f"c0.{__import__('os').getpid()}"]


def test_a_failing_stage_raises_its_error_and_cancels_the_rest(tmp_path):
    calls = [(_workers.fail, ("stage s0 failed",))] + [
        (_workers.touch, (str(tmp_path), f"c{i}", 0.5)) for i in range(40)
    ]
    with pytest.raises(ValueError, match="stage s0 failed"):
        pipeline._parallel({"jobs": 2, "threads": 1}, calls)
    assert len(list(tmp_path.iterdir())) < 40  # what had not started did not run (20 s of work on one worker)


def test_auto_jobs_follow_the_cores(monkeypatch):
    import os

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert auto_jobs(1) == 4 and auto_jobs(4) == 4 and auto_jobs(8) == 2 and auto_jobs(32) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert auto_jobs(1) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert auto_jobs(1) == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_jobs(1) == 1
