"""moefy: dense Llama -> Mixtral MoE. Tiny random models only (hidden 32), no downloads."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import transformers

from unite_hf import extract_universal_knowledge, get_source
from tools.moefy import (  # a tool of the checkout (not installed)
    MoefyError,
    add_arguments,
    balanced_kmeans,
    expert_activation_mass,
    moefy,
    routing_agreement,
    run,
)

E = 4
INTERMEDIATE = 64
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides})).eval()


def calib_ids(seed: int, n: int = 16, t: int = 32) -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense():
    return tiny_llama()


@pytest.fixture(scope="module")
def fitted(dense):
    """E=4, top-2, co-activation grouping, fitted router: the model most checks look at."""
    return moefy(dense, E, top_k=2, calibration=calib_ids(1), grouping="coactivation", router="fit",
                 show_progress=False)


def _mlp_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


# -- exactness -------------------------------------------------------------------------------------

@pytest.mark.parametrize("grouping", ["contiguous", "balanced_kmeans", "coactivation"])
def test_top_k_equal_to_experts_with_uniform_router_is_the_dense_model(dense, grouping):
    calibration = calib_ids(2, n=4) if grouping == "coactivation" else None
    moe = moefy(dense, E, top_k=E, router="uniform", grouping=grouping, calibration=calibration, show_progress=False)
    assert moe.model.layers[0].mlp.gate.weight.abs().sum() == 0  # softmax(0) = 1/E for every expert
    ids = calib_ids(3, n=2, t=24)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_exactness_with_tied_embeddings_and_eight_experts():
    dense = tiny_llama(seed=5, tie_word_embeddings=True)
    moe = moefy(dense, 8, top_k=8, router="uniform", show_progress=False)
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    ids = calib_ids(4, n=2, t=16)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


# -- structure -------------------------------------------------------------------------------------

def test_structure_and_exact_partition_of_the_dense_neurons(dense, fitted):
    cfg = fitted.config
    assert isinstance(fitted, transformers.MixtralForCausalLM)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (E, 2, INTERMEDIATE // E)
    assert cfg.moefy["grouping"] == "coactivation" and cfg.moefy["down_scale"] == 2.0
    hidden, per_expert = LLAMA["hidden_size"], INTERMEDIATE // E
    for layer_idx, (d_layer, m_layer) in enumerate(zip(dense.model.layers, fitted.model.layers)):
        experts = m_layer.mlp.experts
        assert experts.gate_up_proj.shape == (E, 2 * per_expert, hidden)
        assert experts.down_proj.shape == (E, hidden, per_expert)
        assert m_layer.mlp.gate.weight.shape == (E, hidden)
        gate, up, down = d_layer.mlp.gate_proj.weight, d_layer.mlp.up_proj.weight, d_layer.mlp.down_proj.weight
        seen = []
        for e in range(E):
            for j in range(per_expert):
                row = experts.gate_up_proj[e, j]
                # the dense neuron whose gate row this is (random rows are unique)
                match = (gate == row).all(1).nonzero().flatten().tolist()
                assert len(match) == 1, f"layer {layer_idx} expert {e} row {j}"
                n = match[0]
                seen.append(n)
                assert torch.equal(experts.gate_up_proj[e, per_expert + j], up[n])  # up row intact, gate first
                torch.testing.assert_close(experts.down_proj[e, :, j], down[:, n] * 2.0, atol=0, rtol=1e-6)
        assert sorted(seen) == list(range(INTERMEDIATE)), "every dense neuron in exactly one expert"
    # attention, norms and embeddings are copied exactly
    dense_sd = dense.state_dict()
    for key, value in fitted.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(value, dense_sd[key]), key


def test_balanced_kmeans_gives_equal_groups_and_finds_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=gen) * 5
    truth = torch.arange(40) % 4
    feats = centers[truth] + 0.1 * torch.randn(40, 16, generator=gen)
    groups = balanced_kmeans(feats, 4, seed=0)
    assert groups.shape == (4, 10)
    assert sorted(groups.flatten().tolist()) == list(range(40))
    for g in groups:
        assert len(set(truth[g].tolist())) == 1  # each group is one planted cluster
    # unbalanced data still gives equal sizes
    skewed = torch.cat([torch.randn(30, 8, generator=gen) + 10, torch.randn(6, 8, generator=gen)])
    assert balanced_kmeans(skewed, 3, seed=1).shape == (3, 12)


def test_converted_layers_have_balanced_groups(fitted):
    for layer in fitted.model.layers:
        assert layer.mlp.experts.gate_up_proj.shape[1] == 2 * INTERMEDIATE // E  # fixed shape = equal groups


def test_same_seed_same_model_other_seed_other_groups(dense, fitted):
    again = moefy(dense, E, top_k=2, calibration=calib_ids(1), grouping="coactivation", router="fit",
                  show_progress=False)
    for (k, a), b in zip(fitted.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    one = moefy(dense, E, top_k=E, router="uniform", seed=0, show_progress=False)
    other = moefy(dense, E, top_k=E, router="uniform", seed=1, show_progress=False)
    assert not torch.equal(one.model.layers[0].mlp.experts.gate_up_proj, other.model.layers[0].mlp.experts.gate_up_proj)


def test_default_grouping_is_coactivation_with_data_and_weight_kmeans_without(dense):
    with_data = moefy(dense, E, top_k=2, calibration=calib_ids(1, n=4), show_progress=False)
    without = moefy(dense, E, top_k=E, router="uniform", show_progress=False)
    assert (with_data.config.moefy["grouping"], without.config.moefy["grouping"]) == ("coactivation", "balanced_kmeans")
    assert without.config.moefy["calibration"] is None


# -- the router ------------------------------------------------------------------------------------

def test_fitted_router_beats_a_random_router_on_held_out_tokens(dense, fitted):
    held_out = calib_ids(99, n=8)  # never seen by the fit
    inputs = _mlp_inputs(dense, held_out)
    gen = torch.Generator().manual_seed(0)
    for layer, x in zip(fitted.model.layers, inputs):
        mass = expert_activation_mass(layer.mlp.experts, x)
        fit = routing_agreement(layer.mlp.gate.weight, x, mass, top_k=2)
        rand = routing_agreement(torch.randn(E, x.shape[1], generator=gen), x, mass, top_k=2)
        assert fit > rand + 0.05 and fit > 0.6, (fit, rand)  # random scores about k/E = 0.5
    stats = fitted.config.moefy["layers"]
    assert len(stats) == 2 and all(0 <= s["routing_agreement"] <= 1 and s["relative_error"] < 1 for s in stats)


def test_fitted_router_tracks_the_dense_model_better_than_a_random_one(dense, fitted):
    ids = calib_ids(98, n=4)
    scrambled = moefy(dense, E, top_k=2, calibration=calib_ids(1), grouping="coactivation", router="fit",
                      show_progress=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in scrambled.model.layers:
            layer.mlp.gate.weight.copy_(torch.randn(E, LLAMA["hidden_size"], generator=gen))
        ref = dense(ids).logits
        err_fit = (fitted(ids).logits - ref).norm()
        err_rand = (scrambled(ids).logits - ref).norm()
    assert err_fit < err_rand


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=0), "num_experts must be an int >= 1"),
    (dict(num_experts=2.0), "num_experts must be an int >= 1"),
    (dict(num_experts=4, top_k=5), "top_k=5 exceeds num_experts=4"),
    (dict(num_experts=4, top_k=0), "top_k must be an int >= 1"),
    (dict(num_experts=3, top_k=1), "intermediate_size 64 is not divisible by num_experts=3"),
    (dict(num_experts=4, grouping="spectral"), "unknown grouping"),
    (dict(num_experts=4, router="learned"), "unknown router"),
    (dict(num_experts=4, top_k=2, router="uniform"), "router='uniform' needs top_k == num_experts"),
    (dict(num_experts=4, down_scale=-1.0), "down_scale must be a positive"),
    (dict(num_experts=4, calibration="wikitext2"), "pass tokenizer="),
])
def test_bad_options_fail_before_calibration(dense, kwargs, message):
    with pytest.raises(MoefyError, match=message):
        moefy(dense, show_progress=False, **kwargs)


def test_nan_weights_are_refused():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(MoefyError, match=r"model.layers.1.mlp.up_proj.weight.*NaN"):
        moefy(model, E, top_k=E, router="uniform", show_progress=False)


def test_non_llama_models_are_refused(fitted):
    with pytest.raises(MoefyError, match="already has experts"):
        moefy(fitted, E, show_progress=False)
    with pytest.raises(MoefyError, match="not a causal LM"):
        moefy(torch.nn.Linear(4, 4), E, show_progress=False)
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(**LLAMA, head_dim=8))
    with pytest.raises(MoefyError, match="model_type 'gemma' is not supported"):
        moefy(gemma, E, top_k=E, router="uniform", show_progress=False)
    biased = tiny_llama(mlp_bias=True)
    with pytest.raises(MoefyError, match="has biases"):
        moefy(biased, E, top_k=E, router="uniform", show_progress=False)
    no_ffn = tiny_llama()
    no_ffn.model.layers[0].mlp = torch.nn.Identity()
    with pytest.raises(MoefyError, match=r"model.layers.0.mlp \(Identity\) has no nn.Linear gate_proj"):
        moefy(no_ffn, E, show_progress=False)
    attn_bias = tiny_llama(attention_bias=True)
    with pytest.raises(MoefyError, match="does not map onto Mixtral.*q_proj.bias"):
        moefy(attn_bias, E, top_k=E, router="uniform", show_progress=False)


# -- the rest of the library reads the result ------------------------------------------------------

def test_get_source_and_extraction_run_on_the_moe(fitted):
    source = get_source(fitted)
    assert len(source.blocks) == 2 and source.blocks[0].num_experts == E and source.dense_layers == []
    gene = extract_universal_knowledge(fitted, calibration=calib_ids(7, n=2, t=8), rank=4, n_iter_max=2,
                                         show_progress=False)
    assert gene.moe_layers == [0, 1]
    assert tuple(gene.importance.shape) == (2, E)


def test_save_load_round_trip_keeps_logits_and_provenance(fitted, tmp_path):
    fitted.save_pretrained(tmp_path / "moe")
    loaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = calib_ids(5, n=1, t=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fitted(ids).logits)
    assert loaded.config.moefy["router"] == "fit"
    assert loaded.config.moefy["calibration"]["num_sequences"] == 16


def test_cli_pair_converts_a_saved_model(dense, tmp_path, capsys):
    dense.save_pretrained(tmp_path / "dense")
    # a word-level tokenizer over the tiny vocab, so no tokenizer files are needed from anywhere
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(LLAMA["vocab_size"] - 1)} | {"<unk>": LLAMA["vocab_size"] - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "dense")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 90}" for j in range(50)) for i in range(20)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--num-experts", "4",
                              "--calibration", str(corpus), "--num-sequences", "4", "--seq-len", "16"])
    assert run(args) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"router": "fit"' in summary and '"grouping": "coactivation"' in summary  # default when calibrating
    moe = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert (tmp_path / "moe" / "tokenizer.json").exists()
