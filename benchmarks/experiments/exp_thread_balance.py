"""Experiment (not part of `make bench`): thread balance and a load-robust thread-scaling estimate
for BlockSparseLinear vs dense nn.Linear fwd+bwd (Linux only).

On a shared VM, wall-clock times at 2+ threads are dominated by whichever thread the hypervisor
deschedules. This measures each thread's own on-CPU time instead (``/proc/self/task/*/schedstat``,
ns) with ``OMP_WAIT_POLICY=passive`` (a thread waiting at a barrier sleeps rather than spins, so it
is not charged for waiting). The busiest thread's time is what a quiet machine's wall clock would
show; sum / busiest says how evenly the work is split (= threads when perfectly balanced).

    PYTHONPATH=. python benchmarks/experiments/exp_thread_balance.py --threads 2 --shapes 384x1536,1536x384 \\
        --dtypes fp32,bf16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

try:
    from benchmarks import bench_sparse_linear as bench
except ImportError:  # run as a script without the repo root on sys.path: the benchmark is one level up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import bench_sparse_linear as bench


def thread_times() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0])
        except OSError:  # the thread ended
            pass
    return out


def busy(fn, calls: int) -> list[float]:
    """Per-thread on-CPU ms per call, busiest first."""
    for _ in range(3):
        fn()
    t0 = thread_times()
    for _ in range(calls):
        fn()
    t1 = thread_times()
    per = sorted(((t1[k] - t0.get(k, 0)) / calls / 1e6 for k in t1), reverse=True)
    return [t for t in per if t > 0.01]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="384x1536,1536x384,768x3072,3072x768")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--densities", default="0.5,0.3,0.1")
    p.add_argument("--m", type=int, default=1576)
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]
    print(
        f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; per config: busiest thread ms, "
        "sum / busiest, busiest / dense busiest"
    )
    for dt in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            in_f, out_f = map(int, shape.split("x"))
            configs, _ = bench.block_layer_configs(
                in_f, out_f, args.m, densities, 32, torch.device("cpu"), bench.DTYPES[dt]
            )
            res = {k: busy(fn, args.calls) for k, fn in configs.items() if k == "dense" or k.startswith("lotus")}
            dense = res["dense"][0]
            print(
                f"{dt} {args.m}x{in_f}->{out_f}: "
                + " | ".join(f"{k} {t[0]:.1f} ms, {sum(t) / t[0]:.2f}, {t[0] / dense:.3f}" for k, t in res.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
