"""unite-hf bench end to end on the smoke profile (tiny random source): every experiment, the report."""

import json

import pytest

from tools.bench import run_bench  # a tool of the checkout, not installed with unite_hf
from unite_hf.calibration import find_local_data_dir


@pytest.mark.slow  # every experiment end to end, twice: minutes on 2 cores
@pytest.mark.skipif(find_local_data_dir() is None, reason="../shared/data not found")
def test_smoke_bench_writes_a_report(tmp_path):
    report = run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, command="unite-hf bench --profile smoke --tiny")
    text = report.read_text()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "TINY RANDOM" in results["source"]
    experiments = {r["experiment"] for r in results["runs"]}
    assert experiments == {"generalization", "data_efficiency", "fusion", "decomposition", "rank", "depth", "masa",
                           "masa_ablation", "xpert", "xpert_control", "downstream"}
    downstream = [r for r in results["runs"] if r["experiment"] == "downstream"]
    assert {r["init"] for r in downstream} == {"oracle", "refit", "kept", "paper", "copy-only", "random"}
    assert {(r["task"], r["eval_split"]) for r in downstream} == {("sst2", "validation"), ("arc_easy", "test")}
    for r in downstream:  # each example's outcome, agreeing with the reported accuracy
        assert len(r["correct"]) == r["eval_examples"] == 24
        assert sum(r["correct"]) / 24 == pytest.approx(r["accuracy"], abs=1e-6)
    for section in ("Generalization across tasks", "Convergence", "Ablation: fusion", "Ablation: decomposition",
                    "Ablation: rank", "Ablation: depth", "Data efficiency", "unite-hf bench --profile smoke",
                    "MASA: gene matrices", "### Width 32", "### Width 64", "no spectral", "truncate/pad",
                    "XPERT: common experts", "Control: which experts", "xpert-llama-w32",
                    "Downstream with intervals", "kept - copy-only", "**all tasks pooled**"):
        assert section in text
    assert (tmp_path / "out" / "xpert_convergence.png").is_file()
    assert (tmp_path / "out" / "xpert_analysis" / "expert_heatmap.png").is_file()
    masa_widths = {r["width"] for r in results["runs"] if r["experiment"] == "masa"}
    assert masa_widths == {32, 64}
    # a later run of one experiment keeps every other experiment's stored runs
    before = [r for r in results["runs"] if r["experiment"] != "xpert_control" and r["experiment"] != "xpert"]
    run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work2", tiny=True, experiments=("xpert",),
              command="unite-hf bench --profile smoke --tiny --experiments xpert")
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r for r in again["runs"] if r["experiment"] not in ("xpert", "xpert_control")] == before
    assert len(again["meta"]["commands"]) == 2 and "Generalization across tasks" in report.read_text()
    # downstream runs finished under the same profile are read back, not fine-tuned again
    run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, experiments=("downstream",),
              command="unite-hf bench --profile smoke --tiny --experiments downstream")
    resumed = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r for r in resumed["runs"] if r["experiment"] == "downstream"] == downstream
    again = resumed
    # an interrupted run's finished downstream runs join the report when it is only re-rendered
    stored = tmp_path / "out" / "results.json"
    stored.write_text(json.dumps({**resumed, "runs": [r for r in resumed["runs"] if r["experiment"] != "downstream"]}))
    run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, report_only=True)
    collected = json.loads(stored.read_text())
    assert sorted(map(json.dumps, (r for r in collected["runs"] if r["experiment"] == "downstream"))) == \
        sorted(map(json.dumps, downstream))
    assert "interrupted" in report.read_text()
    stored.write_text(json.dumps(resumed))
    run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, report_only=True)
    rendered = report.read_text()
    run_bench(tmp_path / "out", "smoke", tiny=True, report_only=True)  # re-render only: same report, nothing lost
    assert report.read_text() == rendered
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == again
    assert (tmp_path / "out" / "convergence.png").is_file() and (tmp_path / "out" / "data_efficiency.png").is_file()
    # every number in the generalization table comes from the runs
    unite = [r["accuracy"] for r in results["runs"] if r["experiment"] == "generalization" and r["init"] == "unite"]
    assert f"{100 * unite[0]:.1f} ± 0.0" in text


@pytest.mark.skipif(find_local_data_dir() is None, reason="../shared/data not found")
def test_downstream_refit_and_oracle_inits_on_winogrande_and_hellaswag_at_two_depths(tmp_path, monkeypatch):
    """The downstream experiment's new inits (the budgeted ridge-refitted gene; the oracle: the source cut to
    the target's depth, every expert and router, with a task head) and tasks run at tiny size, at two depths,
    and the report names each depth's oracle verdict first, with the pooled intervals against copy-only."""
    from dataclasses import replace

    import tools.bench as bench

    profile = replace(bench.PROFILES["smoke"], downstream_tasks=["winogrande", "hellaswag"],
                      downstream_inits=["copy-only", "oracle", "refit", "kept"], downstream_depths=[1, 2])
    monkeypatch.setitem(bench.PROFILES, "smoke", profile)
    report = run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, experiments=("downstream",),
                       command="unite-hf bench --profile smoke --tiny --experiments downstream")
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {(r["task"], r["init"], r["depth"]) for r in runs} == {
        (t, i, d) for t in ("winogrande", "hellaswag") for i in ("copy-only", "oracle", "refit", "kept") for d in (1, 2)}
    for r in runs:
        assert len(r["correct"]) == r["eval_examples"] == 24 and r["eval_split"] == "validation"
    oracle = {r["depth"]: r for r in runs if r["init"] == "oracle"}
    assert {d: r["layers"] for d, r in oracle.items()} == {1: 1, 2: 2}  # the source cut to the target's depth
    assert {r["layers"] for r in runs if r["init"] == "refit"} == {1, 2}
    text = report.read_text()
    section = text[text.index("## Downstream with intervals"):]
    assert section.index("- Depth 1: ") < section.index("- Depth 2: ") < section.index("### Depth 1")
    for pair in ("oracle - copy-only", "refit - copy-only", "kept - copy-only"):
        assert pair in section
    assert section.count("**all tasks pooled**") == 2 and "Depth 2, refit - copy-only: " in section
    assert "budget 0.25" in section and "Claims and verdicts" in text


def test_native_profile_runs_downstream_only(tmp_path):
    """--profile full-native grows the downstream targets from the native source; the other experiments
    are the moefied source's, refused before anything is loaded."""
    from tools.bench import PROFILES, Bench

    assert PROFILES["full-native"].source == "native" and PROFILES["full"].source == "moefied"
    bench = Bench(tmp_path / "out", PROFILES["full-native"], tmp_path / "work", tiny=False)
    with pytest.raises(ValueError, match=r"\['fusion'\] run on the moefied source only"):
        bench.prepare(["fusion", "downstream"])


@pytest.mark.slow  # both scripts on their tiny sources: about a minute on 2 cores
@pytest.mark.skipif(find_local_data_dir() is None, reason="../shared/data not found")
def test_script_experiments_run_their_tiny_commands_under_the_work_folder(tmp_path):
    run_bench(tmp_path / "out", "smoke", work_dir=tmp_path / "work", tiny=True, experiments=("retention", "lm_probe"),
              command="unite-hf bench --profile smoke --tiny --experiments retention lm_probe")
    assert json.loads((tmp_path / "work" / "retention_tiny.json").read_text())["runs"]
    summary = json.loads((tmp_path / "work" / "lm_probe_tiny.json").read_text())["summary"]  # depth -> init -> ...
    assert summary and all("kept+inherited" in per_depth for per_depth in summary.values())
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["meta"]["commands"][-1]["experiments"] == ["retention", "lm_probe"]
