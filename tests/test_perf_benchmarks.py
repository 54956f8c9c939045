"""The GPU benchmarks of issue 15 run on the CPU at their small shapes: every method, every ratio, one run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_fisher():
    return _load("bench_fisher")


def test_fisher_benchmark_compares_every_method_in_one_run(bench_fisher):
    summary = bench_fisher.main(["--device", "cpu", "--shape", "small", "--in-process", "--threads", "1"])
    assert summary["shape"]["shape"] == "small" and summary["shape"]["device"] == "cpu"
    assert set(summary["seconds"]) == set(summary["peak_mb"]) == set(bench_fisher.METHODS)
    for ratio in ("ours_time_over_plain", "ours_before_time_over_plain", "ours_time_over_ours_before",
                  "brute_batch_time_over_ours", "brute_seq_time_over_ours"):
        assert summary[ratio]["min"] <= summary[ratio]["median"] <= summary[ratio]["max"]
        assert summary[ratio]["median"] > 0
    assert summary["max_rel_diff_vs_brute"] < 1e-4  # the D2-MoE-style reference gives the same Fisher


def test_fisher_kernel_benchmark_times_and_checks_every_form(bench_fisher):
    result = bench_fisher.main(["--kernels", "--device", "cpu", "--shape", "small", "--threads", "1",
                                "--kernel-repeats", "1"])
    assert {row["projection"] for row in result["kernels"]} == {"up", "down", "gate_up"}
    for row in result["kernels"]:
        assert row["gram_gflop"] > 0 and row["direct_gflop"] > 0
        assert all(row[v]["median_ms"] >= 0 for v in ("before", "after", "gram_float64", "gram_float32", "direct_float32"))
    errors = {(row["kind"], row["tokens"]): row for row in result["relative_errors"]}
    assert {kind for kind, _ in errors} == set(bench_fisher.KINDS)
    assert all(row["after"] < 1e-4 for row in errors.values())  # the Fisher tests' tolerance
    assert max(row["gram_float32"] for row in errors.values() if row["kind"] == "offset10000") > 1e-3


def test_grouped_kernel_benchmark_times_and_checks_each_kernel(bench_fisher):
    """The GPU kernels of the grouped probe, on a CPU at the small shape (Triton only where it runs)."""
    result = bench_fisher.main(["--grouped-kernels", "--device", "cpu", "--shape", "small", "--threads", "1",
                                "--kernel-repeats", "1"])
    assert [row["projection"] for row in result["grouped_kernels"]] == ["gate_up", "down"]
    for row in result["grouped_kernels"]:
        assert row["groups"] == 16  # 4 experts x 4 sequences
        for kernel in ("grouped_mm", "padded_bmm", "per_expert_padded"):
            assert row[kernel]["median_ms"] > 0 and row[kernel]["rel_error_vs_exact"] < 1e-4
        assert row["grouped_mm"]["rel_error_vs_bf16_gradients"] < 1e-4


def test_fisher_benchmark_command_line_runs_one_method_per_process():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fisher.py"), "--method", "ours", "--device", "cpu",
                           "--shape", "small", "--threads", "1"], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["method"] == "ours" and out["sequences"] == 8 and out["gram_groups"]["float32"] > 0


def test_tucker_benchmark_compares_with_tensorly():
    bench = _load("bench_tucker")
    result = bench.main(["--device", "cpu", "--shape", "small", "--threads", "1"])
    assert result["case"] == "small" and result["device"] == "cpu" and result["ours_s"] > 0
    assert 0 < result["ours_rel_err"] < 1
    if "tensorly_error" not in result:  # tensorly's failures are reported, not raised
        assert result["speedup"] > 0 and abs(result["err_ratio"] - 1) < 1e-3
    legacy = bench.main(["small", "--tensorly", "no", "--threads", "1"])  # the positional form of issue 5
    assert legacy["tensorly"] == "skipped" and legacy["ours_rel_err"] == pytest.approx(result["ours_rel_err"], rel=1e-5)
