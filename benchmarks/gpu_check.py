"""``make gpu-check``: everything a lent GPU should tell us, in one call of <= 8 minutes.

1. environment: GPU name, capability, SMs, torch / triton / CUDA / nvcc versions;
2. build the extensions in place with this machine's own python3 and torch (no venv, no pip: the
   version pins in pyproject.toml are not consulted), for the present GPU's architecture only
   (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability()), MAX_JOBS = the CPU count;
3. every GPU test: ``pytest -m cuda`` (each op and backend against the reference in fp32 / bf16 / fp16,
   the ViT-B sizes the interpreter cannot afford, no host sync in a train step), in parallel workers
   when pytest-xdist is there;
4. the GPU benchmarks with goals (``benchmarks/bench_gpu.py``), within what is left of the budget;
5. results in benchmarks/results/gpu/: gpu_check.json (environment, build, tests, every row, goals,
   autotuned configs), gpu_check.md, gpu_check.png, gpu_check.log; then a one-screen summary of
   measured ratios against the goals, printed last.

Without a CUDA GPU it prints one line and exits 0. Exit status otherwise: 0 when the build and the
tests passed (missed speed goals are reported, not failures), 1 if not.

    python3 benchmarks/gpu_check.py [--budget 470] [--skip-build] [--skip-tests] [--sections block ...]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "gpu"
T0 = time.monotonic()


def no_gpu_line() -> str | None:
    """None when a CUDA GPU is usable; else the one line to print."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"gpu-check: skipped, {sys.executable} cannot import torch ({type(e).__name__}); nothing to check"
    if not torch.cuda.is_available():
        return (f"gpu-check: skipped, no CUDA GPU visible to torch {torch.__version__} here; "
                f"run `make gpu-check` where a GPU is lent")
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
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
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
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        env["git_commit"] = "unknown"
    return env


def build(log) -> dict:
    import torch
    major, minor = torch.cuda.get_device_capability(0)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 4),
               LOTUS_BUILD_CUDA="1")
    t0 = time.monotonic()
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    log(f"build: {' '.join(cmd)} (TORCH_CUDA_ARCH_LIST={major}.{minor}, MAX_JOBS={env['MAX_JOBS']})")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    if done.returncode != 0:
        log(done.stdout[-3000:], done.stderr[-6000:])
    log(f"build: exit {done.returncode} in {took:.0f} s")
    result = {"ok": done.returncode == 0, "seconds": round(took), "arch": f"{major}.{minor}", "how": "setup.py"}
    if done.returncode != 0 or os.environ.get("LOTUS_GPU_CHECK_JIT") == "1":
        # e.g. a setuptools too old for pyproject.toml's metadata: build the same two extensions with
        # torch's JIT builder instead (ninja, same flags), in a subprocess so that this process does
        # not load them before lotus_kernels does
        t0 = time.monotonic()
        ok = _build_jit(log, env)
        result.update(ok=ok, how="torch.utils.cpp_extension.load", seconds=round(took + time.monotonic() - t0))
    return result


_JIT_BUILD = r"""
import glob, shutil, sys, sysconfig
from pathlib import Path
from torch.utils.cpp_extension import load
root = Path(sys.argv[1])
suffix = sysconfig.get_config_var("EXT_SUFFIX")
exts = [("_C", ["csrc/module.cpp", "csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
         dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])),
        ("_cuda", ["csrc/module.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))], dict(extra_cuda_cflags=["-O3"]))]
for name, sources, flags in exts:
    out = root / "build" / f"jit{name}"
    out.mkdir(parents=True, exist_ok=True)
    load(name=name, sources=[str(root / s) for s in sources], build_directory=str(out), is_python_module=False,
         verbose=False, **flags)
    shutil.copy(out / f"{name}.so", root / "lotus_kernels" / f"{name}{suffix}")
"""


def _build_jit(log, env) -> bool:
    log("build: falling back to torch.utils.cpp_extension.load")
    env = dict(env)
    if "CUDA_HOME" not in env and "CUDA_PATH" not in env:  # as setup.py: nvcc may be a wrapper outside the toolkit
        nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
        if nvcc:
            env["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    done = subprocess.run([sys.executable, "-c", _JIT_BUILD, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        log(done.stdout[-3000:], done.stderr[-6000:])
    log(f"build (jit): exit {done.returncode}")
    return done.returncode == 0


def run_tests(log, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rfE",
           "--no-header"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    log(f"tests: {' '.join(cmd[1:])} (timeout {timeout:.0f} s)")
    t0 = time.monotonic()
    # its own process group, so that on a timeout the xdist workers (which hold the GPU) go too
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = "timeout"
    took = time.monotonic() - t0
    lines = out.strip().splitlines()
    log("\n".join(lines[-60:]))
    summary = next((ln.strip("= ") for ln in reversed(lines)
                    if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s", ln)), "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    log(f"tests: exit {rc} in {took:.0f} s: {summary}")
    return {"ok": rc == 0, "exit": rc, "seconds": round(took), "summary": summary, "counts": counts,
            "failed": failed[:50]}


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
    lines = [f"# make gpu-check on {env['gpu']}", "",
             f"{env['date']}, commit {env['git_commit']}: torch {env['torch']} (CUDA {env['torch_cuda']}), triton "
             f"{env['triton']}, nvcc {env['nvcc']}, sm {env['capability']}, {env['sms']} SMs, Python {env['python']}, "
             f"{env['cpu_count']} CPUs; backends {report['backends']}", "",
             f"Build: {report['build']}", "", f"Tests: {report['tests'].get('summary')}", "",
             "## Goals", "", "| section | goal | measured | target | met |", "|---|---|---|---|---|"]
    for g in goals:
        v = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        lines.append(f"| {g['section']} | {g['goal']} | {v} | {g['kind']} {g['target']} | "
                     f"{'n/a' if g['met'] is None else ('yes' if g['met'] else 'NO')} |")
    lines += ["", "## All rows (bf16; median of interleaved rounds, CUDA events)", "",
              "| section | config | detail | median ms | ratio | paired |", "|---|---|---|---|---|---|"]
    for r in rows:
        detail = ", ".join(f"{k}={r[k]}" for k in ("shape", "density", "pass", "backend", "best") if k in r)
        med = "" if r.get("median_ms") is None else f"{r['median_ms']:.3f}"
        paired = "" if r.get("ratio_paired") is None else f"{r['ratio_paired']:.3f}"
        lines.append(f"| {r['section']} | {r['config']} | {detail} | {med} | {r['ratio']:.3f} | {paired} |")
    lines += ["", f"Bench status: {report['bench_status']}", "",
              "Autotuned Triton configs (table format; `python3 benchmarks/gpu_check.py --apply-configs "
              "benchmarks/results/gpu/gpu_check.json` writes them into lotus_kernels/triton/_configs.py):", "", "```"]
    lines += [f"{tuple(k)!r}: {v!r}" for k, v in report.get("tuned_table", [])] + ["```", ""]
    return "\n".join(lines)


def _status(step: dict) -> str:
    if step.get("skipped"):
        return "skipped"
    text = "ok" if step.get("ok") else "FAILED"
    return f"{text} in {step.get('seconds')} s" + (f": {step['summary']}" if step.get("summary") else "")


def summary(report: dict) -> str:
    env, goals = report["environment"], report["goals"]
    out = ["=" * 78, f"gpu-check summary: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
           f"{elapsed():.0f} s", f"build: {_status(report['build'])}; tests: {_status(report['tests'])}"]
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
        out.append(f"block-sparse fastest backend per (shape, density): {counts} "
                   f"(default order on CUDA: {report['backend_order']})")
    out.append(f"results: {OUT_DIR}/gpu_check.{{json,md,png,log}}")
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


def main(argv=None) -> int:
    global OUT_DIR
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=470, help="seconds for the whole check (default 470)")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--sections", nargs="*", default=None, help="benchmark sections (default: all)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder (default {OUT_DIR.relative_to(ROOT)})")
    p.add_argument("--dry-run", action="store_true",
                   help="without a GPU: no build, no tests, tiny benchmarks on the CPU (checks this script)")
    p.add_argument("--apply-configs", type=Path, metavar="JSON",
                   help="write the autotuned configs of a gpu_check.json into lotus_kernels/triton/_configs.py; "
                        "runs nothing else")
    args = p.parse_args(argv)
    if args.apply_configs:
        return apply_configs(args.apply_configs)
    OUT_DIR = args.out or OUT_DIR
    line = None if args.dry_run else no_gpu_line()
    if line is not None:
        print(line)
        return 0
    if args.dry_run:
        args.skip_build = args.skip_tests = True
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    log = Log(OUT_DIR / "gpu_check.log")
    env = environment()
    log(f"gpu-check: {env}")
    report = {"environment": env, "build": {"skipped": True}, "tests": {"skipped": True}, "rows": [], "goals": [],
              "bench_status": {}, "tuned_configs": {}}
    if not args.skip_build:
        report["build"] = build(log)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    if not args.skip_tests:
        # tests get what is left after keeping ~40% of the remainder for the benchmarks
        report["tests"] = run_tests(log, timeout=max(60.0, 0.6 * (args.budget - elapsed()) - 10))
    import lotus_kernels
    from lotus_kernels import _backend
    from lotus_kernels.triton import _configs

    import bench_gpu
    report["backends"] = lotus_kernels.backends()
    report["backend_errors"] = lotus_kernels.backend_errors()
    report["backend_order"] = _backend.PREFERENCE["cuda"]
    sections = args.sections or ["vit_step", "block", "semi24", "attention"]  # the headline goal first
    import torch
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows, status = bench_gpu.run(device, sections, smoke=args.dry_run, deadline=T0 + args.budget - 25, log=log)
    report.update(rows=rows, bench_status=status, goals=bench_gpu.goal_rows(rows), tuned_configs=_configs.tuned_configs(),
                  tuned_table=[[list(k), v] for k, v in _configs.tuned_table().items()])
    (OUT_DIR / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (OUT_DIR / "gpu_check.md").write_text(markdown(report))
    try:
        plot(rows, report["goals"], OUT_DIR / "gpu_check.png")
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {type(e).__name__}: {e}")
    text = summary(report)
    log.f.write(text + "\n")
    log.f.close()
    print(text, flush=True)
    return 0 if report["build"].get("ok", True) and report["tests"].get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
