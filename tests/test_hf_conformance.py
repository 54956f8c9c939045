"""Targets behave like transformers models where issue 12 found they did not: no deprecated-API
warnings on forward or generate, and a readable print(model)."""

from __future__ import annotations

import pytest
import torch
import transformers.utils.generic as generic
from tiny_models import VOCAB, tiny_moe

from unite_hf import UniteForCausalLM, UniteForSequenceClassification, extract_universal_knowledge


@pytest.fixture(scope="module")
def gene():
    return extract_universal_knowledge(tiny_moe("qwen2_moe"), calibration=torch.randint(0, VOCAB, (4, 10)),
                                       rank=(2, 6, 6), show_progress=False)


def test_forward_and_generate_use_no_deprecated_cache_name(gene, monkeypatch):
    """Regression: the heads read outputs.past_key_values, which transformers 5.2x logs as deprecated."""
    messages = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: messages.append(message))
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    lm = UniteForCausalLM.from_gene(gene, num_hidden_layers=2)
    out = lm(input_ids=ids, use_cache=True)
    assert out.logits.shape == (2, 6, VOCAB) and getattr(out, "cache", None) is not None
    lm.generate(ids, max_new_tokens=3, do_sample=False)
    UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, num_labels=2)(input_ids=ids)
    assert not [m for m in messages if "deprecated" in m], messages


def test_print_shows_shapes_ranks_and_bases(gene):
    tied = repr(UniteForCausalLM.from_gene(gene, num_hidden_layers=1, tie_bases=True))
    own = repr(UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4))
    assert "UniteFactorizedLinear(d_in=32, d_out=24, rank=(r_out=6, r_in=6), tied bases (shared by all layers)" in tied
    assert "UniteBases(U_out=(24, 6), U_in=(32, 6))" in tied
    assert "rank=(r_out=4, r_in=4), own bases" in own and "shared_experts=kept" in own
