"""unite-hf finetune: gene -> target -> Trainer on a real local task; the three initialisations."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import COMMON
from tolerances import assert_close_eps

from unite_hf import UniteForSequenceClassification, extract_universal_knowledge
from unite_hf.calibration import find_local_data_dir
from unite_hf.training.finetune import build_model
from unite_hf.training.tasks import load_task

DATA = find_local_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="../shared/data not found")


@pytest.fixture(scope="module")
def gene_dir(tmp_path_factory):
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizers/gpt2_tokenizer.json"),
                                                     eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    config = transformers.MixtralConfig(**{**COMMON, "vocab_size": len(tokenizer)}, intermediate_size=24,
                                        num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    gene = extract_universal_knowledge(model, tokenizer, "wikitext2", num_sequences=4, seq_len=16, rank=(3, 8, 8),
                                       show_progress=False)
    gene.tokenizer = tokenizer
    path = tmp_path_factory.mktemp("gene")
    gene.save_pretrained(path)
    return path


def test_initialisations_differ_only_where_they_should(gene_dir):
    task = load_task("sst2", "validation")
    unite = build_model(gene_dir, task, init="unite", layers=2, rank=6, seed=1, pad_token_id=0)
    copy_only = build_model(gene_dir, task, init="copy-only", layers=2, rank=6, seed=1, pad_token_id=0)
    random_init = build_model(gene_dir, task, init="random", layers=2, rank=6, seed=1, pad_token_id=0)
    assert isinstance(unite, UniteForSequenceClassification) and unite.config.num_labels == 2
    attn = "model.backbone.layers.1.self_attn.q_proj.weight"
    basis = "model.backbone.layers.1.mlp.up.bases.in_basis"
    u, c, r = (dict(m.named_parameters()) for m in (unite, copy_only, random_init))
    assert torch.equal(u[attn], c[attn]) and not torch.equal(u[attn], r[attn])
    assert torch.equal(u["model.backbone.embed_tokens.weight"], c["model.backbone.embed_tokens.weight"])
    assert not torch.allclose(u[basis], c[basis])
    # copy-only bases are still orthonormal (a fair random FFN, same architecture)
    assert_close_eps(c[basis].T @ c[basis], torch.eye(6), k=c[basis].numel())  # gamma_(m n): Householder QR


def test_cli_finetune_prints_one_json_line(gene_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNITE_HF_DATA_DIR": str(DATA)}
    command = [sys.executable, "-m", "unite_hf.cli", "finetune", "--model", str(gene_dir), "--task", "sst2",
               "--layers", "2", "--rank", "6", "--epochs", "2", "--max-train-examples", "64", "--max-eval-examples",
               "32", "--batch-size", "16", "--max-length", "48", "--seed", "3", "--output", str(tmp_path / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["task"] == "sst2" and summary["init"] == "unite" and summary["train_examples"] == 64
    assert len(summary["accuracy_per_epoch"]) == 2 and 0 <= summary["accuracy"] <= 1
    assert summary["accuracy"] == summary["accuracy_per_epoch"][-1]
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert type(saved) is UniteForSequenceClassification
    assert "accuracy" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_init_options_need_a_gene(tmp_path, gene_dir):
    task = load_task("sst2", "validation")
    build_model(gene_dir, task, layers=1, rank=4, pad_token_id=0).save_pretrained(tmp_path / "target")
    with pytest.raises(ValueError, match="growing from a gene"):
        build_model(tmp_path / "target", task, init="copy-only")
    with pytest.raises(ValueError, match="init must be one of"):
        build_model(gene_dir, task, init="zeros")


def test_scoring_only_the_final_model_changes_no_outcome(gene_dir, tmp_path):
    """eval_every_epoch=False (the downstream benchmark, on full eval files) skips the per-epoch passes:
    the final accuracy and every example's outcome are those of a run scored after each epoch."""
    from unite_hf.training.finetune import finetune

    common = dict(task="sst2", layers=1, rank=6, epochs=2, max_train_examples=32, max_eval_examples=24, batch_size=8,
                  max_length=32, seed=2, show_progress=False, data_dir=DATA)
    curve = finetune(gene_dir, output_dir=tmp_path / "curve", **common)
    final = finetune(gene_dir, output_dir=tmp_path / "final", eval_every_epoch=False, **common)
    assert len(curve["accuracy_per_epoch"]) == 2 and curve["accuracy_per_epoch"][-1] == curve["accuracy"]
    assert final["accuracy_per_epoch"] == [final["accuracy"]]
    assert (final["accuracy"], final["correct"]) == (curve["accuracy"], curve["correct"])


def test_finetune_takes_a_task_spec_and_writes_its_result(gene_dir, tmp_path):
    """finetune accepts what load_task accepts: a TaskSpec, here one not in the registry (SST-2's files under
    another name). It used to train, save the model, then fail writing result.json (TaskSpec is not JSON)."""
    import dataclasses

    from unite_hf.training.finetune import finetune
    from unite_hf.training.tasks import TASKS

    spec = dataclasses.replace(TASKS["sst2"], name="sst2_custom", pretty_name="SST-2 (custom spec)")
    assert "sst2_custom" not in TASKS
    summary = finetune(gene_dir, spec, layers=1, rank=6, epochs=1, max_train_examples=16, max_eval_examples=8,
                       batch_size=8, max_length=32, seed=0, show_progress=False, data_dir=DATA,
                       output_dir=tmp_path / "run")
    written = json.loads((tmp_path / "run" / "result.json").read_text())
    assert written == summary and written["task"] == "sst2_custom"
    assert (written["train_examples"], written["eval_examples"]) == (16, 8)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "SST-2 (custom spec)" in card and "nyu-mll/glue" in card  # the card names the spec's dataset
    with pytest.raises(ValueError, match="unknown task 'sst3'"):  # a bad name fails before any model is built
        finetune(gene_dir, "sst3", output_dir=tmp_path / "bad", data_dir=DATA)
    assert not (tmp_path / "bad").exists()


def test_finetune_notes_say_what_was_cut(gene_dir, tmp_path):
    """HellaSwag at max_length=64 (16 train / 8 eval items): what tokenize_task cut, and the items whose endings
    and 'Answer:' alone exceed 64 tokens (kept whole), are in the run's notes and result.json. Before, the run
    trained on sequences cut inside ending D and its notes said nothing."""
    from unite_hf.training.finetune import finetune

    summary = finetune(gene_dir, "hellaswag", layers=1, rank=6, epochs=1, max_train_examples=16, max_eval_examples=8,
                       batch_size=8, max_length=64, seed=0, show_progress=False, data_dir=DATA,
                       output_dir=tmp_path / "run")
    for split, n in (("train", 16), ("validation", 8)):
        head = f"HellaSwag {split} (classification, max_length=64): "
        assert any(note.startswith(head) and f"of {n} items were cut to fit" in note for note in summary["notes"])
        assert any(note.startswith(head + "for ") and "alone is longer than max_length" in note
                   for note in summary["notes"])
    assert json.loads((tmp_path / "run" / "result.json").read_text())["notes"] == summary["notes"]
