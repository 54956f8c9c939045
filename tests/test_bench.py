"""unite-hf bench end to end on the smoke profile (tiny random source): every experiment, the report."""

import json

import pytest

from unite_hf.bench import run_bench
from unite_hf.calibration import find_local_data_dir


@pytest.mark.skipif(find_local_data_dir() is None, reason="../shared/data not found")
def test_smoke_bench_writes_a_report(tmp_path):
    report = run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, command="unite-hf bench --profile smoke --tiny")
    text = report.read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "TINY RANDOM" in results["source"]
    experiments = {r["experiment"] for r in results["runs"]}
    assert experiments == {"generalization", "data_efficiency", "fusion", "decomposition", "rank", "depth"}
    for section in ("Generalization across tasks", "Convergence", "Ablation: fusion", "Ablation: decomposition",
                    "Ablation: rank", "Ablation: depth", "Data efficiency", "unite-hf bench --profile smoke"):
        assert section in text
    assert (tmp_path / "out" / "convergence.png").is_file() and (tmp_path / "out" / "data_efficiency.png").is_file()
    # every number in the generalization table comes from the runs
    unite = [r["accuracy"] for r in results["runs"] if r["experiment"] == "generalization" and r["init"] == "unite"]
    assert f"{100 * unite[0]:.1f} ± 0.0" in text
