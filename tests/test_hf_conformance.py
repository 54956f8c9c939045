"""Targets behave like transformers models where issue 12 found they did not: no deprecated-API
warnings on forward or generate, and a readable print(model)."""

from __future__ import annotations

import pytest
import torch
import transformers.utils.generic as generic
from tiny_models import VOCAB, tiny_moe
from tolerances import assert_close_eps

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


# -- a subset of transformers' ModelTesterMixin checks, written out, on targets grown from a gene; they run
# offline (test_transformers_common.py runs the full common tests, fetched from the transformers sdist) --
HEADS = {"UniteModel": {}, "UniteForCausalLM": {}, "UniteForSequenceClassification": {"num_labels": 3},
         "UniteForMultipleChoice": {}}


def _inputs(cls_name: str, seed: int = 0) -> dict:
    ids = torch.randint(1, VOCAB, (2, 3, 5) if cls_name == "UniteForMultipleChoice" else (2, 5),
                        generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _first(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output.logits


@pytest.mark.parametrize("cls_name", list(HEADS))
def test_save_load_round_trip_and_dtype(gene, tmp_path, cls_name):
    import unite_hf

    cls = getattr(unite_hf, cls_name)
    model = cls.from_gene(gene, num_hidden_layers=2, pad_token_id=0, **HEADS[cls_name]).eval()
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_first(loaded(**_inputs(cls_name))), _first(model(**_inputs(cls_name))), rtol=0, atol=0)
    half = cls.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.config.dtype == torch.bfloat16


def test_hidden_states_attentions_and_attention_implementations(gene):
    eager = UniteForCausalLM.from_gene(gene, num_hidden_layers=2).eval()
    eager.set_attn_implementation("eager")
    inputs = _inputs("UniteForCausalLM")
    with torch.no_grad():
        out = eager(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2  # embeddings + one per layer
    assert out.attentions[0].shape == (2, eager.config.text_config.num_attention_heads, 5, 5)
    eager.set_attn_implementation("sdpa")
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, out.logits, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(gene):
    model = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, num_labels=2, pad_token_id=0)
    inputs = {**_inputs("UniteForSequenceClassification"), "labels": torch.tensor([0, 1])}

    def grads():
        model.zero_grad()
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    reference = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    assert reference.keys() == checkpointed.keys() and any(".mlp.up.core" in n for n in reference)
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-5, atol=1e-6)


def test_resize_token_embeddings(gene):
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=1)
    model.resize_token_embeddings(VOCAB + 8)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 8 == model.lm_head.weight.shape[0]
    assert model.config.get_text_config().vocab_size == VOCAB + 8
    ids = torch.tensor([[VOCAB + 7, 1, 2]])
    assert model(input_ids=ids).logits.shape == (1, 3, VOCAB + 8)


def test_initialisation_from_config(gene):
    """A target built from its config alone: orthonormal bases, cores at the dense-equivalent scale."""
    config = UniteForCausalLM.from_gene(gene, num_hidden_layers=2).config
    torch.manual_seed(0)
    model = UniteForCausalLM(config)
    ffn = model.model.ffn(0)
    bases = ffn.linear("up").bases
    # float32 orthogonalisation: gamma_(m n) (Householder QR, Higham 19.3)
    assert_close_eps(bases.in_basis.T @ bases.in_basis, torch.eye(bases.in_basis.shape[1]), k=bases.in_basis.numel())
    core = ffn.linear("up").core
    d_out, d_in = ffn.linear("up").d_out, ffn.linear("up").d_in
    expected = config.initializer_range * (d_out * d_in / core.numel()) ** 0.5
    assert abs(core.std().item() - expected) / expected < 0.5


@pytest.mark.parametrize("cls_name", list(HEADS))
def test_return_dict_false_gives_tuples(gene, cls_name):
    """Regression (found by transformers' test_model_outputs_equivalence): the heads read
    ``outputs.last_hidden_state`` and failed on ``return_dict=False``."""
    import unite_hf

    model = getattr(unite_hf, cls_name).from_gene(gene, num_hidden_layers=2, pad_token_id=0, **HEADS[cls_name]).eval()
    with torch.no_grad():
        as_tuple = model(**_inputs(cls_name), return_dict=False)
        as_output = model(**_inputs(cls_name))
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], _first(as_output), rtol=0, atol=0)


def test_parallel_plans_name_only_modules_the_target_has(gene):
    """Regression (found by transformers' test_tp_plan_matches_params and
    test_tied_weights_are_sharded_together): the family backbone's tensor- and expert-parallel plans named
    the experts the UNITE FFNs replace, and the causal LM's plan sharded the embedding but not its head."""
    import re

    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=2)
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for plan in (model.tp_plan, model.ep_plan):
        for key in plan:
            assert any(re.fullmatch(re.escape(key).replace(r"\*", r"[^.]+"), n) for n in names), key
    assert "lm_head" in model.tp_plan and "model.backbone.embed_tokens" in model.tp_plan
