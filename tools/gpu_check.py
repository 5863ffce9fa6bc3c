"""``make gpu-check``: everything a lent GPU should tell us, in one call of <= 300 s on a 16-core host.

1. environment: GPU name, capability, SMs, torch / triton / CUDA / nvcc versions;
2. build the extensions in place with this machine's own python3 and torch (no venv, no pip), from
   tools/extensions.py's source list (the one setup.py uses), for the present GPU's architecture only,
   MAX_JOBS = the CPU count; ``--skip-build`` reuses an earlier run's build;
3. the GPU tests (``pytest -m cuda``, pytest-xdist workers when it is there) in two passes: first every
   op x dtype x backend against its reference (tests/ops, tests/triton, the ViT-B sizes), then the
   rest if time allows; the whole output in pytest.log;
4. the GPU benchmarks with goals and roofline predictions (``benchmarks/bench_gpu.py``) in priority
   order: ViT-B token-drop train step, block-sparse ViT-B MLP layers vs cuBLAS, attention + CLS
   scores vs flash SDPA, 2:4; last the CPU block-sparse layer at 1 / 4 / 8 / 16 threads;
5. results in ``--out`` (default benchmarks/results/gpu/), six files and no folder: gpu_check.json
   (environment, build, tests, every row, goals, autotuned configs), gpu_check.md, gpu_check.png,
   gpu_check.log, pytest.log, tuned_table.py; then a one-screen summary printed last.

Every step has a deadline inside ``--budget``: the build runs to its end (a failed build is the answer),
the tests get half of what is left after it, the benchmarks the rest (the CPU section 15% of that), and a
section that would start past the deadline is skipped and reported so. How 300 s was estimated:
docs/design/gpu_check.md.

Without a CUDA GPU it prints one line and exits 0; ``--dry-run`` runs every step anyway (the build for
sm_90, the test passes selecting no test, the benchmarks on tiny CPU sizes) to check this script. Exit
status otherwise: 0 when the build and the tests passed (missed speed goals are reported, not
failures), 1 if not.

    python3 tools/gpu_check.py [--budget 300] [--out DIR] [--skip-build] [--skip-tests] [--sections ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu"
T0 = time.monotonic()
# Benchmark sections in priority order: the headline train step first, the CPU thread scaling last.
SECTIONS = ("vit_step", "block", "attention", "semi24", "cpu_threads")


def no_gpu_line() -> str | None:
    """None when a CUDA GPU is usable; else the one line to print."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"gpu-check: skipped, {sys.executable} cannot import torch ({type(e).__name__}); nothing to check"
    if not torch.cuda.is_available():
        return (
            f"gpu-check: skipped, no CUDA GPU visible to torch {torch.__version__} here; "
            f"run `make gpu-check` where a GPU is lent"
        )
    return None


class Log:
    def __init__(self, path: Path):
        self.f = path.open("w")

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def elapsed() -> float:
    return time.monotonic() - T0


def environment() -> dict:
    import torch

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            sms=props.multi_processor_count,
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:  # --dry-run
        env.update(gpu="none (dry run on the CPU)", capability="-", sms=0, gpu_memory_gib=0)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"unavailable: {type(e).__name__}"
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        env["nvcc"] = re.findall(r"release ([\d.]+)", out)[-1]
    except Exception:  # noqa: BLE001
        env["nvcc"] = "not found"
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        env["git_commit"] = "unknown"
    return env


def build(log, dry_run: bool) -> dict:
    """Compile both extensions in place with this interpreter's torch (``setup.py build_ext``), for the
    present GPU's architecture only (sm_90 on a dry run: the lent H200's). setuptools builds extensions
    one after the other, so ``_C`` and ``_cuda`` are built by two processes at once (each its own build
    directory): the build then takes as long as its slowest translation unit, not the sum of the two
    extensions' slowest (docs/design/gpu_check.md). ninja keeps the objects: a second run recompiles
    nothing."""
    import torch

    if dry_run or not torch.cuda.is_available():
        major, minor = 9, 0
    else:
        major, minor = torch.cuda.get_device_capability(0)
    env = dict(
        os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 4), LOTUS_BUILD_CUDA="1"
    )
    t0 = time.monotonic()
    procs = {}
    for name in ("_C", "_cuda"):
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp", f"build/gpu_check{name}"]
        log(
            f"build: {' '.join(cmd)} (LOTUS_BUILD_ONLY={name}, TORCH_CUDA_ARCH_LIST={major}.{minor}, "
            f"MAX_JOBS={env['MAX_JOBS']})"
        )
        procs[name] = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env, LOTUS_BUILD_ONLY=name),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    codes = {}
    for name, proc in procs.items():
        out, err = proc.communicate()
        codes[name] = proc.returncode
        if proc.returncode != 0:
            log(f"build {name}:", out[-3000:], err[-6000:])
    took = time.monotonic() - t0
    ok = all(c == 0 for c in codes.values())
    log(f"build: exit {codes} in {took:.0f} s")
    result = {"ok": ok, "seconds": round(took), "arch": f"{major}.{minor}", "how": "setup.py"}
    if not ok or os.environ.get("LOTUS_GPU_CHECK_JIT") == "1":
        # e.g. a setuptools too old for pyproject.toml's metadata: build the same two extensions with
        # torch's JIT builder instead (ninja, same sources and flags: tools/extensions.py), in a
        # subprocess so that this process does not load them before lotus_kernels does
        t0 = time.monotonic()
        ok = _build_jit(log, env)
        result.update(ok=ok, how="torch.utils.cpp_extension.load", seconds=round(took + time.monotonic() - t0))
    return result


_JIT_BUILD = r"""
import importlib.util, shutil, sys, sysconfig
from pathlib import Path
from torch.utils.cpp_extension import load
root = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("extensions", root / "tools" / "extensions.py")
extensions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extensions)
suffix = sysconfig.get_config_var("EXT_SUFFIX")
for ext in extensions.extensions(cuda=True):
    out = root / "build" / f"jit{ext['name']}"
    out.mkdir(parents=True, exist_ok=True)
    load(name=ext["name"], sources=[str(root / s) for s in ext["sources"]], build_directory=str(out),
         is_python_module=False, verbose=False, extra_cflags=ext["cxx"], extra_cuda_cflags=ext["nvcc"],
         extra_ldflags=ext["ldflags"])
    shutil.copy(out / f"{ext['name']}.so", root / "lotus_kernels" / f"{ext['name']}{suffix}")
"""


def _build_jit(log, env) -> bool:
    log("build: falling back to torch.utils.cpp_extension.load")
    env = dict(env)
    if "CUDA_HOME" not in env and "CUDA_PATH" not in env:  # as setup.py: nvcc may be a wrapper outside the toolkit
        nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
        if nvcc:
            env["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    done = subprocess.run(
        [sys.executable, "-c", _JIT_BUILD, str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        log(done.stdout[-3000:], done.stderr[-6000:])
    log(f"build (jit): exit {done.returncode}")
    return done.returncode == 0


# The GPU tests in two passes. The first covers every op x dtype x backend against its reference on
# CUDA tensors (the op tests, the Triton kernel tests, the ViT-B sizes the interpreter cannot afford);
# the second, only if time is left, everything else that runs on the GPU (modules, torch.compile,
# ViT patching, host-sync counting), where inductor's own compilation makes tests slow.
TEST_PASSES = (
    ("ops", ["tests/ops", "tests/triton", "tests/test_gpu_sizes.py"]),
    ("rest", ["tests", "--ignore=tests/ops", "--ignore=tests/triton", "--ignore=tests/test_gpu_sizes.py"]),
)


MIN_PASS_SECONDS = 20  # a pass needs at least this long for pytest to start and collect


def run_tests(log, deadline: float, out_dir: Path) -> dict:
    """``pytest -m cuda`` pass by pass until ``deadline`` (time.monotonic()); the whole output goes to
    pytest.log, the failures and counts into the report."""
    workers = []
    try:
        import xdist  # noqa: F401

        workers = ["-n", str(min(16, os.cpu_count() or 1))]
    except ImportError:
        pass
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = {"ok": True, "passes": {}, "counts": {}, "failed": [], "seconds": 0}
    with (out_dir / "pytest.log").open("w") as full:
        for name, paths in TEST_PASSES:
            left = deadline - time.monotonic()
            if left < MIN_PASS_SECONDS:
                result["passes"][name] = "skipped: out of time"
                log(f"tests {name}: skipped (out of time)")
                continue
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                *paths,
                "-m",
                "cuda",
                "-q",
                "-p",
                "no:cacheprovider",
                "-rfE",
                "--no-header",
                *workers,
            ]
            log(f"tests {name}: {' '.join(cmd[3:])} (timeout {left:.0f} s)")
            t0 = time.monotonic()
            # its own process group, so that on a timeout the xdist workers (which hold the GPU) go too
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                out, _ = proc.communicate(timeout=left)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                rc = "timeout"
            took = time.monotonic() - t0
            full.write(f"===== pass {name}: exit {rc} in {took:.0f} s\n{out}\n")
            lines = out.strip().splitlines()
            summary = next(
                (
                    ln.strip("= ")
                    for ln in reversed(lines)
                    if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s", ln)
                ),
                "",
            )
            for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary):
                result["counts"][k] = result["counts"].get(k, 0) + int(v)
            result["failed"] += [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:50]
            # exit 5: nothing selected (no GPU on a dry run: every test is a CPU test there)
            ok = rc in (0, 5)
            result["ok"] &= ok
            result["passes"][name] = f"exit {rc} in {took:.0f} s: {summary or 'no summary'}"
            result["seconds"] += round(took)
            log(f"tests {name}: {result['passes'][name]}")
            for ln in result["failed"][-10:]:
                log(f"  {ln[:200]}")
    result["summary"] = ", ".join(f"{v} {k}" for k, v in result["counts"].items()) or "no GPU tests ran"
    return result


def bench_cpu_threads(smoke: bool, deadline: float, log) -> list[dict]:
    """The CPU block-sparse layer at 1 / 4 / 8 / 16 threads (as many as the host has): the lent GPU host's
    CPU cores are the only many-core CPU this project sees. ViT-B fc1 shape (768 -> 3072, 8 images of
    197 tokens), fp32, dense nn.Linear vs BlockSparseLinear at densities 0.5 / 0.1, fwd + bwd, interleaved."""
    import torch
    from torch import nn

    import lotus_kernels as lk
    from lotus_kernels.nn import BlockSparseLinear

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    m, in_f, out_f = (64, 64, 128) if smoke else (8 * 197, 768, 3072)
    rows, before = [], torch.get_num_threads()
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f)
    layers = {
        "dense": dense,
        **{f"lotus d={d}": BlockSparseLinear.from_linear(dense, density=d, block_size=32) for d in (0.5, 0.1)},
    }
    x = torch.randn(m, in_f, requires_grad=True)
    g = torch.randn(m, out_f)
    timer = bench_gpu.Timer(torch.device("cpu"), warmup=1, rounds=2 if smoke else 5, reps=1)
    try:
        for threads in (1, 4, 8, 16):
            if threads > (os.cpu_count() or 1) or time.monotonic() > deadline:
                continue
            torch.set_num_threads(threads)

            def step(layer):
                return lambda: torch.autograd.grad(layer(x), (x, *layer.parameters()), g)

            times = timer.run({name: step(layer) for name, layer in layers.items()})
            for r in bench_gpu.rows_from(
                "cpu_threads",
                times,
                "dense",
                {
                    "shape": f"{m}x{in_f}->{out_f}",
                    "threads": threads,
                    "dtype": "fp32",
                    "pass": "fwd+bwd",
                    "kernel": lk.cpu_kernel_path("block_sparse_linear.fwd", torch.float32),
                },
            ):
                rows.append(r)
            log(f"bench cpu_threads {threads}: " + ", ".join(f"{r['config']} {r['ratio']:.3f}" for r in rows[-3:]))
    finally:
        torch.set_num_threads(before)
    return rows


def plot(rows, goals, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in goals if g["value"] is not None]
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(shown), 4) + 1.5))
    labels = [f"{g['section']}: {g['goal']}" for g in shown]
    values = [g["value"] for g in shown]
    colors = ["tab:green" if g["met"] else "tab:red" for g in shown]
    ax.barh(range(len(shown)), values, color=colors)
    for i, g in enumerate(shown):
        ax.plot([g["target"], g["target"]], [i - 0.4, i + 0.4], color="black")
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to baseline (speed-up for '>=' goals); black tick = goal; green = met")
    ax.set_title("make gpu-check: measured vs goals")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def markdown(report: dict) -> str:
    env, rows, goals = report["environment"], report["rows"], report["goals"]
    lines = [
        f"# make gpu-check on {env['gpu']}",
        "",
        f"{env['date']}, commit {env['git_commit']}: torch {env['torch']} (CUDA {env['torch_cuda']}), triton "
        f"{env['triton']}, nvcc {env['nvcc']}, sm {env['capability']}, {env['sms']} SMs, Python {env['python']}, "
        f"{env['cpu_count']} CPUs; backends {report['backends']}",
        "",
        f"Build: {report['build']}",
        "",
        f"Tests: {report['tests'].get('summary')}; passes: {report['tests'].get('passes')}",
        "",
        "## Goals",
        "",
        "| section | goal | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for g in goals:
        v = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        lines.append(
            f"| {g['section']} | {g['goal']} | {v} | {g['kind']} {g['target']} | "
            f"{'n/a' if g['met'] is None else ('yes' if g['met'] else 'NO')} |"
        )
    lines += [
        "",
        "## All rows (median of interleaved rounds; CUDA events on the GPU)",
        "",
        "Predicted: the roofline time of the row (bench_gpu.py); measured / predicted > 1 is the gap to it.",
        "",
        "| section | config | detail | median ms | predicted ms | measured / predicted | ratio | paired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        detail = ", ".join(
            f"{k}={r[k]}" for k in ("shape", "density", "pass", "backend", "threads", "dtype", "best") if k in r
        )
        med = "" if r.get("median_ms") is None else f"{r['median_ms']:.3f}"
        pred = r.get("predicted_ms")
        vs = "" if pred is None or r.get("median_ms") is None else f"{r['median_ms'] / pred:.2f}"
        paired = "" if r.get("ratio_paired") is None else f"{r['ratio_paired']:.3f}"
        lines.append(
            f"| {r['section']} | {r['config']} | {detail} | {med} | {'' if pred is None else f'{pred:.3f}'} | "
            f"{vs} | {r['ratio']:.3f} | {paired} |"
        )
    lines += [
        "",
        f"Bench status: {report['bench_status']}",
        "",
        "Autotuned Triton configs (table format; `python3 tools/gpu_check.py --apply-configs "
        "benchmarks/results/gpu/gpu_check.json` writes them into lotus_kernels/triton/_configs.py):",
        "",
        "```",
    ]
    lines += [f"{tuple(k)!r}: {v!r}" for k, v in report.get("tuned_table", [])] + ["```", ""]
    return "\n".join(lines)


def _status(step: dict) -> str:
    if step.get("skipped"):
        return "skipped"
    text = "ok" if step.get("ok") else "FAILED"
    return f"{text} in {step.get('seconds')} s" + (f": {step['summary']}" if step.get("summary") else "")


def summary(report: dict) -> str:
    env, goals = report["environment"], report["goals"]
    out = [
        "=" * 78,
        f"gpu-check summary: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {elapsed():.0f} s",
        f"build: {_status(report['build'])}; tests: {_status(report['tests'])}",
    ]
    for f in report["tests"].get("failed", [])[:8]:
        out.append(f"  {f[:150]}")
    out.append(f"{'goal':58s} {'measured':>9s} {'target':>9s}")
    for g in goals:
        v = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        mark = "" if g["met"] is None else ("ok" if g["met"] else "MISSED")
        out.append(f"{(g['section'] + ': ' + g['goal'])[:58]:58s} {v:>9s} {g['kind']}{g['target']:>7} {mark}")
    block = [r for r in report["rows"] if r["section"] == "block" and r.get("pass") == "fwd+bwd"]
    wins = {}
    for r in block:
        if r["config"].startswith("lotus"):
            key = (r["shape"], r["density"])
            if key not in wins or r["ratio"] < wins[key][1]:
                wins[key] = (r["config"], r["ratio"])
    if wins:
        counts = {}
        for name, _ in wins.values():
            counts[name] = counts.get(name, 0) + 1
        out.append(
            f"block-sparse fastest backend per (shape, density): {counts} "
            f"(default order on CUDA: {report['backend_order']})"
        )
    out.append(f"results: {report['out_dir']}/{{{','.join(RESULT_FILES)}}}")
    return "\n".join(out)


def apply_configs(path: Path) -> int:
    """Merge the ``tuned_table`` of a gpu_check.json into the committed config table."""
    sys.path.insert(0, str(ROOT))
    from lotus_kernels.triton import _configs

    entries = json.loads(Path(path).read_text()).get("tuned_table", [])
    table = {tuple(tuple(x) if isinstance(x, list) else x for x in key): cfg for key, cfg in entries}
    _configs.write_table(table)
    print(f"gpu-check: {len(table)} tuned configs written into {Path(_configs.__file__).relative_to(ROOT)}")
    return 0


# What `--out` receives: at most 8 files, none in a sub-folder (the lent machine returns no more).
RESULT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.png", "gpu_check.log", "pytest.log", "tuned_table.py")
assert len(RESULT_FILES) <= 8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=300, help="seconds for the whole check (default 300)")
    p.add_argument("--skip-build", action="store_true", help="reuse the extensions built by an earlier run")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument(
        "--sections",
        nargs="*",
        default=None,
        help=f"benchmark sections, in this order by default: {' '.join(SECTIONS)}",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {DEFAULT_OUT.relative_to(ROOT)}); receives {len(RESULT_FILES)} files",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="without a GPU: the same steps, where the GPU's absence stubs them out (the build for "
        "sm_90, `pytest -m cuda` selecting nothing, the benchmarks on tiny CPU sizes)",
    )
    p.add_argument(
        "--apply-configs",
        type=Path,
        metavar="JSON",
        help="write the autotuned configs of a gpu_check.json into lotus_kernels/triton/_configs.py; runs nothing else",
    )
    args = p.parse_args(argv)
    if args.apply_configs:
        return apply_configs(args.apply_configs)
    unknown = [s for s in args.sections or () if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)}; expected some of {', '.join(SECTIONS)}")
    out_dir = args.out or DEFAULT_OUT
    line = None if args.dry_run else no_gpu_line()
    if line is not None:
        print(line)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = T0 + args.budget - 10  # the last seconds write the results
    log = Log(out_dir / "gpu_check.log")
    env = environment()
    log(f"gpu-check: {env}")
    report = {
        "out_dir": str(out_dir),
        "environment": env,
        "budget_s": args.budget,
        "build": {"skipped": True},
        "tests": {"skipped": True},
        "rows": [],
        "goals": [],
        "bench_status": {},
        "tuned_configs": {},
    }
    if not args.skip_build:
        report["build"] = build(log, args.dry_run)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    if not args.skip_tests:
        # the tests get half of what is left, the benchmarks the other half
        report["tests"] = run_tests(log, time.monotonic() + 0.5 * (deadline - time.monotonic()), out_dir)
    import lotus_kernels
    from lotus_kernels import _backend
    from lotus_kernels.triton import _configs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    report["backends"] = lotus_kernels.backends()
    report["backend_errors"] = lotus_kernels.backend_errors()
    report["backend_order"] = _backend.PREFERENCE["cuda"]
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    sections = args.sections or list(SECTIONS)
    gpu_sections = [s for s in sections if s != "cpu_threads"]
    # the CPU section keeps ~15% of the benchmark time for itself
    cpu_reserve = 0.15 * (deadline - time.monotonic()) if "cpu_threads" in sections else 0.0
    rows, status = bench_gpu.run(device, gpu_sections, smoke=args.dry_run, deadline=deadline - cpu_reserve, log=log)
    if "cpu_threads" in sections:
        t0 = time.monotonic()
        try:
            got = bench_cpu_threads(args.dry_run, deadline, log)
            rows += got
            status["cpu_threads"] = f"ok in {time.monotonic() - t0:.0f} s" if got else "skipped: out of time"
        except Exception as e:  # noqa: BLE001  (a broken section must not lose the others' results)
            status["cpu_threads"] = f"error: {type(e).__name__}: {e}"
            log(traceback.format_exc())
    tuned = _configs.tuned_table()
    report.update(
        rows=rows,
        bench_status=status,
        goals=bench_gpu.goal_rows(rows),
        tuned_configs=_configs.tuned_configs(),
        tuned_table=[[list(k), v] for k, v in tuned.items()],
    )
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(report))
    (out_dir / "tuned_table.py").write_text(
        "# The autotuner's winners of this run, in lotus_kernels/triton/_configs.py's TABLE format\n"
        f"# ({env['gpu']}, torch {env['torch']}, triton {env['triton']}); `--apply-configs gpu_check.json` merges them.\n"
        + _configs.table_source(tuned)
        + "\n"
    )
    try:
        plot(rows, report["goals"], out_dir / "gpu_check.png")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {type(e).__name__}: {e}")
    text = summary(report)
    log.f.write(text + "\n")
    log.f.close()
    print(text, flush=True)
    return 0 if report["build"].get("ok", True) and report["tests"].get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
