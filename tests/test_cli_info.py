"""unite-hf info, help texts, progress switches and finetune --push-to-hub (issue 12, CLI friction)."""

from __future__ import annotations

import argparse
import json
import os
import re

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from hub_server import DUMMY_TOKEN, local_hub  # noqa: F401
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny_moe

from unite_hf import UniteForSequenceClassification, extract_universal_knowledge
from unite_hf.calibration import find_local_data_dir
from unite_hf.cli import build_parser, main, progress_enabled

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    gene = extract_universal_knowledge(tiny_moe("qwen2_moe"), calibration=CALIBRATION, rank=(2, 6, 6),
                                       show_progress=False)
    gene.save_pretrained(root / "gene")
    target = UniteForSequenceClassification.from_gene(root / "gene", num_hidden_layers=2, num_labels=3)
    target.save_pretrained(root / "target")
    return root, gene, target


def _info(capsys, *args: str) -> dict:
    assert main(["info", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_on_a_gene_and_a_target(saved, capsys):
    root, gene, target = saved
    report = _info(capsys, str(root / "gene"))
    assert report["kind"] == "gene" and report["method"] == "unite"
    assert report["fusion"] == "fisher" and report["expert_statistics"] == ["fisher", "frequency", "routed", "routing_mass"]
    assert "selection" not in report  # an XPERT gene's (tests/test_xpert.py)
    assert report["ranks"] == {p: [2, 6, 6] for p in ("gate", "up", "down")}
    assert report["recipe"]["rank"] == [2, 6, 6] and report["recipe"]["method"] == "unite"
    assert report["relative_error"] == pytest.approx(gene.config.relative_error)
    for proj, energy in report["spectral_energy_at_rank"].items():  # the energy curve read at the stored rank
        assert energy["out"] == pytest.approx(float(gene.spectral_energy[proj]["out"][5]))
    files = {p: os.path.getsize(root / "gene" / p) for p in ("gene.safetensors", "source_weights.safetensors")}
    assert {k: report["files"][k] for k in files} == files
    assert report["parameters"]["gene.safetensors"] == sum(
        t.numel() for t in load_file(root / "gene" / "gene.safetensors").values())

    report = _info(capsys, str(root / "target"))
    assert report["kind"] == "target" and report["architectures"] == ["UniteForSequenceClassification"]
    assert report["gene"] == str(root / "gene") and report["ranks"]["up"] == [6, 6]
    assert report["shared_expert_names"] == ["shared_expert", "shared_expert_gate"]  # Qwen2-MoE's, kept by the target
    assert report["total_parameters"] == sum(p.numel() for p in target.parameters())
    assert report["files"]["model.safetensors"] == os.path.getsize(root / "target" / "model.safetensors")


def test_info_on_hub_repos_and_clear_errors(saved, local_hub, capsys, tmp_path):  # noqa: F811
    root, gene, target = saved
    target.push_to_hub("me/info-target")
    report = _info(capsys, "me/info-target")
    assert report["total_parameters"] == sum(p.numel() for p in target.parameters())
    assert "model.safetensors" in report["files"]
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "not a unite_hf gene" in capsys.readouterr().err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_shows_its_default():
    for name in ("extract", "finetune", "retention", "info", "bench", "demo", "analyze-experts", "moefy"):
        sub = _subparsers(build_parser([name]))[name]
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                assert f"(default: {action.default}" in " ".join(text.split()), f"{name} {action.dest}"
    assert build_parser(["bench"]).parse_args(["bench"]).profile == "quick"


def test_help_imports_neither_torch_nor_transformers():
    """Regression: the CLI imported torch and transformers before parsing, so every --help took 10-20 s."""
    import subprocess
    import sys

    script = ("import sys, unite_hf_cli\n"
              "for argv in ([], ['extract'], ['finetune'], ['bench'], ['retention'], ['info'], ['demo'], ['analyze-experts'], ['moefy']):\n"
              "    parser = unite_hf_cli.build_parser(argv)\n"
              "    try:\n"
              "        parser.parse_args([*argv, '--help'])\n"
              "    except SystemExit:\n"
              "        pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'unite_hf', 'datasets') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_cli_choices_are_the_registries():
    import unite_hf_cli
    from unite_hf.methods.xpert.analysis import (
        ANALYSIS_FILE, BUILTIN_DOMAINS, COMMONALITY_SCORES, DEFAULT_DOMAINS, HEATMAP_FILE, SELECTION_STRATEGIES,
    )
    from tools.bench import EXPERIMENTS, PROFILES, SCRIPT_EXPERIMENTS  # a tool of the checkout (not installed)
    from unite_hf.calibration import DEFAULT_CALIBRATION
    from unite_hf.cli import RUNNERS
    from unite_hf.decomposition import DECOMPOSITIONS
    from unite_hf.fusion import FUSIONS
    from unite_hf.importance import LABEL_MODES
    from unite_hf.methods import METHODS
    from unite_hf.training.finetune import FORMATS, INITS
    from unite_hf.training.tasks import TASKS

    cli = unite_hf_cli
    assert cli.FUSION_NAMES == sorted(FUSIONS) and cli.DECOMPOSITION_NAMES == sorted(DECOMPOSITIONS)
    assert cli.LABEL_MODE_NAMES == list(LABEL_MODES) and cli.METHOD_NAMES == sorted(METHODS)
    assert cli.COMMONALITY_SCORE_NAMES == sorted(COMMONALITY_SCORES)
    assert cli.SELECTION_STRATEGY_NAMES == sorted(SELECTION_STRATEGIES)
    assert cli.TASK_NAMES == sorted(TASKS) and cli.FORMAT_NAMES == list(FORMATS) and cli.INIT_NAMES == list(INITS)
    assert cli.PROFILE_NAMES == sorted(PROFILES) and cli.EXPERIMENT_NAMES == list(EXPERIMENTS)
    assert cli.SCRIPT_EXPERIMENT_NAMES == list(SCRIPT_EXPERIMENTS)
    assert cli.DEFAULT_CALIBRATION == DEFAULT_CALIBRATION
    assert cli.BUILTIN_DOMAIN_NAMES == sorted(BUILTIN_DOMAINS) and cli.DEFAULT_DOMAIN_NAMES == list(DEFAULT_DOMAINS)
    assert (cli.ANALYSIS_FILE, cli.HEATMAP_FILE) == (ANALYSIS_FILE, HEATMAP_FILE)
    from tools.moefy import GROUPINGS, ROUTERS

    assert cli.MOEFY_GROUPINGS == list(GROUPINGS) and cli.MOEFY_ROUTERS == list(ROUTERS)
    assert set(RUNNERS) == set(cli.COMMANDS)


def test_progress_switches(monkeypatch):
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    assert progress_enabled(argparse.Namespace(quiet=False))
    assert not progress_enabled(argparse.Namespace(quiet=True))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not progress_enabled(argparse.Namespace(quiet=False))
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert not progress_enabled(argparse.Namespace(quiet=False))


DATA = find_local_data_dir()


@pytest.mark.skipif(DATA is None, reason="no local data folder")
def test_finetune_push_to_hub_publishes_model_card_and_tokenizer(local_hub, tmp_path):  # noqa: F811
    from unite_hf.training.finetune import finetune

    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizers/gpt2_tokenizer.json"),
                                                     eos_token="<|endoftext|>")
    config = transformers.MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                                        num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    gene = extract_universal_knowledge(transformers.MixtralForCausalLM(config), calibration=torch.randint(
        0, len(tokenizer), (4, 12)), rank=(2, 6, 6), show_progress=False)
    gene.tokenizer = tokenizer
    gene.push_to_hub("me/ft-gene")
    summary = finetune("me/ft-gene", "sst2", data_dir=DATA, output_dir=tmp_path / "run", layers=1, epochs=1,
                       max_train_examples=16, max_eval_examples=8, batch_size=8, max_length=24, show_progress=False,
                       tokenizer=tokenizer, push_to_hub="me/ft-sst2")
    assert summary["hub"] == "me/ft-sst2"
    files = local_hub.files("me/ft-sst2")
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "me/ft-gene" and card.data.datasets == ["nyu-mll/glue"]
    assert card.data.eval_results[0].metric_value == pytest.approx(summary["accuracy"])
    assert card.data.eval_results[0].dataset_config == "sst2"
    # the token (the environment's HF_TOKEN here) authenticates the pushes and is written nowhere: finetune
    # never puts it into TrainingArguments, whose pickle (training_args.bin) would carry it
    for commit in local_hub.history("me/ft-sst2"):
        assert not [path for path, content in commit.files.items() if DUMMY_TOKEN.encode() in content], commit.title
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not [p for p in written if DUMMY_TOKEN.encode() in p.read_bytes()]


def test_one_tucker_bar_per_projection_counts_passes(capsys):
    """Regression: a 3-layer source showed "153/153 layer" under a second, per-projection bar."""
    extract_universal_knowledge(tiny_moe("mixtral"), calibration=CALIBRATION, rank=(2, 6, 6), n_iter_max=3,
                                show_progress=True)
    err = capsys.readouterr().err
    for proj in ("gate", "up", "down"):
        assert re.search(rf"tucker decomposition {proj}: .*\d/7 \[[^]]*pass/s", err), err[-2000:]  # 1 + 2 * 3 passes
    assert "layer]" not in err.split("Fusing experts")[-1] and "proj]" not in err


@pytest.mark.parametrize("variable", ["TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"])
def test_library_progress_bars_honour_the_environment(monkeypatch, capsys, variable):
    """Regression: the library passed disable=not show_progress to tqdm, so TQDM_DISABLE was ignored."""
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    extract_universal_knowledge(tiny_moe("mixtral"), calibration=CALIBRATION, rank=(2, 6, 6), n_iter_max=2)
    err = capsys.readouterr().err
    assert "Fisher" not in err and "tucker decomposition" not in err and "Fusing experts" not in err, err[-500:]
