"""XPERT part 1: cross-domain expert activation analysis, checked against independent references.

Routing statistics are recomputed here from each router's own weights on the hidden states it receives
(captured with forward pre-hooks), never through the importance probe; scores and selections are
checked by hand on handcrafted frequencies.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
import transformers
from tiny_models import COMMON, VOCAB, tiny_dense, tiny_module_list_moe, tiny_moe
from tolerances import assert_close_eps

from unite_hf.methods.xpert import analysis as analysis_module
from unite_hf.methods.xpert.analysis import (
    ANALYSIS_FILE,
    COMMONALITY_SCORES,
    HEATMAP_FILE,
    MAX_HEATMAP_PANELS,
    ExpertAnalysis,
    add_arguments,
    analyze_experts,
    commonality_scores,
    domain_texts,
    rank_experts,
    run,
    select_common_experts,
    select_experts,
)
from unite_hf.calibration import find_local_data_dir
from unite_hf.importance import compute_expert_importance
from unite_hf.sources import UnsupportedSourceError, get_source

DATA = find_local_data_dir()
TOKENIZER_FILE = None if DATA is None else DATA / "tokenizers" / "gpt2_tokenizer.json"
needs_data = pytest.mark.skipif(TOKENIZER_FILE is None or not TOKENIZER_FILE.is_file(),
                                reason="../shared/data (GPT-2 tokenizer, task files) not found")
GPT2_VOCAB = 50257
TOP_K = 2
NUM_EXPERTS = 4


def _domains(num_sequences: int = 4, seq_len: int = 12) -> dict[str, torch.Tensor]:
    """Three token-id domains with different token ranges, so routing differs between them."""
    g = torch.Generator().manual_seed(3)
    return {
        "all": torch.randint(0, VOCAB, (num_sequences, seq_len), generator=g),
        "low": torch.randint(0, VOCAB // 3, (num_sequences, seq_len), generator=g),
        "high": torch.randint(2 * VOCAB // 3, VOCAB, (num_sequences, seq_len), generator=g),
    }


def _model(family: str) -> torch.nn.Module:
    return tiny_module_list_moe() if family == "module_list" else tiny_moe(family)


def _renormalises(model: torch.nn.Module) -> bool:
    # Mixtral and the ModuleList block always renormalise the top-k weights; Qwen3-MoE and OLMoE follow the config
    return getattr(model.config, "norm_topk_prob", True) or model.config.model_type == "mixtral"


def _brute_force_routing(model: torch.nn.Module, input_ids: torch.Tensor, per_sequence: bool):
    """(frequency [L, E], router mass [L, E]) from softmax / top-k of each router's weight on its captured input."""
    source = get_source(model)
    captured: dict[int, list[torch.Tensor]] = {row: [] for row in range(len(source.blocks))}
    handles = [block.router.register_forward_pre_hook(
        lambda module, args, row=row: captured[row].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for row, block in enumerate(source.blocks)]
    try:
        with torch.no_grad():
            for batch in (input_ids.split(1) if per_sequence else [input_ids]):
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    tokens = input_ids.numel()
    frequency, mass = torch.zeros(len(source.blocks), NUM_EXPERTS, dtype=torch.float64), torch.zeros(
        len(source.blocks), NUM_EXPERTS, dtype=torch.float64)
    for row, block in enumerate(source.blocks):
        hidden = torch.cat(captured[row]).float()
        assert hidden.shape[0] == tokens
        probs = torch.softmax(hidden @ block.router_weight.detach().float().T, dim=-1)
        weights, index = probs.topk(TOP_K, dim=-1)
        if _renormalises(model):
            weights = weights / weights.sum(-1, keepdim=True)
        for t in range(tokens):
            for slot in range(TOP_K):
                frequency[row, index[t, slot]] += 1
                mass[row, index[t, slot]] += float(weights[t, slot])
    return frequency / (tokens * TOP_K), mass / tokens


# --------------------------------------------------------------------------------------------------
# Routing statistics against the routers themselves
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "module_list"])
def test_frequency_and_router_mass_match_a_brute_force_router_computation(family):
    model = _model(family)
    domains = _domains()
    result = analyze_experts(model, domains, batch_size=4, show_progress=False)
    assert result.domains == list(domains)
    assert result.moe_layers == [0, 1, 2] and result.num_experts == NUM_EXPERTS and result.top_k == TOP_K
    assert result.tokens == [ids.numel() for ids in domains.values()]
    assert result.frequency.shape == result.router_mass.shape == (3, 3, NUM_EXPERTS)
    for d, ids in enumerate(domains.values()):
        frequency, mass = _brute_force_routing(model, ids, per_sequence=family == "module_list")
        torch.testing.assert_close(result.frequency[d], frequency, rtol=0, atol=1e-12)
        torch.testing.assert_close(result.router_mass[d], mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.frequency.sum(-1), torch.ones(3, 3, dtype=torch.float64))
    # renormalised top-k weights give every token a mass of 1; the others only the top-k probability
    mass_per_token = result.router_mass.sum(-1)
    if _renormalises(model):  # float32 weights: a top-k sum and a division per token (k = TOP_K + 1)
        assert_close_eps(mass_per_token, torch.ones_like(mass_per_token), k=TOP_K + 1)
    else:
        assert bool((mass_per_token < 1).all()) and bool((mass_per_token > TOP_K / NUM_EXPERTS).all())
    # the defaults: k_common = top-k common experts per layer, by min_frequency
    assert result.score == "min_frequency" and result.k_common == TOP_K and result.threshold is None
    ranking = rank_experts(result.commonality, result.frequency)
    assert result.common_experts == [order[:TOP_K] for order in ranking]
    torch.testing.assert_close(result.commonality, NUM_EXPERTS * result.frequency.min(dim=0).values)


def test_rows_follow_moe_layers_when_the_first_layer_is_dense():
    model = tiny_moe("deepseek_v3")  # first_k_dense_replace=1; routed_scaling_factor scales the weights
    result = analyze_experts(model, _domains(2, 8), show_progress=False)
    assert result.moe_layers == [1, 2] and result.frequency.shape == (3, 2, NUM_EXPERTS)
    reference = compute_expert_importance(model, _domains(2, 8)["low"], fisher=False, show_progress=False)
    torch.testing.assert_close(result.frequency[1], reference.frequency)
    # float32 weights: a top-k sum, a division and the scaling per token
    assert_close_eps(result.router_mass.sum(-1), torch.full((3, 2), model.config.routed_scaling_factor),
                     k=model.config.num_experts_per_tok + 2)


def test_the_fisher_pass_records_the_same_routing_mass():
    """The mass accumulates next to the routed counts in every pass; a Fisher pass must not change it."""
    ids = _domains()["all"]
    for model in (tiny_moe("qwen3_moe"), tiny_module_list_moe()):
        inference = compute_expert_importance(model, ids, fisher=False, show_progress=False)
        fisher = compute_expert_importance(model, ids, fisher=True, show_progress=False)
        assert not fisher.routing_mass.requires_grad
        torch.testing.assert_close(fisher.routing_mass, inference.routing_mass, rtol=1e-5, atol=1e-6)


def test_an_unreadable_router_gives_no_mass_and_says_so():
    model = tiny_module_list_moe()
    for layer in model.model.layers:  # the router returns bare logits and the block no longer says its top-k
        layer.mlp.k, layer.mlp.top_k = layer.mlp.top_k, None
        layer.mlp.forward = _list_block_forward_with_k.__get__(layer.mlp)
    assert compute_expert_importance(model, _domains()["all"], fisher=False, show_progress=False).routing_mass is None
    with pytest.warns(UserWarning, match="router_mass is not available"):
        result = analyze_experts(model, _domains(), show_progress=False)
    assert result.router_mass is None and result.frequency.shape == (3, 3, NUM_EXPERTS)
    with pytest.raises(ValueError, match="router_mass"):
        commonality_scores(result.frequency, "min_router_mass", top_m=2)
    assert ExpertAnalysis.from_dict(result.to_dict()).router_mass is None


def _list_block_forward_with_k(self, hidden_states):
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    weights, index = torch.softmax(self.gate(flat), dim=-1).topk(self.k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(self.experts):
        token, slot = torch.where(index == e)
        if token.numel():
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
    return (out + self.shared_experts(flat)).reshape(shape)


# --------------------------------------------------------------------------------------------------
# Commonality scores and selection, by hand
# --------------------------------------------------------------------------------------------------
# D=3 domains, L=2 layers, E=4 experts. Layer 1 is uniform in every domain (all ties).
HAND_FREQUENCY = torch.tensor([
    [[0.40, 0.30, 0.20, 0.10], [0.25] * 4],
    [[0.10, 0.40, 0.30, 0.20], [0.25] * 4],
    [[0.25, 0.25, 0.25, 0.25], [0.25] * 4],
], dtype=torch.float64)
HAND_MASS = torch.tensor([
    [[0.20, 0.20, 0.05, 0.05], [0.1] * 4],  # shares .4 .4 .1 .1
    [[0.30, 0.30, 0.20, 0.20], [0.2] * 4],  # shares .3 .3 .2 .2
    [[0.10, 0.10, 0.10, 0.10], [0.3] * 4],  # shares .25 each
], dtype=torch.float64)


def test_commonality_scores_by_hand():
    assert sorted(COMMONALITY_SCORES) == ["min_frequency", "min_router_mass", "top_m_fraction"]
    min_frequency = commonality_scores(HAND_FREQUENCY, "min_frequency", top_m=2)
    # E * min over domains: expert 0 -> 4 * 0.10, 1 -> 4 * 0.25, 2 -> 4 * 0.20, 3 -> 4 * 0.10
    torch.testing.assert_close(min_frequency, torch.tensor([[0.4, 1.0, 0.8, 0.4], [1.0] * 4], dtype=torch.float64))
    # top-2 per domain: d0 {0, 1}, d1 {1, 2}, d2 (all tied: lower index) {0, 1}
    top_m = commonality_scores(HAND_FREQUENCY, "top_m_fraction", top_m=2)
    torch.testing.assert_close(top_m, torch.tensor([[2 / 3, 1.0, 1 / 3, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64))
    top_1 = commonality_scores(HAND_FREQUENCY, "top_m_fraction", top_m=1)
    torch.testing.assert_close(top_1[0], torch.tensor([2 / 3, 1 / 3, 0.0, 0.0], dtype=torch.float64))
    mass = commonality_scores(HAND_FREQUENCY, "min_router_mass", top_m=2, router_mass=HAND_MASS)
    torch.testing.assert_close(mass, torch.tensor([[1.0, 1.0, 0.4, 0.4], [1.0] * 4], dtype=torch.float64))


def test_ranking_and_selection_by_hand():
    scores = commonality_scores(HAND_FREQUENCY, "min_frequency", top_m=2)
    # experts 0 and 3 tie at 0.4: mean frequency 0.25 beats 0.1833; layer 1 ties everywhere: by index
    assert rank_experts(scores, HAND_FREQUENCY) == [[1, 2, 0, 3], [0, 1, 2, 3]]
    assert select_common_experts(scores, HAND_FREQUENCY, k_common=2) == [[1, 2], [0, 1]]
    assert select_common_experts(scores, HAND_FREQUENCY, threshold=0.8) == [[1, 2], [0, 1, 2, 3]]
    assert select_common_experts(scores, HAND_FREQUENCY, threshold=0.4) == [[1, 2, 0, 3], [0, 1, 2, 3]]
    assert select_common_experts(scores, HAND_FREQUENCY, threshold=1.5) == [[], []]
    top_m = commonality_scores(HAND_FREQUENCY, "top_m_fraction", top_m=2)
    assert select_common_experts(top_m, HAND_FREQUENCY, k_common=2) == [[1, 0], [0, 1]]
    # a fraction tie broken by mean frequency: experts 0 and 1 both top-1 in one domain each
    frequency = torch.tensor([[[0.5, 0.2, 0.3]], [[0.1, 0.6, 0.3]]], dtype=torch.float64)
    tied = commonality_scores(frequency, "top_m_fraction", top_m=1)
    torch.testing.assert_close(tied, torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    assert rank_experts(tied, frequency) == [[1, 0, 2]]
    with pytest.raises(ValueError, match="exactly one"):
        select_common_experts(scores, HAND_FREQUENCY, k_common=2, threshold=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        select_common_experts(scores, HAND_FREQUENCY)
    with pytest.raises(ValueError, match="unknown score.*min_frequency.*top_m_fraction"):
        commonality_scores(HAND_FREQUENCY, "max_entropy")
    with pytest.raises(ValueError, match="top_m"):
        commonality_scores(HAND_FREQUENCY, "top_m_fraction", top_m=5)


def _hand_analysis(**overrides) -> ExpertAnalysis:
    scores = commonality_scores(HAND_FREQUENCY, "min_frequency", top_m=2)
    fields = {
        "domains": ["a", "b", "c"], "moe_layers": [1, 3], "num_experts": 4, "top_k": 2, "tokens": [10, 20, 30],
        "frequency": HAND_FREQUENCY, "router_mass": HAND_MASS, "commonality": scores, "score": "min_frequency",
        "top_m": 2, "common_experts": select_common_experts(scores, HAND_FREQUENCY, k_common=2), "k_common": 2,
        "domain_sources": ["x.txt", "y.txt", "input_ids tensor"], "source_id": "tiny", "seed": 7, "seq_len": 12,
        "num_sequences": 4,
    }
    return ExpertAnalysis(**{**fields, **overrides})


def test_select_experts_strategies():
    analysis = _hand_analysis()
    assert select_experts(analysis, "common", 2) == [[1, 2], [0, 1]]
    # mean frequency over domains, layer 0: [0.25, 0.3167, 0.25, 0.1833]
    assert select_experts(analysis, "least", 1) == [[3], [0]]
    least = select_experts(analysis, "least", 2)
    mean = HAND_FREQUENCY.mean(0)
    for row, chosen in enumerate(least):
        others = [e for e in range(4) if e not in chosen]
        assert max(mean[row, chosen]) <= min(mean[row, others])
    assert least[0] == [3, 0]  # 0 and 2 tie at 0.25: the lower index
    for k in (1, 3, 4):
        first, again = select_experts(analysis, "random", k, seed=5), select_experts(analysis, "random", k, seed=5)
        assert first == again
        assert all(len(set(layer)) == k == len(layer) and set(layer) <= set(range(4)) for layer in first)
    wide = _hand_analysis(num_experts=64, moe_layers=list(range(2)))
    draws = {tuple(map(tuple, select_experts(wide, "random", 8, seed=seed))) for seed in range(5)}
    assert len(draws) == 5  # different seeds, different draws
    with pytest.raises(ValueError, match="unknown strategy.*common.*least.*random"):
        select_experts(analysis, "best", 2)
    for bad in (0, 5, 1.5):
        with pytest.raises(ValueError, match="k must be an int in \\[1, 4\\]"):
            select_experts(analysis, "common", bad)


# --------------------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------------------
def test_json_round_trip_and_saved_files(tmp_path):
    analysis = _hand_analysis()
    restored = ExpertAnalysis.from_dict(json.loads(json.dumps(analysis.to_dict())))
    for name in analysis.__dataclass_fields__:
        value, back = getattr(analysis, name), getattr(restored, name)
        assert torch.equal(value, back) if isinstance(value, torch.Tensor) else value == back, name
    paths = analysis.save(tmp_path / "out")
    assert paths == {"json": str(tmp_path / "out" / ANALYSIS_FILE), "heatmap": str(tmp_path / "out" / HEATMAP_FILE)}
    loaded = ExpertAnalysis.load(tmp_path / "out")
    assert torch.equal(loaded.frequency, analysis.frequency) and loaded.common_experts == [[1, 2], [0, 1]]
    assert ExpertAnalysis.load(tmp_path / "out" / ANALYSIS_FILE).tokens == [10, 20, 30]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([ANALYSIS_FILE, HEATMAP_FILE])  # no .tmp
    data = json.loads((tmp_path / "out" / ANALYSIS_FILE).read_text())
    assert data["moe_layers"] == [1, 3] and data["score"] == "min_frequency" and data["k_common"] == 2
    with pytest.raises(ValueError, match="format_version"):
        ExpertAnalysis.from_dict({**data, "format_version": 99})
    with pytest.raises(FileNotFoundError):
        ExpertAnalysis.load(tmp_path / "missing")


def test_heatmap_is_a_real_png(tmp_path):
    paths = _hand_analysis(threshold=0.5, k_common=None).save(tmp_path)
    raw = Path(paths["heatmap"]).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(paths["heatmap"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_heatmap_caps_the_panels_for_deep_sources(tmp_path):
    layers, experts = 30, 16
    frequency = torch.softmax(torch.randn(2, layers, experts, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64), dim=-1)
    scores = commonality_scores(frequency, "min_frequency", top_m=2)
    analysis = _hand_analysis(domains=["a", "b"], moe_layers=list(range(1, layers + 1)), num_experts=experts,
                              tokens=[1, 1], frequency=frequency, router_mass=None, commonality=scores,
                              common_experts=select_common_experts(scores, frequency, k_common=2))
    shown = analysis.heatmap_layers()
    assert len(shown) == MAX_HEATMAP_PANELS and shown[0] == 1 and shown[-1] == layers
    assert shown == sorted(set(shown))
    gaps = {b - a for a, b in itertools.pairwise(shown)}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    assert Path(analysis.save(tmp_path)["heatmap"]).read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------
# Validation: everything fails before the first forward pass
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_forward(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a forward pass ran before validation failed")
    monkeypatch.setattr(analysis_module, "compute_expert_importance", forbidden)


def test_bad_inputs_fail_before_any_forward_pass(no_forward, tmp_path):
    model, domains = tiny_moe("mixtral"), _domains()
    with pytest.raises(UnsupportedSourceError, match="dense model"):
        analyze_experts(tiny_dense(), domains, show_progress=False)
    with pytest.raises(ValueError, match="unknown score 'entropy'.*min_frequency.*min_router_mass.*top_m_fraction"):
        analyze_experts(model, domains, score="entropy", show_progress=False)
    for bad in (0, NUM_EXPERTS + 1, -1, 1.5, True):
        with pytest.raises(ValueError, match="k_common must be an int in \\[1, 4\\]"):
            analyze_experts(model, domains, k_common=bad, show_progress=False)
    with pytest.raises(ValueError, match="not both"):
        analyze_experts(model, domains, k_common=2, threshold=0.5, show_progress=False)
    with pytest.raises(ValueError, match="threshold"):
        analyze_experts(model, domains, threshold=float("nan"), show_progress=False)
    with pytest.raises(ValueError, match="top_m"):
        analyze_experts(model, domains, top_m=NUM_EXPERTS + 1, show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        analyze_experts(model, domains, batch_size=0, show_progress=False)
    with pytest.raises(ValueError, match="no domains"):
        analyze_experts(model, {}, show_progress=False)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="domain 'legal'.*empty"):
        analyze_experts(model, {**domains, "legal": str(blank)}, tokenizer=_tokenizer_or_skip(), show_progress=False)
    with pytest.raises(ValueError, match="domain 'chat'.*empty"):
        analyze_experts(model, {**domains, "chat": []}, show_progress=False)
    with pytest.raises(ValueError, match="domain 'oov'.*vocabulary"):
        analyze_experts(model, {**domains, "oov": torch.full((2, 8), VOCAB + 3)}, show_progress=False)
    with pytest.raises(FileNotFoundError, match="domain 'gone'"):
        analyze_experts(model, {**domains, "gone": str(tmp_path / "gone.txt")}, show_progress=False)


def test_one_domain_warns_and_still_runs():
    with pytest.warns(UserWarning, match="at least 2 domains"):
        result = analyze_experts(tiny_moe("olmoe"), {"only": _domains()["all"]}, show_progress=False)
    assert result.domains == ["only"] and result.frequency.shape == (1, 3, NUM_EXPERTS)
    torch.testing.assert_close(result.commonality, NUM_EXPERTS * result.frequency[0])


def test_threshold_and_top_m_fraction_on_a_model():
    result = analyze_experts(tiny_moe("mixtral"), _domains(), score="top_m_fraction", threshold=1.0, top_m=3,
                             show_progress=False)
    assert result.k_common is None and result.threshold == 1.0 and result.top_m == 3
    expected = commonality_scores(result.frequency, "top_m_fraction", top_m=3)
    torch.testing.assert_close(result.commonality, expected)
    for row, experts in enumerate(result.common_experts):
        assert sorted(experts) == [e for e in range(NUM_EXPERTS) if expected[row, e] >= 1.0]


# --------------------------------------------------------------------------------------------------
# Text domains, built-in domains and the CLI
# --------------------------------------------------------------------------------------------------
def _tokenizer_or_skip():
    if TOKENIZER_FILE is None or not TOKENIZER_FILE.is_file():
        pytest.skip("GPT-2 tokenizer not found")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")


def _write_corpora(tmp_path) -> dict[str, str]:
    texts = {
        "cooking": "Whisk the eggs with sugar until pale.\n\nFold in the flour and bake for twenty minutes.\n\n" * 6,
        "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n\n" * 6,
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = str(tmp_path / f"{name}.txt")
        (tmp_path / f"{name}.txt").write_text(text)
    return paths


@needs_data
def test_local_text_files_as_domains(tmp_path):
    tokenizer = _tokenizer_or_skip()
    model = tiny_moe("qwen3_moe", vocab_size=GPT2_VOCAB)
    corpora = _write_corpora(tmp_path)
    result = analyze_experts(model, corpora, tokenizer, num_sequences=3, seq_len=16, seed=1, show_progress=False)
    assert result.domains == ["cooking", "code"] and result.tokens == [48, 48]
    # named by file name and content, never by the local folder (genes publish the analysis)
    assert [source.split(" (local file, ")[0] for source in result.domain_sources] == ["cooking.txt", "code.txt"]
    assert not any(str(tmp_path) in source for source in result.domain_sources)
    assert (result.seed, result.seq_len, result.num_sequences) == (1, 16, 3)


@needs_data
def test_builtin_domains_read_the_task_files():
    openbook = domain_texts("openbookqa")
    assert "The sun is responsible for plants sprouting, blooming and wilting" in openbook  # question + answer
    assert "A bee is a pollinating animal" in openbook  # a fact of openbook.txt
    arc = domain_texts("arc_easy")
    assert len(arc) == 2251 and arc[0].startswith("Which factor will most likely cause a person to develop a fever?")
    with pytest.raises(ValueError, match="unknown built-in domain.*openbookqa"):
        domain_texts("poetry")
    tokenizer = _tokenizer_or_skip()
    result = analyze_experts(tiny_moe("mixtral", vocab_size=GPT2_VOCAB), ["openbookqa", "arc_easy"], tokenizer,
                             num_sequences=2, seq_len=16, show_progress=False)
    assert result.domains == ["openbookqa", "arc_easy"]
    assert result.domain_sources[0].startswith("openbookqa (built-in domain")


@needs_data
def test_cli_run_on_a_saved_model(tmp_path, capsys):
    config = transformers.MixtralConfig(**{**COMMON, "vocab_size": GPT2_VOCAB}, intermediate_size=24,
                                        num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "src")
    _tokenizer_or_skip().save_pretrained(tmp_path / "src")
    corpora = _write_corpora(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--source", str(tmp_path / "src"), "--domain", f"cooking={corpora['cooking']}",
                              "--domain", f"code={corpora['code']}", "--num-sequences", "2", "--seq-len", "16",
                              "--score", "top_m_fraction", "--k-common", "3", "--out", str(tmp_path / "analysis")])
    assert run(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = ExpertAnalysis.load(tmp_path / "analysis")
    assert summary["json"] == str(tmp_path / "analysis" / ANALYSIS_FILE)
    assert Path(summary["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    assert summary["common_experts"] == {str(l): e for l, e in zip(saved.moe_layers, saved.common_experts)}
    assert all(len(e) == 3 for e in saved.common_experts)
    assert saved.domains == ["cooking", "code"] and saved.source_id == str(tmp_path / "src")
    assert (saved.score, saved.k_common, saved.num_sequences, saved.seq_len) == ("top_m_fraction", 3, 2, 16)
    with pytest.raises(SystemExit):  # --k-common and --threshold exclude each other
        parser.parse_args(["--source", "x", "--out", "y", "--k-common", "2", "--threshold", "1"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "x", "--out", "y", "--domain", "code="])
