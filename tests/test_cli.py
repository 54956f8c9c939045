"""The unite-hf command line, run as a real subprocess on a saved model."""

import json

import transformers
from conftest import extract_tiny_mixtral_gene, needs_data, run_cli, save_with_tokenizer
from tiny_models import COMMON

from unite_hf import UniteGene


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
    save_with_tokenizer(model, tmp_path / "dense")
    result = run_cli("extract", "--source", str(tmp_path / "dense"), "--out", str(tmp_path / "gene"), cwd=tmp_path)
    assert result.returncode == 2
    assert "dense model" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "gene").exists()


def test_bad_rank_syntax_is_rejected(tmp_path):
    result = run_cli("extract", "--source", "x", "--out", "y", "--rank", "1,2", cwd=tmp_path)
    assert result.returncode == 2 and "rank" in result.stderr
