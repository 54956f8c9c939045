"""Smoke runs of the retention and LM-probe benchmarks on a tiny random source (plumbing only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unite_hf.calibration import find_local_data_dir

ROOT = Path(__file__).resolve().parent.parent
needs_data = pytest.mark.skipif(find_local_data_dir() is None, reason="../shared/data not found")


def _run(script, *args, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@needs_data
def test_retention_benchmark_runs_every_variant_on_a_tiny_source(tmp_path):
    out = tmp_path / "retention.json"
    stdout = _run("bench_retention.py", "--tiny", "--sources", "moefied", "--ranks", "8", "16", "--fisher-sequences", "2",
                  "--seq-len", "16", "--num-windows", "2", "--retention-seq-len", "16", "--json", str(out),
                  tmp_path=tmp_path)
    runs = json.loads(out.read_text())["runs"]
    assert {(r["variant"], r["rank"]) for r in runs} == {(v, k) for v in ("paper", "hidden", "aligned+hidden",
                                                                          "concat+hidden", "concat+hidden+aa")
                                                         for k in (8, 16)}
    assert all(0 < r["ffn_parameter_fraction"] for r in runs)
    assert "| moefied | concat+hidden" in stdout


@needs_data
def test_refit_grid_runs_every_variant_and_control_on_a_tiny_source(tmp_path):
    out = tmp_path / "budget.json"
    stdout = _run("bench_retention.py", "--tiny", "--sources", "moefied", "--budgets", "0.25", "--fisher-sequences", "2",
                  "--refit-sequences", "2", "--seq-len", "16", "--num-windows", "2", "--retention-seq-len", "16",
                  "--distill-steps", "2", "--cost", "--json", str(out), tmp_path=tmp_path)
    runs = json.loads(out.read_text())["runs"]
    variants = {r["variant"] for r in runs if "error" not in r}
    assert variants == {"paper@budget", "hidden+ridge", "concat", "concat+ridge", "concat+ridge+seq", "concat+distill",
                        "control:random+ridge", "control:linear", "cost"}
    grid = [r for r in runs if r["variant"] not in ("cost", "control:linear")]
    # a budget is a ceiling on what the grown target's FFN holds
    assert all(0 < r["ffn_parameter_fraction"] <= 0.25 for r in grid)
    assert "| moefied | concat+ridge | 0.25 |" in stdout and "margin over random" in stdout
