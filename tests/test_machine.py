"""lotus_kernels.machine: the record of where a time was measured."""

import json

import torch

from lotus_kernels import machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14 96-Core Processor
cache size\t: 1024 KB
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16 avx512_vnni

processor\t: 1
model name\t: AMD EPYC 9B14 96-Core Processor
"""


def test_reads_model_cache_and_flags_from_cpuinfo():
    assert machine.cpu_model(CPUINFO) == "AMD EPYC 9B14 96-Core Processor"
    assert machine.cpu_cache(CPUINFO) == "1024 KB"
    # in CPU_FLAGS order, only the ones the kernels choose between (no fpu / sse2)
    assert machine.cpu_flags(CPUINFO) == [
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_vnni",
        "avx512_bf16",
    ]
    assert machine.cpu_flags("") == [] and machine.cpu_cache("") is None


def test_summary_names_cpu_isa_and_torch():
    d = {
        "cpu_model": "AMD EPYC 9B14 96-Core Processor",
        "cpu_cache": "1024 KB",
        "cpu_usable": 2,
        "cpu_count": 4,
        "cpu_flags": ["avx2", "fma", "avx512f", "avx512_bf16"],
        "lotus_cpu_isa": "avx512_bf16",
        "torch": "2.11.0",
    }
    assert machine.summary(d) == (
        "AMD EPYC 9B14 96-Core Processor with 1024 KB cache, 2 of 4 CPUs (AVX-512 BF16; lotus CPU kernels "
        "avx512_bf16), torch 2.11.0"
    )
    d.update(cpu_flags=["avx2", "amx_tile"], lotus_cpu_isa=None, cpu_cache=None, gpu="NVIDIA H200")
    assert (
        machine.summary(d) == "AMD EPYC 9B14 96-Core Processor, 2 of 4 CPUs (AVX2 + AMX), torch 2.11.0, GPU NVIDIA H200"
    )
    assert "(no AVX2)" in machine.summary(dict(d, cpu_flags=[]))


def test_describe_here_is_json_and_matches_the_summary():
    d = machine.describe("cpu")
    json.dumps(d)  # goes into results files as it is
    assert d["torch"] == torch.__version__ and d["device"] == "cpu" and "gpu" not in d
    assert 1 <= d["cpu_usable"] <= d["cpu_count"]
    assert set(d["cpu_flags"]) <= set(machine.CPU_FLAGS)
    line = machine.summary(d)
    assert line.startswith(d["cpu_model"]) and f"torch {torch.__version__}" in line


def test_benchmark_results_carry_the_record(tmp_path, monkeypatch):
    """The benchmarks' result files start from the same record, plus the date and the arguments, and
    their markdown header names the CPU, its flags and our kernels' ISA."""
    import argparse
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _harness

    monkeypatch.setattr(_harness, "RESULTS_DIR", tmp_path)
    meta = _harness.env_meta(argparse.Namespace(batch=8), torch.device("cpu"))
    here = machine.describe("cpu")
    assert {k: meta[k] for k in here} == here
    assert meta["args"] == {"batch": 8} and meta["date"]
    md = _harness.write_results("x", meta, [{"a": 1.0}], [("a", "a", ".1f")], lambda rows: _figure())
    assert meta["cpu_model"] in md and ", ".join(meta["cpu_flags"]) in md
    assert f"lotus CPU ISA {meta.get('lotus_cpu_isa', '-')}" in md
    if meta["cpu_cache"]:
        assert f"{meta['cpu_model']} with {meta['cpu_cache']} cache (" in md
    assert json.loads((tmp_path / "x.json").read_text())["meta"]["cpu_cache"] == meta["cpu_cache"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    return fig
