"""LoRA on the UNITE FFN through peft's custom modules (issues 12 and 22): the factorized projections take an
adapter from peft's own LoraConfig (``import unite_hf`` registers the layer), which trains, saves and reloads
through peft's own calls (PeftModel, AutoPeftModelFor*, from the Hub); a merge writes the update into the
cores where it lies in the bases' span (exactly) and is refused before anything is merged where not."""

from __future__ import annotations

import pytest
import torch
from hub_server import local_hub  # noqa: F401
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model
from tiny_models import VOCAB, tiny_moe
from tolerances import assert_close_eps

from unite_hf import UniteForCausalLM, UniteForSequenceClassification, extract_universal_knowledge
from unite_hf.peft_lora import UniteLoraLinear, UniteMergeError
from unite_hf.training import attention_projection_names, load_unite_lora_config, unite_lora_config

@pytest.fixture(scope="module")
def gene():
    return extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 10)),
                                       rank=(2, 6, 6), show_progress=False)


def _target(gene):
    # tucker cores: every base weight comes from the gene, so two targets grown from it are identical
    return UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, num_labels=2, pad_token_id=0,
                                                    core_init="tucker")


def test_peft_own_lora_config_reaches_the_ffn(gene):
    """Every LoraConfig knows the factorized projections once unite_hf is imported; the control (the same
    config with peft's custom-module mapping taken away) is what peft alone does: refuse them."""
    model = get_peft_model(_target(gene), LoraConfig(task_type="SEQ_CLS", target_modules=["up"]))
    assert isinstance(model.base_model.model.model.ffn(0).up, UniteLoraLinear)
    bare = LoraConfig(task_type="SEQ_CLS", target_modules=["up"])
    bare._custom_modules = None
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(_target(gene), bare)
    assert "_custom_modules" not in LoraConfig(target_modules=["up"]).to_dict()  # adapters stay plain peft files


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
    for reloaded in (PeftModel.from_pretrained(_target(gene), tmp_path / "adapter"),  # peft's own call (issue 22)
                     PeftModel.from_pretrained(_target(gene), tmp_path / "adapter",
                                               config=load_unite_lora_config(str(tmp_path / "adapter")))):
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned, rtol=0, atol=0)


def _randomize_adapters(model, seed: int = 0) -> None:
    """B starts at zero (the adapter is the identity): give every B values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                weight = module.lora_B["default"].weight
                weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))


def _ffn_and_attention_adapter(target, task_type: str, r: int = 2):
    config = LoraConfig(task_type=task_type, r=r, lora_alpha=2 * r,
                        target_modules=["gate", "up", "down", *attention_projection_names(target)])
    model = get_peft_model(target, config)
    _randomize_adapters(model)
    return model


def test_auto_peft_models_load_ffn_adapters_from_folders_and_the_hub(gene, tmp_path, local_hub):  # noqa: F811
    """AutoPeftModelFor*.from_pretrained(adapter): the base target comes from the adapter's
    base_model_name_or_path, the FFN adapter layers from peft's own LoraConfig of the saved adapter."""
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    classifier = _target(gene)
    classifier.save_pretrained(tmp_path / "base")  # records the location as name_or_path: the adapter's base
    model = _ffn_and_attention_adapter(classifier, "SEQ_CLS")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded.base_model.model.model.ffn(0).down, UniteLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)

    lm = UniteForCausalLM.from_gene(gene, num_hidden_layers=2, core_init="tucker")
    lm.push_to_hub("me/lora-base")
    model = _ffn_and_attention_adapter(lm, "CAUSAL_LM")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.push_to_hub("me/lora-adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained("me/lora-adapter")
    assert loaded.peft_config["default"].base_model_name_or_path == "me/lora-base"
    assert isinstance(loaded.base_model.model.model.ffn(1).gate, UniteLoraLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_a_merge_outside_the_bases_is_refused_before_anything_is_merged(gene, tmp_path):
    """Rank (6, 6) of 24 x 32: a trained update leaves the bases' span. peft merges module by module, so the
    refusal must come first: before it, layer 0's attention was merged when the FFN raised, and
    disable_adapter() no longer gave the base model."""
    target = _target(gene)
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = target(input_ids=ids).logits
    base_state = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    model = _ffn_and_attention_adapter(target, "SEQ_CLS")
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    for merge in (model.merge_and_unload, model.merge_adapter, model.base_model.merge_and_unload):
        with pytest.raises(UniteMergeError, match=r"model\.backbone\.layers\.0\.mlp\.gate .*outside the span"):
            merge()
    # nothing merged: every base weight as it was, the adapter off gives the base model, on the tuned one
    unwrapped = {name.replace("base_layer.", ""): tensor for name, tensor in model.get_base_model().state_dict().items()
                 if "lora_" not in name and "modules_to_save" not in name}
    for name, tensor in base_state.items():
        assert torch.equal(unwrapped[name if name in unwrapped else name.replace("score.", "score.original_module.")],
                           tensor), name
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, tuned, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "adapter")  # and the saved adapter holds every update
    reloaded = PeftModel.from_pretrained(_target(gene), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned, rtol=0, atol=0)


def _lora_factors(layer):
    return (layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double(),
            float(layer.scaling["default"]))


def test_a_merge_at_full_rank_writes_the_dense_update_into_the_cores(gene):
    """Full rank on both sides: the projections store no bases, the core is the dense matrix, and every
    update merges: G' = G + s B A, checked against the float64 product by hand (attention too, merged by peft)."""
    full = extract_universal_knowledge(tiny_moe("mixtral"), calibration=torch.randint(0, VOCAB, (4, 10)),
                                       rank={"hidden": 32, "neuron": 24}, show_progress=False)
    target = UniteForSequenceClassification.from_gene(full, num_hidden_layers=2, num_labels=2, pad_token_id=0,
                                                      core_init="tucker")
    assert all(b is None for b in (target.model.ffn(0).linear("up").bases.out_basis,
                                   target.model.ffn(0).linear("down").bases.in_basis))
    model = _ffn_and_attention_adapter(target, "SEQ_CLS")
    expected, scales = {}, {}
    for layer in range(2):
        ffn = model.base_model.model.model.ffn(layer)
        for proj in ("gate", "up", "down"):
            A, B, s = _lora_factors(getattr(ffn, proj))
            core = ffn.linear(proj).core.detach().double()
            expected[layer, proj] = core + s * B @ A
            scales[layer, proj] = core.abs() + s * B.abs() @ A.abs()
    attention = model.base_model.model.model.backbone.layers[0].self_attn.q_proj
    A, B, s = _lora_factors(attention)
    expected_q = attention.base_layer.weight.detach().double() + s * B @ A
    scale_q = attention.base_layer.weight.detach().double().abs() + s * B.abs() @ A.abs()
    merged = model.merge_and_unload()
    for (layer, proj), weight in expected.items():
        # float64 sum, one rounding to float32
        assert_close_eps(merged.model.ffn(layer).linear(proj).core, weight, k=2, scale=scales[layer, proj])
    assert_close_eps(merged.model.backbone.layers[0].self_attn.q_proj.weight, expected_q, k=A.shape[0] + 1,
                     scale=scale_q)  # peft: float32 B @ A (r terms), then the sum


def test_a_merge_inside_truncated_bases_is_exact(gene):
    """Rank (6, 6): an update B A with B = U_out X and A = Y U_in^T lies in the bases' span and merges exactly:
    the merged U_out G' U_in^T against U_out G U_in^T + s B A by hand; merge_adapter and unmerge_adapter
    go back to the base cores."""
    model = _ffn_and_attention_adapter(_target(gene), "SEQ_CLS")
    generator = torch.Generator().manual_seed(3)
    expected, scales, cores = {}, {}, {}
    with torch.no_grad():
        for layer in range(2):
            ffn = model.base_model.model.model.ffn(layer)
            for proj in ("gate", "up", "down"):
                wrapped, base, bases = getattr(ffn, proj), ffn.linear(proj), ffn._bases(proj)
                r = wrapped.r["default"]
                U_out, U_in = bases.out_basis.double(), bases.in_basis.double()
                wrapped.lora_B["default"].weight.copy_(U_out @ torch.randn(U_out.shape[1], r, generator=generator,
                                                                           dtype=torch.float64))
                wrapped.lora_A["default"].weight.copy_(torch.randn(r, U_in.shape[1], generator=generator,
                                                                   dtype=torch.float64) @ U_in.T)
                A, B, s = _lora_factors(wrapped)
                core = base.core.double()
                # the core's update in the bases' coordinates (orthonormal: U^+ = U^T): its size bounds the roundings
                cores[layer, proj] = (base.core.clone(), (s * U_out.T @ B @ A @ U_in).abs())
                expected[layer, proj] = U_out @ core @ U_in.T + s * B @ A
                scales[layer, proj] = U_out.abs() @ core.abs() @ U_in.abs().T + s * B.abs() @ A.abs()
    model.merge_adapter()
    model.unmerge_adapter()
    for (layer, proj), (core, update) in cores.items():  # back, up to rounding the sum and the difference to float32
        assert_close_eps(model.base_model.model.model.ffn(layer).linear(proj).core, core, k=2,
                         scale=core.abs() + update)
    merged = model.merge_and_unload()
    for (layer, proj), weight in expected.items():
        ffn = merged.model.ffn(layer)
        base = ffn.linear(proj)
        # float32 U_out @ G' @ U_in^T: r_out + r_in products in a row, after G' rounded once
        assert_close_eps(base.dense_weight(ffn._bases(proj)), weight, k=sum(base.core.shape) + 2, scale=scales[layer, proj])
