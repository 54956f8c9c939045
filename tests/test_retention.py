"""The retention benchmark against hand computations on tiny models: swap gap, relative error, perplexity."""

import copy
import json
import math

import pytest
import torch
import transformers
from conftest import extract_tiny_mixtral_gene, needs_data, run_cli
from tiny_models import VOCAB, tiny_moe, tiny_module_list_moe
from torch import nn

from unite_hf import UniteGene, extract_universal_knowledge, get_source
from unite_hf.evaluation import held_out_windows, measure_retention

CALIBRATION = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(3))


def loud_mixtral(identical: bool) -> nn.Module:
    """A tiny Mixtral whose expert weights are drawn large enough that deleting a layer's FFN costs a KL
    far above float noise. ``identical``: every expert a copy of expert 0, so that with Mixtral's
    normalised top-k weights the MoE *is* that FFN."""
    model = tiny_moe("mixtral")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in get_source(model).blocks:
            experts = model.get_submodule(block.name).experts
            for param in (experts.gate_up_proj, experts.down_proj):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.4)
                if identical:
                    param.copy_(param[:1].expand_as(param))
    return model


def zero_cores(gene):
    gene = copy.deepcopy(gene)
    for decomposition in gene.decompositions.values():
        decomposition.core.zero_()
    return gene


class DenseFFN(nn.Module):
    """The test's own FFN: act(x W_g^T) * (x W_u^T) W_d^T from plain matrices."""

    def __init__(self, weights, act):
        super().__init__()
        self.weights, self.act = weights, act

    def forward(self, x):
        w = self.weights
        return (self.act(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def hand_kl(reference, model, windows):
    """Mean over windows of the mean per-token KL(reference || model), with torch's kl_div."""
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=windows).logits, -1)
        q = torch.log_softmax(model(input_ids=windows).logits, -1)
    per_token = nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    return per_token.mean(-1)


def with_block(model, name, module):
    model = copy.deepcopy(model)
    parent, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, module)
    return model


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_a_gene_that_is_the_exact_ffn_scores_one_and_zero():
    source = loud_mixtral(identical=True)
    gene = extract_universal_knowledge(source, calibration=CALIBRATION, show_progress=False)
    report = measure_retention(gene, source, text=HELD_OUT, num_windows=6, seq_len=16, layers=[0, 1, 2],
                               show_progress=False)
    for layer in report.layers:
        assert layer.swap_gap == pytest.approx(1.0, abs=1e-4)
        assert layer.kl_zero > 1e-4  # deleting the layer does cost something
    assert max(report.relative_error.values()) < 1e-4
    assert report.perplexity["fused"] == pytest.approx(report.perplexity["source"], rel=1e-5)
    assert report.perplexity["target"] == pytest.approx(report.perplexity["source"], rel=1e-5)


def test_a_zero_ffn_scores_zero_and_one():
    source = loud_mixtral(identical=True)
    gene = zero_cores(extract_universal_knowledge(source, calibration=CALIBRATION, show_progress=False))
    report = measure_retention(gene, source, text=HELD_OUT, num_windows=6, seq_len=16, show_progress=False)
    for layer in report.layers:
        assert layer.swap_gap == pytest.approx(0.0, abs=1e-6)
    assert all(error == pytest.approx(1.0, abs=1e-6) for error in report.relative_error.values())


def test_kl_gap_and_perplexity_match_a_hand_computation():
    source = loud_mixtral(identical=False)
    gene = extract_universal_knowledge(source, calibration=CALIBRATION, show_progress=False)
    report = measure_retention(gene, source, text=HELD_OUT, num_windows=6, seq_len=16, layers=[1], show_progress=False)
    block = get_source(source).block(1)
    rebuilt = DenseFFN({p: gene.fused_weight(1, p) for p in ("gate", "up", "down")}, block.activation)
    kl_swap = hand_kl(source, with_block(source, block.name, rebuilt), HELD_OUT)
    kl_zero = hand_kl(source, with_block(source, block.name, Zero()), HELD_OUT)
    (layer,) = report.layers
    assert layer.kl_swap == pytest.approx(float(kl_swap.mean()), rel=1e-4)
    assert layer.kl_zero == pytest.approx(float(kl_zero.mean()), rel=1e-4)
    assert layer.swap_gap == pytest.approx(1 - float(kl_swap.double().mean() / kl_zero.double().mean()), abs=5e-4)
    assert layer.kl_difference_se == pytest.approx(float((kl_zero - kl_swap).std() / math.sqrt(6)), rel=1e-3)
    with torch.no_grad():
        loss = source(input_ids=HELD_OUT, labels=HELD_OUT).loss  # transformers' own shifted cross-entropy
    assert report.perplexity["source"] == pytest.approx(math.exp(float(loss)), rel=1e-5)
    # the relative error of layer 1 on its own input hidden states, by hand
    captured = []
    handle = source.get_submodule(block.name).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        source(input_ids=HELD_OUT[:1])
        handle.remove()
        x = captured[0]
        y = source.get_submodule(block.name)(x)
        y = y[0] if isinstance(y, tuple) else y
        expected = torch.linalg.norm(rebuilt(x) - y) / torch.linalg.norm(y)
    assert report.relative_error[1] == pytest.approx(float(expected), rel=1e-4)
    # the FFN parameter fraction, counted by hand: untied bases and a core per layer and projection
    hidden, inter = 32, 24
    # (a side at full rank stores no basis: it is folded into the core)
    per_layer = sum(d_out * r_out * (r_out < d_out) + r_out * r_in + d_in * r_in * (r_in < d_in)
                    for (d_out, d_in), (_, r_out, r_in) in
                    zip([(inter, hidden), (inter, hidden), (hidden, inter)], [gene.ranks[p] for p in ("gate", "up", "down")]))
    assert report.ffn_parameter_fraction == pytest.approx(per_layer / (4 * 3 * hidden * inter))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_shared_baseline_gives_the_numbers_of_separate_calls(family):
    """baseline= (a sweep over genes and ranks on one source) reuses the source's own passes and, without
    shared experts, the no-experts KLs; every number is that of a call on its own. A shared expert is part
    of the zeroed layer, so with one the no-experts KLs are measured per call."""
    source = loud_mixtral(identical=False) if family == "mixtral" else tiny_moe(family)
    genes = [extract_universal_knowledge(source, calibration=CALIBRATION, show_progress=False, **options)
             for options in ({}, {"decomposition": "tucker_hidden"})]
    baseline, kwargs = {}, dict(text=HELD_OUT, num_windows=6, seq_len=16, show_progress=False)
    for gene in genes:
        for rank in (4, None):
            shared = measure_retention(gene, source, rank=rank, baseline=baseline, **kwargs).to_dict()
            alone = measure_retention(gene, source, rank=rank, **kwargs).to_dict()
            assert shared == alone
    assert bool(baseline.get("kl_zero")) == (family == "mixtral")
    with pytest.raises(ValueError, match="one dict per source"):
        measure_retention(genes[0], source, text=HELD_OUT[:4], num_windows=4, seq_len=16, baseline=baseline,
                          show_progress=False)


@pytest.mark.parametrize("make", [lambda: tiny_moe("qwen2_moe"), lambda: tiny_moe("deepseek_v3"),
                                  lambda: tiny_moe("granitemoe")], ids=["shared_expert", "dense_first_layer", "granite"])
def test_runs_on_other_layouts_fusions_and_decompositions(make, tmp_path):
    source = make()
    experts = get_source(source).blocks[0]
    width = experts.num_experts * experts.expert(0).down.shape[1] // 2
    for fusion, decomposition, options in (("fisher", "tucker", {}), ("fisher_aligned", "tucker_hidden", {}),
                                           ("concat", "tucker_hidden", {"fused_width": width})):
        gene = extract_universal_knowledge(source, calibration=CALIBRATION, fusion=fusion, decomposition=decomposition,
                                           show_progress=False, **options)
        gene.save_pretrained(tmp_path / fusion)  # the reloaded gene re-fuses from what it stored
        gene = type(gene).from_pretrained(tmp_path / fusion)
        assert gene.config.expert_intermediate_size == options.get("fused_width", width * 2 // experts.num_experts)
        report = measure_retention(gene, source, text=HELD_OUT, num_windows=4, seq_len=16, show_progress=False)
        assert set(report.relative_error) == set(gene.moe_layers)
        assert all(math.isfinite(layer.swap_gap) for layer in report.layers)
        # at full rank the target is the fused source: same perplexity
        assert report.perplexity["target"] == pytest.approx(report.perplexity["fused"], rel=1e-4)
        json.loads(report.to_json())


def test_bad_input_is_refused_before_any_forward_pass(tmp_path):
    source = tiny_moe("mixtral")
    gene = extract_universal_knowledge(source, calibration=CALIBRATION, show_progress=False)
    with pytest.raises(ValueError, match="not extracted from this source"):
        measure_retention(gene, tiny_moe("mixtral", num_hidden_layers=2), text=HELD_OUT, num_windows=4, seq_len=16)
    with pytest.raises(ValueError, match="vocabulary"):
        measure_retention(gene, tiny_moe("mixtral", vocab_size=VOCAB + 4), text=HELD_OUT, num_windows=4, seq_len=16)
    with pytest.raises(ValueError, match="above the gene's ranks"):
        measure_retention(gene, source, text=HELD_OUT, num_windows=4, seq_len=16, rank=1000)
    with pytest.raises(ValueError, match="fewer than"):
        measure_retention(gene, source, text=HELD_OUT, num_windows=8, seq_len=16)
    with pytest.raises(ValueError, match="hold no experts"):
        measure_retention(gene, source, text=HELD_OUT, num_windows=4, seq_len=16, layers=[7])
    module_list = tiny_module_list_moe()
    module_list_gene = extract_universal_knowledge(module_list, calibration=CALIBRATION, show_progress=False)
    with pytest.raises(ValueError, match="ModuleList"):
        measure_retention(module_list_gene, module_list, text=HELD_OUT, num_windows=4, seq_len=16)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer())
    with pytest.raises(ValueError, match="fewer than the 4 x 16"):
        held_out_windows(tokenizer, short, num_windows=4, seq_len=16)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "only": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_held_out_windows_use_the_tail_and_tokenize_only_what_they_need(tmp_path):
    text = tmp_path / "text.txt"
    words = [f"w{i}" for i in range(2000)]
    text.write_text(" ".join(words))
    seen = []

    class Counting:
        def __call__(self, chunk, add_special_tokens=False):
            seen.append(len(chunk))
            return {"input_ids": [int(w[1:]) for w in chunk.split()]}

    windows, label = held_out_windows(Counting(), text, num_windows=2, seq_len=5, tail_fraction=0.5)
    assert windows.shape == (2, 5)
    assert int(windows[0, 1]) >= 900  # from the last half of the text (the cut may split the first word)
    assert sum(seen) < len(text.read_text()) / 2 + 1  # never the whole file
    assert "last 50%" in label


@needs_data
def test_cli_prints_one_json_line(tmp_path):
    extract_tiny_mixtral_gene(tmp_path)
    kept = run_cli("extract", "--source", str(tmp_path / "src"), "--calibration", "wikitext2", "--num-sequences", "4",
                   "--seq-len", "16", "--fusion", "concat", "--fused-width", "48", "--decomposition", "tucker_hidden",
                   "--activation-aware", "--rank", "8", "--out", str(tmp_path / "kept"), cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    assert UniteGene.from_pretrained(tmp_path / "kept").config.expert_intermediate_size == 48
    result = run_cli("retention", "--gene", str(tmp_path / "gene"), "--source", str(tmp_path / "src"), "--num-windows", "3",
                     "--seq-len", "16", "--rank", "4", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["ranks"]["up"] == [4, 4] and "simplebooks" in report["held_out"]
    assert {"source", "fused", "target"} == set(report["perplexity"])
    bad = run_cli("retention", "--gene", str(tmp_path / "gene"), "--source", str(tmp_path / "src"), "--rank", "99",
                  "--quiet", cwd=tmp_path)
    assert bad.returncode == 2 and "above the gene's ranks" in bad.stderr


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_routed_replacement_scores_hand_known_controls(family):
    """measure_routed_replacement on replacements whose scores are known by definition: the source's own routed
    output (gap 1, the source's perplexity), nothing (gap 0), and the negated routed output (gap below 0)."""
    from unite_hf.evaluation import measure_routed_replacement
    from unite_hf.refit.base import shared_output

    source = loud_mixtral(identical=False) if family == "mixtral" else tiny_moe(family)
    twin = copy.deepcopy(source)  # its blocks compute the reference (the source's own carry the replacement hooks)
    blocks = {block.layer_idx: block for block in get_source(twin).blocks}

    def routed(layer, sign=1.0):
        def fn(x):
            out = twin.get_submodule(blocks[layer].name)(x.unsqueeze(0))
            out = (out[0] if isinstance(out, tuple) else out).squeeze(0)
            shared = shared_output(blocks[layer], x)
            return sign * (out if shared is None else out - shared)
        return fn

    kwargs = dict(tokenizer=None, text=HELD_OUT, num_windows=6, seq_len=16)
    exact = measure_routed_replacement(source, {layer: routed(layer) for layer in blocks}, **kwargs)
    nothing = measure_routed_replacement(source, {layer: (lambda x: torch.zeros_like(x)) for layer in blocks}, **kwargs)
    negated = measure_routed_replacement(source, {layer: routed(layer, -1.0) for layer in blocks}, **kwargs)
    eps = torch.finfo(torch.float32).eps
    for row in exact["layers"]:
        # KL of a model against itself: float32 log-softmax rounding over the vocabulary, relative to the zeroed KL
        assert row.kl_swap <= 64 * eps * VOCAB and abs(row.swap_gap - 1) <= 64 * eps * VOCAB / row.kl_zero
    assert exact["perplexity"]["replaced"] == pytest.approx(exact["perplexity"]["source"], rel=64 * eps * 16)
    assert all(row.swap_gap == 0.0 for row in nothing["layers"])
    assert all(row.swap_gap < 0 for row in negated["layers"])
    with pytest.raises(ValueError, match="no replacement given"):
        measure_routed_replacement(source, {}, **kwargs)
