"""The roofline predictions beside bench_gpu's rows (benchmarks/roofline.py) and the goals they move: no
timing here, the rows are built from made-up times at the benchmark's real (ViT-B) sizes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402
import roofline  # noqa: E402

M = 64 * 197


def block_rows(d, shape="768->3072", dense_ms=0.30, sparse_ms=0.12):
    extra = {"shape": shape, "density": d, "M": M, "block": 32, "dtype": "bfloat16", "pass": "fwd+bwd"}
    times = {"dense (cuBLAS)": [dense_ms / 1e3] * 3, "lotus triton": [sparse_ms / 1e3] * 3}
    return bench_gpu.rows_from("block", times, "dense (cuBLAS)", extra)


def test_linear_layer_roofline_at_vit_b_sizes():
    dense, sparse = block_rows(0.1)
    # fc1 768 -> 3072 fwd + bwd: 6 M in out = 178.5 GFLOP, compute-bound; at d = 0.1 the activations
    # (x, y, dy, dx, dy, x and dy again for the bias) dominate: memory-bound, ~369 MB at 4.3 TB/s
    assert dense["gflop"] == pytest.approx(6 * M * 768 * 3072 / 1e9, rel=1e-3) and dense["bound"] == "compute"
    assert dense["floor_ms"] == pytest.approx(178.5e9 / 790e12 * 1e3 + 77.46e6 / 4.3e12 * 1e3, rel=1e-2)
    assert sparse["bound"] == "memory" and sparse["mbytes"] == pytest.approx(369.4, rel=1e-2)
    assert sparse["floor_ms"] == pytest.approx(sparse["mbytes"] * 1e6 / 4.3e12 * 1e3, rel=1e-3)
    assert sparse["predicted_ms"] == pytest.approx(sparse["floor_ms"] + sparse["kernels"] * 3e-3)
    assert sparse["floor_ratio"] == pytest.approx(sparse["floor_ms"] / dense["floor_ms"])
    assert sparse["measured_over_predicted"] == pytest.approx(0.12 / sparse["predicted_ms"])


@pytest.mark.parametrize("shape", ["768->3072", "3072->768"])
def test_a_goal_below_the_floor_moves_to_floor_plus_10_percent(shape):
    goals = {g["goal"]: g for g in bench_gpu.goal_rows(block_rows(0.1, shape) + block_rows(0.5, shape))}
    low, half = goals[f"d=0.1 {shape} lotus triton"], goals[f"d=0.5 {shape} lotus triton"]
    assert low["target_original"] == 0.2 and low["floor"] > 0.3  # fc1 ~0.35, fc2 ~0.31
    assert low["target"] == round(1.1 * low["floor"], 3) and "unreachable" in low["note"]
    assert low["met"] == (0.4 <= low["target"])
    assert half["target"] == half["target_original"] == 0.65 and half["note"] is None and half["floor"] < 0.6


def test_attention_goal_takes_the_faster_path_and_its_floor():
    shape = {"shape": "64x12x197x64", "backend": "triton", "path": "sdpa"}
    times = {
        "SDPA flash fwd": [30e-6] * 3,
        "fwd + cls scores": [40e-6] * 3,
        "fwd + cls scores, fused kernel": [33e-6] * 3,
        "fwd + cls scores, sdpa + cls-row kernel": [40e-6] * 3,
    }
    rows = bench_gpu.rows_from("attention", times, "SDPA flash fwd", shape)
    by = {r["config"]: r for r in rows}
    # the cls-row kernel reads K once more (a quarter of the forward's bytes); the fused kernel only its scores
    assert by["fwd + cls scores, sdpa + cls-row kernel"]["floor_ratio"] == pytest.approx(1.27, abs=0.01)
    assert by["fwd + cls scores, fused kernel"]["floor_ratio"] < 1.03
    goal = next(g for g in bench_gpu.goal_rows(rows) if g["goal"] == "fwd + cls scores")
    assert goal["row"] == "fwd + cls scores, fused kernel" and goal["value"] == pytest.approx(1.1)
    assert goal["floor"] < 1.03 and goal["target"] == 1.15 and goal["met"]


def test_every_bench_row_kind_has_a_model():
    row = {"section": "vit_step", "batch": 128, "patches": 196, "kept": 98, "median_ms": 1.0}
    dense, keep = (roofline.predict({**row, "config": c}) for c in ("dense", "lotus keep 0.5"))
    assert 0.5 < keep["floor_ms"] / dense["floor_ms"] < 0.55
    for cfg in ("dense", "2:4 row-wise mask", "2:4 transposable mask"):
        assert roofline.predict({"section": "semi24", "config": cfg, "M": M, "dim": 1024, "hidden": 4096})
    table = bench_gpu.prediction_table(block_rows(0.3))
    assert "| block | lotus triton |" in table and "measured / predicted" in table
