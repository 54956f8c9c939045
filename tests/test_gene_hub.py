"""Genes go to a real HTTP Hub server on 127.0.0.1 and come back identical."""

import pytest
import torch
from hub_server import local_hub  # noqa: F401
from tiny_models import VOCAB, tiny_moe

from unite_hf import GeneFormatError, UniteGene, extract_universal_knowledge


def test_push_to_hub_and_from_pretrained_repo_id(local_hub):  # noqa: F811
    model = tiny_moe("deepseek_v3")
    calibration = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    gene = extract_universal_knowledge(model, calibration=calibration, rank=(2, 8, 8), show_progress=False)
    gene.push_to_hub("me/deepseek-gene")
    assert {"gene_config.json", "gene.safetensors", "source_weights.safetensors", "README.md"} <= set(
        local_hub.files("me/deepseek-gene"))
    loaded = UniteGene.from_pretrained("me/deepseek-gene")
    for proj in ("gate", "up", "down"):
        torch.testing.assert_close(loaded.fused_weight(2, proj), gene.fused_weight(2, proj), rtol=0, atol=0)
    torch.testing.assert_close(loaded.importance, gene.importance, rtol=0, atol=0)
    assert loaded.config.ranks == {"gate": [2, 8, 8], "up": [2, 8, 8], "down": [2, 8, 8]}

    from huggingface_hub import ModelCard

    card = ModelCard.load("me/deepseek-gene")
    assert "unite" in card.data.tags and "deepseek_v3" in card.text


def test_missing_repo_is_a_clear_error(local_hub):  # noqa: F811
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        UniteGene.from_pretrained("me/nothing-here")
    with pytest.raises(GeneFormatError, match="neither a local gene folder nor a valid Hub repo id"):
        UniteGene.from_pretrained("not a/valid//id")


def test_pushing_a_second_version_of_a_gene_replaces_the_first(local_hub):  # noqa: F811
    """Regression: the test Hub answered create_repo on an existing repo (409) without `url`, so a re-push failed."""
    model = tiny_moe("mixtral")
    calibration = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    first = extract_universal_knowledge(model, calibration=calibration, rank=(2, 8, 8), show_progress=False)
    second = extract_universal_knowledge(model, calibration=calibration, rank=(3, 6, 6), show_progress=False)
    first.push_to_hub("me/regene")
    second.push_to_hub("me/regene")
    loaded = UniteGene.from_pretrained("me/regene")
    assert loaded.config.ranks["up"] == [3, 6, 6]
    torch.testing.assert_close(loaded.fused_weight(0, "up"), second.fused_weight(0, "up"), rtol=0, atol=0)
