"""CONTRIBUTING.md, "Adding a method", walked through: a toy method defined in this file alone (its config,
its gene class, its extract function, one registration call) extracts, saves and loads a gene, from Python
and from ``unite-hf extract``, with nothing in unite_hf edited.

The toy method "mean-ffn" keeps one matrix per projection: the mean over layers of every layer's
(dense or expert-averaged) FFN weight, times a ``scale`` setting. The expected matrices are computed
here by hand from the source's parameters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import needs_data, save_with_tokenizer
from tiny_models import COMMON, tiny_moe

import unite_hf_cli
from unite_hf import Gene, GeneConfig, load_gene, register_gene
from unite_hf.methods import MethodConfig, get_method, register_method, unregister_method
from unite_hf.methods.common import source_provenance
from unite_hf.methods.config import option
from unite_hf_cli.extract import config_from_args

CARD = """---
{{ card_data }}
---
# Mean-FFN gene of {{ source_title }}

Scale {{ scale }}.
"""


@pytest.fixture
def toy_method(tmp_path):
    """Step 1-4 of the guide: config, gene class, extract function, registration; removed afterwards."""
    (tmp_path / "card.md").write_text(CARD)

    @dataclasses.dataclass
    class MeanFfnConfig(MethodConfig):  # 1. the settings: help on every field, checks at construction
        method = "mean-ffn"

        scale: float = option(1.0, help="factor applied to the mean FFN weight")
        projections: Any = option(("gate", "up", "down"), nargs="+", help="which FFN projections to keep")

        def __post_init__(self) -> None:
            self._check_number("scale", strictly=True)
            if isinstance(self.projections, list):
                self.projections = tuple(self.projections)
            if not set(self.projections) <= {"gate", "up", "down"}:
                raise ValueError(f"mean-ffn config: projections must be among gate, up, down, got {self.projections}")

    @register_gene("mean-ffn")
    class MeanFfnGene(Gene):  # 2. the gene: its tensors, how to rebuild it from them, its card
        card_template = str(tmp_path / "card.md")

        def __init__(self, config: GeneConfig, weights: dict[str, torch.Tensor], source_state_dict=None,
                     tokenizer=None) -> None:
            super().__init__(config, source_state_dict, tokenizer)
            self.weights = weights

        def gene_state_dict(self) -> dict[str, torch.Tensor]:
            return {f"mean.{proj}": weight for proj, weight in self.weights.items()}

        @classmethod
        def _from_tensors(cls, config, gene_tensors, source_tensors):
            return cls(config, {proj: gene_tensors[f"mean.{proj}"] for proj in config.projections}, source_tensors)

        def card_variables(self, config: GeneConfig) -> dict[str, Any]:
            return {"scale": config.recipe["scale"]}

    def extract_mean_ffn(config: MeanFfnConfig, model, tokenizer=None, *, source_id=None, source_revision=None,
                         show_progress=True) -> MeanFfnGene:  # 3. the extraction, from the config
        from unite_hf.sources import get_source

        source = get_source(model)
        weights = {proj: config.scale * torch.stack([
            torch.stack([block.expert(e).projection(proj).detach().float() for e in range(block.num_experts)]).mean(0)
            for block in source.blocks]).mean(0) for proj in config.projections}
        gene_config = GeneConfig(method="mean-ffn", **source_provenance(model, source_id, source_revision),
                                 num_layers=source.num_layers, moe_layers=source.moe_layers,
                                 hidden_size=model.config.hidden_size, projections=list(config.projections),
                                 recipe=config.to_dict())
        return MeanFfnGene(gene_config, weights, tokenizer=tokenizer)

    register_method(MeanFfnConfig, MeanFfnGene, extract_mean_ffn)  # 4. one registration call
    yield MeanFfnConfig, MeanFfnGene
    unregister_method("mean-ffn")


def _expected(model, scale: float, proj: str) -> torch.Tensor:
    """The mean over layers and experts, written against the Mixtral parameters directly."""
    attribute = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}[proj]
    per_layer = []
    for layer in model.model.layers:
        weight = getattr(layer.mlp.experts, attribute).detach().float()  # (E, 2I, H) or (E, H, I)
        if proj != "down":
            half = weight.shape[1] // 2
            weight = weight[:, :half] if proj == "gate" else weight[:, half:]
        per_layer.append(weight.mean(0))
    return scale * torch.stack(per_layer).mean(0)


def test_a_toy_method_extracts_saves_and_loads(toy_method, tmp_path):
    config_class, gene_class = toy_method
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        config_class(scale=0)
    model = tiny_moe("mixtral")
    spec = get_method("mean-ffn")
    gene = spec.extract(config_class(scale=2.0, projections=["up", "down"]), model)
    for proj in ("up", "down"):
        torch.testing.assert_close(gene.weights[proj], _expected(model, 2.0, proj))
    gene.save_pretrained(tmp_path / "gene")
    loaded = load_gene(tmp_path / "gene")
    assert type(loaded) is gene_class and loaded.method == "mean-ffn"
    assert loaded.recipe == config_class(scale=2.0, projections=("up", "down"))
    torch.testing.assert_close(loaded.weights["down"], gene.weights["down"], rtol=0, atol=0)
    assert "Scale 2.0." in (tmp_path / "gene" / "README.md").read_text()


def test_the_cli_knows_the_toy_method(toy_method):
    config_class, _ = toy_method
    argv = ["extract", "--method", "mean-ffn", "--scale", "3", "--projections", "up", "--source", "s", "--out", "o"]
    config, inputs = config_from_args(unite_hf_cli.build_parser(argv).parse_args(argv))
    assert config == config_class(scale=3.0, projections=("up",)) and inputs == {}
    argv = ["extract", "--method", "mean-ffn", "--fusion", "fisher", "--source", "s", "--out", "o"]
    with pytest.raises(ValueError, match="--fusion does not apply to --method mean-ffn"):
        config_from_args(unite_hf_cli.build_parser(argv).parse_args(argv))


@needs_data
def test_unite_hf_extract_runs_the_toy_method(toy_method, tmp_path, capsys):
    import transformers

    from unite_hf.cli import main

    config_class, gene_class = toy_method
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **{**COMMON, "vocab_size": 50257}, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2))
    save_with_tokenizer(model, tmp_path / "src")
    assert main(["extract", "--method", "mean-ffn", "--scale", "0.5", "--source", str(tmp_path / "src"),
                 "--out", str(tmp_path / "gene")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == "mean-ffn"
    gene = load_gene(tmp_path / "gene")
    assert type(gene) is gene_class and gene.recipe == config_class(scale=0.5)
    torch.testing.assert_close(gene.weights["gate"], _expected(model, 0.5, "gate"))
    assert Path(tmp_path / "gene" / "tokenizer.json").is_file()
