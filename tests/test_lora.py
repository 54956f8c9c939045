"""LoRA on the UNITE FFN through peft's custom modules (issue 12): the factorized projections take an
adapter, which trains, saves and reloads; merging is refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import VOCAB, tiny_moe
from tolerances import assert_close_eps

from unite_hf import UniteForSequenceClassification, extract_universal_knowledge
from unite_hf.training import attention_projection_names, load_unite_lora_config, unite_lora_config


@pytest.fixture(scope="module")
def gene():
    return extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 10)),
                                       rank=(2, 6, 6), show_progress=False)


def _target(gene):
    # tucker cores: every base weight comes from the gene, so two targets grown from it are identical
    return UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, num_labels=2, pad_token_id=0,
                                                    core_init="tucker")


def test_plain_lora_cannot_reach_the_ffn(gene):
    """The defect: peft alone refuses the factorized projections."""
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(_target(gene), LoraConfig(task_type="SEQ_CLS", target_modules=["up"]))


def test_lora_on_the_unite_ffn_adds_a_low_rank_update(gene, tmp_path):
    target = _target(gene)
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = target(input_ids=ids).logits
    config = unite_lora_config(task_type="SEQ_CLS", r=2, lora_alpha=4,
                               target_modules=["gate", "up", "down", *attention_projection_names(target)])
    model = get_peft_model(target, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".mlp.up.lora_A." in n for n in trainable) and any(".self_attn.q_proj.lora_A." in n for n in trainable)
    assert not any(n.endswith((".core", "_basis")) for n in trainable)  # the gene's factors stay frozen
    with torch.no_grad():  # B starts at zero: the adapter is the identity at init
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)

    ffn = model.base_model.model.model.ffn(1)
    wrapped = ffn.up
    torch.nn.init.normal_(wrapped.lora_B["default"].weight)
    x = torch.randn(4, target.config.hidden_size)
    A, B = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    base = ffn.linear("up")
    expected = x @ (base.dense_weight(ffn._bases("up")) + (4 / 2) * B @ A).T  # W x + (alpha / r) B A x
    # float32 both ways, right to left through U_out G U_in^T and through B A: sums of |x| |U_out| |G|
    # |U_in| (|x| |B| |A|) terms, over d_in + r_in + r_out (d_in + 2 r) products in a row
    bases = ffn._bases("up")
    out_basis, in_basis = (torch.eye(n) if b is None else b.abs() for b, n in
                           ((bases.out_basis, base.d_out), (bases.in_basis, base.d_in)))
    magnitude = x.abs() @ (out_basis @ base.core.abs() @ in_basis.T + (4 / 2) * B.abs() @ A.abs()).T
    assert_close_eps(wrapped(x, bases), expected, k=base.d_in + sum(base.core.shape) + 2 * A.shape[0], scale=magnitude)

    # one optimizer step moves only the adapters (and the classification head peft keeps trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and any("mlp.up.lora_A" in n for n in changed)

    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_target(gene), tmp_path / "adapter",
                                         config=load_unite_lora_config(str(tmp_path / "adapter")))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
