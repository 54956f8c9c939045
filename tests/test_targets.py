"""Targets grown from genes: exactness against the fused source, options, Auto classes, bad input."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from tiny_models import FAMILIES, VOCAB, tiny_moe
from torch import nn

from unite_hf import (
    GeneFormatError, UniteConfig, UniteForCausalLM, UniteForMultipleChoice, UniteForSequenceClassification,
    UniteModel, extract_universal_knowledge, get_source,
)

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
INPUT = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))


class FusedDenseBlock(nn.Module):
    """The test's own reference: a source MoE block replaced by one dense MLP holding the gene's fused
    weights, with the block's shared experts combined as the family does."""

    def __init__(self, block, gene):
        super().__init__()
        self.weights = {p: gene.fused_weight(block.layer_idx, p) for p in gene.config.projections}
        self.act = block.activation
        for name, module in block.shared_experts:
            self.add_module(name, module)

    def forward(self, x):
        w = self.weights
        h = self.act(x @ w["gate"].T) * (x @ w["up"].T) if "gate" in w else self.act(x @ w["up"].T)
        out = h @ w["down"].T
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


def fused_reference(model, gene):
    reference = copy.deepcopy(model)
    for block in get_source(reference).blocks:
        layer_path, attr = block.name.rsplit(".", 1)
        setattr(reference.get_submodule(layer_path), attr, FusedDenseBlock(block, gene))
    return reference


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tucker_hidden_targets_reproduce_the_fused_source_and_redraw_neuron_factors(genes, family):
    source, _ = genes[family]
    gene = extract_universal_knowledge(source, calibration=CALIBRATION, decomposition="tucker_hidden",
                                       show_progress=False)
    target = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()
    reference = fused_reference(source, gene).eval()
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=INPUT).logits, reference(input_ids=INPUT).logits,
                                   rtol=1e-4, atol=1e-4)
    layer = gene.moe_layers[0]
    # random cores: the shared hidden-axis bases are the gene's, the per-layer neuron factors are re-drawn
    random = UniteForCausalLM.from_gene(gene, core_init="random", rank=4)
    up, down = random.model.ffn(layer).up.bases, random.model.ffn(layer).down.bases
    torch.testing.assert_close(up.in_basis, gene.decompositions["up"].in_factor[:, :4])
    torch.testing.assert_close(down.out_basis, gene.decompositions["down"].out_factor[:, :4])
    row = gene.moe_layers.index(layer)
    assert not torch.allclose(up.out_basis, gene.decompositions["up"].out_factor[row, :, :4])
    torch.testing.assert_close(up.out_basis.T @ up.out_basis, torch.eye(4), rtol=1e-5, atol=1e-5)  # orthogonal draw
    with pytest.raises(ValueError, match="bases shared on both sides"):
        UniteForCausalLM.from_gene(gene, tie_bases=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("decomposition", ["tucker", "tucker_hidden"])
def test_activation_aware_genes_grow_exact_targets(genes, family, decomposition):
    source, _ = genes[family]
    gene = extract_universal_knowledge(source, calibration=CALIBRATION, decomposition=decomposition,
                                       activation_aware=True, show_progress=False)
    assert gene.config.method_config == {"activation_aware": True}
    target = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()
    reference = fused_reference(source, gene).eval()
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids=INPUT).logits, reference(input_ids=INPUT).logits,
                                   rtol=1e-4, atol=1e-4)
    plain = extract_universal_knowledge(source, calibration=CALIBRATION, decomposition=decomposition,
                                        show_progress=False)
    for proj in gene.config.projections:  # at full rank both are the fused FFN
        torch.testing.assert_close(gene.fused_weight(gene.moe_layers[0], proj), plain.fused_weight(plain.moe_layers[0], proj),
                                   rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def genes():
    return {family: (tiny_moe(family), extract_universal_knowledge(tiny_moe(family), calibration=CALIBRATION,
                                                                   show_progress=False))
            for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_target_with_tucker_cores_reproduces_the_fused_source(genes, family):
    source, gene = genes[family]
    target = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()
    reference = fused_reference(source, gene).eval()
    with torch.no_grad():
        expected = reference(input_ids=INPUT).logits
        got = target(input_ids=INPUT).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the rebuilt FFN matrices are the gene's fused experts
    ffn = target.model.ffn(gene.moe_layers[-1])
    torch.testing.assert_close(ffn.up.dense_weight(ffn._bases("up")), gene.fused_weight(gene.moe_layers[-1], "up"),
                               rtol=1e-5, atol=1e-6)


def test_generation_matches_a_manual_greedy_loop(genes):
    _, gene = genes["qwen3_moe"]
    model = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()
    prompt = INPUT[:1, :5]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_depth_rank_and_layer_selection(genes):
    source, gene = genes["mixtral"]
    first = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, rank=8, num_labels=3, core_init="tucker")
    assert first.config.source_layers == [0, 1] and first.config.text_config.num_hidden_layers == 2
    assert first.config.ranks == {"gate": [8, 8], "up": [8, 8], "down": [8, 8]}
    uniform = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, num_labels=3, layer_selection="uniform")
    assert uniform.config.source_layers == [0, 2]
    # attention of target layer 1 is source layer 2's
    torch.testing.assert_close(uniform.model.backbone.layers[1].self_attn.q_proj.weight,
                               source.model.layers[2].self_attn.q_proj.weight, rtol=0, atol=0)
    # truncation keeps the leading basis columns and the leading core block
    dec = gene.decompositions["down"]
    ffn = first.model.ffn(1)
    torch.testing.assert_close(ffn.down.bases.out_basis, dec.out_factor[:, :8], rtol=0, atol=0)
    torch.testing.assert_close(ffn.down.core, dec.layer_core(1)[:8, :8], rtol=0, atol=0)
    logits = first(input_ids=INPUT).logits
    assert logits.shape == (2, 3)


def test_random_cores_and_tied_bases(genes):
    _, gene = genes["olmoe"]
    tied = UniteModel.from_gene(gene, tie_bases=True, rank=6)
    untied = UniteModel.from_gene(gene, tie_bases=False, rank=6)
    assert tied.config.core_init == "random"
    core = tied.ffn(0).gate.core
    assert not torch.allclose(core, gene.decompositions["gate"].layer_core(0)[:6, :6])
    # tied: one set of bases, used by every layer; untied: a copy per layer
    assert tied.ffn(0)._bases("up") is tied.ffn(2)._bases("up") is tied.unite_bases["up"]
    assert untied.ffn(0)._bases("up") is not untied.ffn(2)._bases("up")
    torch.testing.assert_close(untied.ffn(2).up.bases.in_basis, tied.unite_bases["up"].in_basis, rtol=0, atol=0)
    counts = tied.unite_parameter_breakdown(), untied.unite_parameter_breakdown()
    assert counts[1]["bases"] == 3 * counts[0]["bases"]  # three FFN layers
    assert counts[0]["cores"] == counts[1]["cores"] == 3 * 3 * 36


def test_shared_experts_kept_or_dropped(genes):
    _, gene = genes["deepseek_v3"]
    kept = UniteForCausalLM.from_gene(gene, core_init="tucker")
    dropped = UniteForCausalLM.from_gene(gene, shared_experts="drop")
    assert kept.config.ffn_layers == [1, 2] and kept.config.source_layers == [0, 1, 2]
    assert hasattr(kept.model.ffn(1), "shared_experts") and not hasattr(dropped.model.ffn(1), "shared_experts")
    assert dropped.unite_parameter_breakdown().get("shared_experts", 0) == 0
    assert kept.unite_parameter_breakdown()["dense_mlp"] > 0  # DeepSeek's dense first layer, copied


def test_fused_shared_experts_on_the_gene_bases(genes):
    source, gene = genes["deepseek_v3"]
    fused = UniteForCausalLM.from_gene(gene, core_init="tucker", shared_experts="fuse").eval()
    kept = UniteForCausalLM.from_gene(gene, core_init="tucker", shared_experts="keep").eval()
    ffn = fused.model.ffn(2)
    assert ffn.shared_cores is not None and not hasattr(ffn, "shared_experts")
    # at full rank the projection onto the bases is exact: same function as keeping the shared experts
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=INPUT).logits, kept(input_ids=INPUT).logits, rtol=1e-4, atol=1e-4)
    # the shared core is U_out^T W_shared U_in, by hand (a full-rank side is folded: its basis is the identity)
    bases = ffn._bases("up")
    shared_up = source.model.layers[2].mlp.shared_experts.up_proj.weight.detach()
    u_out = bases.out_basis if bases.out_basis is not None else torch.eye(shared_up.shape[0])
    u_in = bases.in_basis if bases.in_basis is not None else torch.eye(shared_up.shape[1])
    torch.testing.assert_close(ffn.shared_cores["up"], u_out.T @ shared_up @ u_in, rtol=1e-5, atol=1e-6)
    assert fused.unite_parameter_breakdown().get("shared_experts", 0) == 0
    _, qwen_gene = genes["qwen2_moe"]  # shared expert wider than the routed ones: cannot share bases
    with pytest.raises(ValueError, match="as wide as the routed experts"):
        UniteForCausalLM.from_gene(qwen_gene, shared_experts="fuse")


def test_multiple_choice_head(genes):
    _, gene = genes["granitemoe"]
    model = UniteForMultipleChoice.from_gene(gene, num_hidden_layers=1, rank=4)
    ids = torch.randint(0, VOCAB, (2, 4, 7))
    out = model(input_ids=ids, labels=torch.tensor([1, 3]))
    assert out.logits.shape == (2, 4)
    # each choice is scored independently: permuting choices permutes the logits
    permuted = model(input_ids=ids[:, [3, 2, 1, 0]]).logits
    torch.testing.assert_close(permuted, out.logits[:, [3, 2, 1, 0]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor([1, 3])))


def test_bad_input_is_refused(genes, tmp_path):
    _, gene = genes["mixtral"]
    with pytest.raises(ValueError, match="num_hidden_layers=4 is out of range"):
        UniteForCausalLM.from_gene(gene, num_hidden_layers=4)
    with pytest.raises(ValueError, match="above the gene's ranks"):
        UniteForCausalLM.from_gene(gene, rank=1000)
    with pytest.raises(ValueError, match="needs num_labels"):
        UniteForSequenceClassification.from_gene(gene)
    with pytest.raises(ValueError, match="core_init"):
        UniteForCausalLM.from_gene(gene, core_init="zeros")
    gene.save_pretrained(tmp_path / "gene")
    config = json.loads((tmp_path / "gene" / "gene_config.json").read_text())
    (tmp_path / "gene" / "gene_config.json").write_text(json.dumps({**config, "format_version": 7}))
    with pytest.raises(GeneFormatError, match="format version 7"):
        UniteForCausalLM.from_gene(tmp_path / "gene")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gene"]  # nothing else written (no lock file either)


def test_auto_classes_and_save_load(genes, tmp_path):
    _, gene = genes["qwen2_moe"]
    model = UniteForSequenceClassification.from_gene(gene, num_hidden_layers=2, rank=8, num_labels=4, pad_token_id=0)
    model.save_pretrained(tmp_path / "arc-unite")
    files = set(os.listdir(tmp_path / "arc-unite"))
    assert {"config.json", "model.safetensors", "modeling_unite.py", "configuration_unite.py", "README.md"} <= files
    auto_map = json.loads((tmp_path / "arc-unite" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_unite.UniteForSequenceClassification"
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "arc-unite")
    assert type(loaded) is UniteForSequenceClassification
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path / "arc-unite"), UniteConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT).logits, model(input_ids=INPUT).logits, rtol=0, atol=0)
    card = (tmp_path / "arc-unite" / "README.md").read_text()
    assert "learngene" in card and "qwen2_moe" in card


def test_trust_remote_code_without_unite_hf(genes, tmp_path):
    _, gene = genes["mixtral"]
    model = UniteForCausalLM.from_gene(gene, num_hidden_layers=2, rank=8, core_init="tucker")
    model.save_pretrained(tmp_path / "target")
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
    script = (
        "import sys, json, torch\n"
        "sys.modules['unite_hf'] = None  # unite_hf is not importable here\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'target')!r}, trust_remote_code=True)\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        f"ids = torch.tensor({INPUT.tolist()})\n"
        "print(json.dumps(m(input_ids=ids).logits.tolist()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_truncated_target_checkpoint_is_a_clear_error(genes, tmp_path):
    _, gene = genes["mixtral"]
    UniteForCausalLM.from_gene(gene, num_hidden_layers=1, rank=4).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match="(?i)safetensor|incomplete|header|deserializ|truncat"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_parameter_breakdown_matches_paper_a25_for_qwen3_30b():
    """A 2-layer rank-512 classifier on the real Qwen3-30B-A3B config comes to about 360M (paper A.2.5),
    with a copy of the bases per layer (tie_bases=False, the default)."""
    text_config = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        tie_word_embeddings=False,
    )
    config = UniteConfig(text_config=text_config, ffn_layers=[0, 1], source_layers=[0, 1],
                         ranks={p: [512, 512] for p in ("gate", "up", "down")}, expert_intermediate_size=768, num_labels=4)
    with torch.device("meta"):
        model = UniteForSequenceClassification(config)
    counts = model.unite_parameter_breakdown()
    hidden, inter, vocab, heads, kv, head_dim, r = 2048, 768, 151936, 32, 4, 128, 512
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o, k, v
    assert counts["embeddings"] == vocab * hidden
    assert counts["attention"] == 2 * attention
    assert counts["bases"] == 2 * 3 * (inter + hidden) * r
    assert counts["cores"] == 2 * 3 * r * r
    assert counts["head"] == hidden * 4
    assert counts["norms"] == 2 * (2 * hidden + 2 * head_dim) + hidden  # layer norms, q/k norms, final norm
    assert abs(counts["total"] - 360e6) / 360e6 < 0.01, counts


def test_loading_arguments_never_reach_the_saved_config(genes, tmp_path):
    """Regression: from_gene(token=...) wrote the token (and cache_dir, device_map) into config.json."""
    _, gene = genes["mixtral"]
    gene.save_pretrained(tmp_path / "gene")
    secret = "hf_leakcheckDoNotWriteMe0123456789"
    model = UniteForCausalLM.from_gene(tmp_path / "gene", token=secret, cache_dir=str(tmp_path / "cache"),
                                       local_files_only=True, force_download=False, revision=None, device_map="cpu")
    model.save_pretrained(tmp_path / "target")
    for path in (tmp_path / "target").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, f"the token was written to {path.name}"
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    for key in ("token", "cache_dir", "device_map", "local_files_only", "force_download", "revision"):
        assert key not in config, key
    assert str(tmp_path / "cache") not in (tmp_path / "target" / "config.json").read_text()
    assert not hasattr(model.config, "token")


def test_from_gene_refuses_unknown_keywords_and_bad_num_labels(genes):
    _, gene = genes["mixtral"]
    with pytest.raises(TypeError, match="num_hidden_layer"):
        UniteForCausalLM.from_gene(gene, num_hidden_layer=1)  # typo of num_hidden_layers
    with pytest.raises(TypeError, match="ranks"):
        UniteForCausalLM.from_gene(gene, ranks={"up": [2, 2]})  # owned by from_gene: use rank=
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="num_labels must be a positive int"):
            UniteForSequenceClassification.from_gene(gene, num_labels=bad)
    with pytest.raises(ValueError, match="one device"):
        UniteForCausalLM.from_gene(gene, device_map={"a": "cpu", "b": "meta"})


def test_dtype_and_deprecated_torch_dtype_are_honoured(genes):
    _, gene = genes["mixtral"]
    model = UniteForCausalLM.from_gene(gene, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dtype == torch.bfloat16
    with pytest.warns(FutureWarning, match="torch_dtype is deprecated"):
        old = UniteForCausalLM.from_gene(gene, torch_dtype=torch.float16)
    assert {p.dtype for p in old.parameters()} == {torch.float16}
    assert old.config.dtype == torch.float16
    assert UniteForCausalLM.from_gene(gene, dtype="bfloat16").config.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating torch dtype"):
        UniteForCausalLM.from_gene(gene, dtype=torch.int64)


def test_forward_and_generate_raise_no_cache_rename_warning(genes):
    """Regression: naming past_key_values= for the backbone warned on every forward (renamed to cache)."""
    import warnings

    _, gene = genes["qwen2_moe"]
    model = UniteForCausalLM.from_gene(gene, core_init="tucker").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            model(input_ids=INPUT)
        model.generate(INPUT[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_full_rank_sides_store_no_basis_and_rebuild_the_gene_exactly(genes):
    """A side at full rank holds no basis (folded into the core): the rebuilt weights are the gene's
    reconstruction U_out G_l U_in^T computed from the decomposition, and only truncated sides cost bases."""
    _, gene = genes["mixtral"]
    hidden, inter = gene.config.hidden_size, gene.config.expert_intermediate_size
    for rank, folded in ((None, {"gate": ("out", "in"), "up": ("out", "in"), "down": ("out", "in")}),
                         ((8, 24), {"gate": (), "up": (), "down": ("in",)})):
        ranks = gene.ranks if rank is None else None
        target = UniteForCausalLM.from_gene(gene, core_init="tucker", rank=rank).eval()
        for row, layer in enumerate(gene.moe_layers):
            ffn = target.model.ffn(layer)
            for proj in ("gate", "up", "down"):
                bases = ffn._bases(proj)
                assert {side for side in ("out", "in") if getattr(bases, f"{side}_basis") is None} == set(folded[proj])
                if rank is None:
                    expected = gene.decompositions[proj].reconstruct_layer(row)
                    got = ffn.linear(proj).dense_weight(bases)
                    # float32 products over the ranks: eps * rank * |U||G||U| bounds the rounding
                    r = max(gene.decompositions[proj].ranks[1:])
                    bound = torch.finfo(torch.float32).eps * r * float(torch.linalg.matrix_norm(expected)) * 4
                    assert float(torch.linalg.matrix_norm(got - expected)) <= bound, (proj, row)
        if ranks is not None:
            assert all(r[1] == (inter if p != "down" else hidden) for p, r in ranks.items())  # full rank here
        bases = target.unite_parameter_breakdown().get("bases", 0)
        by_hand = sum(d * r for proj, (r_out, r_in) in target.config.ranks.items()
                      for d, r in (((hidden, r_out) if proj == "down" else (inter, r_out)),
                                   ((inter, r_in) if proj == "down" else (hidden, r_in))) if r < d)
        assert bases == by_hand * len(gene.moe_layers)
