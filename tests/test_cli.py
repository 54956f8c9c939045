"""The unite-hf command line, run as a real subprocess on a saved model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from tiny_models import COMMON

from unite_hf import UniteGene
from unite_hf.calibration import find_local_data_dir

DATA = find_local_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data (WikiText-2, GPT-2 tokenizer) not found")


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNITE_HF_DATA_DIR": str(DATA) if DATA else ""}
    return subprocess.run([sys.executable, "-m", "unite_hf.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _save_with_tokenizer(model, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizers/gpt2_tokenizer.json"),
                                                     eos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)


def extract_tiny_mixtral_gene(tmp_path: Path) -> subprocess.CompletedProcess:
    """A tiny Mixtral with the GPT-2 tokenizer saved to tmp_path/src, and `unite-hf extract` run on it into
    tmp_path/gene (rank 3,8,8, WikiText-2); asserts the command succeeded."""
    config = transformers.MixtralConfig(**{**COMMON, "vocab_size": 50257}, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2)
    _save_with_tokenizer(transformers.MixtralForCausalLM(config), tmp_path / "src")
    result = _cli("extract", "--source", str(tmp_path / "src"), "--calibration", "wikitext2", "--num-sequences", "4",
                  "--seq-len", "16", "--rank", "3,8,8", "--out", str(tmp_path / "gene"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result


@needs_data
def test_extract_from_a_saved_checkpoint_on_wikitext(tmp_path):
    result = extract_tiny_mixtral_gene(tmp_path)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ranks"]["up"] == [3, 8, 8]
    assert "Fisher" in result.stderr and "tucker decomposition" in result.stderr  # progress bars
    gene = UniteGene.from_pretrained(tmp_path / "gene")
    assert gene.config.source_id == str(tmp_path / "src")
    assert gene.config.calibration.startswith("wikitext2 (local")
    assert (gene.config.num_sequences, gene.config.seq_len) == (4, 16)


@needs_data
def test_dense_source_exits_with_a_clear_error_and_writes_nothing(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": 50257}, intermediate_size=24))
    _save_with_tokenizer(model, tmp_path / "dense")
    result = _cli("extract", "--source", str(tmp_path / "dense"), "--out", str(tmp_path / "gene"), cwd=tmp_path)
    assert result.returncode == 2
    assert "dense model" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "gene").exists()


def test_bad_rank_syntax_is_rejected(tmp_path):
    result = _cli("extract", "--source", "x", "--out", "y", "--rank", "1,2", cwd=tmp_path)
    assert result.returncode == 2 and "rank" in result.stderr
