"""Neuron-level fusions: ``fisher_aligned`` (permutation alignment) and ``concat`` (experts side by side).

Every expected value is built here by hand from the experts' raw weights (explicit loops over experts
and neurons), never by calling the fusion code on another input.
"""

import functools
import warnings

import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_gpt_oss, tiny_moe, tiny_module_list_moe, tiny_nemotron_h

from unite_hf import compute_expert_importance, fuse_block, get_source
from unite_hf.fusion import neuron_permutation
from unite_hf.importance import ExpertImportance

CALIBRATION = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
# every fused-3D family, the ModuleList layout, gpt-oss (biases, custom gating), NemotronH (no gate)
ALL_FAMILIES = [*FAMILIES, "module_list", "gpt_oss", "nemotron_h"]
NAMES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def build(family: str):
    builders = {"module_list": tiny_module_list_moe, "gpt_oss": tiny_gpt_oss, "nemotron_h": tiny_nemotron_h}
    return builders[family]() if family in builders else tiny_moe(family)


@functools.lru_cache(maxsize=None)
def calibrated(family: str):
    model = build(family)
    return model, compute_expert_importance(model, CALIBRATION, show_progress=False)


def top_k_of(model) -> int:
    return getattr(model.config, "num_experts_per_tok", 2)  # the ModuleList test model routes to 2


def raw(block, index: int) -> dict[str, torch.Tensor]:
    """One expert's tensors as float64 copies (the names that exist for this layout)."""
    expert = block.expert(index)
    return {n: getattr(expert, n).detach().double().clone() for n in NAMES if getattr(expert, n) is not None}


def hand_ffn(x, weights, gating):
    """``down @ gating(gate x + b_g, up x + b_u) + b_d`` for one FFN given as a dict of tensors."""
    up = x @ weights["up"].T + weights.get("up_bias", 0)
    gate = x @ weights["gate"].T + weights.get("gate_bias", 0) if "gate" in weights else None
    return gating(gate, up) @ weights["down"].T + weights.get("down_bias", 0)


def gating_of(model, block):
    """The experts' elementwise gating, written out (gpt-oss: clamped swiglu with the +1 offset)."""
    if model.config.model_type == "gpt_oss":
        alpha, limit = model.config.swiglu_alpha, model.config.swiglu_limit

        def gpt_oss(gate, up):
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return (up + 1) * gate * torch.sigmoid(gate * alpha)
        return gpt_oss
    act = block.activation
    return (lambda gate, up: act(gate) * up) if block.has_gate else (lambda gate, up: act(up))


def handmade_importance(model, fisher_row0) -> ExpertImportance:
    source = get_source(model)
    fisher = torch.ones(len(source.moe_layers), source.num_experts, dtype=torch.float64)
    fisher[0] = torch.tensor(fisher_row0, dtype=torch.float64)
    return ExpertImportance(source.moe_layers, fisher, fisher / fisher.sum(1, keepdim=True), num_sequences=1)


def permute_neurons(weights: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """New neuron k = old neuron ``perm[k]``: gate/up rows and biases, down columns; down bias untouched."""
    out = {}
    for name, value in weights.items():
        if name == "down":
            out[name] = value[:, perm]
        elif name == "down_bias":
            out[name] = value
        else:
            out[name] = value[perm]
    return out


def plant(block, experts: list[dict[str, torch.Tensor]]) -> None:
    """Write every expert's weights through the block's views (checked to reach the parameters)."""
    with torch.no_grad():
        for index, weights in enumerate(experts):
            views = block.expert(index)
            for name, value in weights.items():
                getattr(views, name).copy_(value)
    for index, weights in enumerate(experts):
        for name, value in raw(block, index).items():
            torch.testing.assert_close(value, weights[name].to(value.dtype), rtol=0, atol=1e-6)


def permuted_copies(block, seed: int, noise: float = 0.0):
    """Plant experts that are one base expert (expert 0) with known neuron permutations (plus noise);
    distinct down biases where the layout has them. Returns the planted permutations."""
    generator = torch.Generator().manual_seed(seed)
    base = raw(block, 0)
    size = base["up"].shape[0]
    perms = [torch.randperm(size, generator=generator) for _ in range(block.num_experts)]
    experts = []
    for perm in perms:
        weights = permute_neurons(base, perm)
        for name, value in weights.items():
            if name == "down_bias":
                weights[name] = torch.randn(value.shape, generator=generator, dtype=torch.float64) * 0.1
            elif noise:
                weights[name] = value + noise * value.std() * torch.randn(value.shape, generator=generator,
                                                                         dtype=torch.float64)
        experts.append(weights)
    plant(block, experts)
    return perms


# -- fisher_aligned ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_aligned_fusion_of_permuted_copies_is_the_reference_expert(family):
    model = build(family)
    block = get_source(model).blocks[0]
    permuted_copies(block, seed=1)
    fisher_row = [0.1, 0.2, 0.45, 0.25]  # reference: expert 2
    importance = handmade_importance(model, fisher_row)
    weights = [f / sum(fisher_row) for f in fisher_row]
    reference = raw(block, 2)
    fused = fuse_block(block, importance, "fisher_aligned")
    assert set(fused) == set(block.projection_names())
    for proj, (weight, bias) in fused.items():
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight.double(), reference[proj], rtol=1e-5, atol=1e-6)
        if proj == "down" and block.has_bias:  # per output feature: averaged, never permuted
            expected = sum(w * raw(block, i)["down_bias"] for i, w in enumerate(weights))
            torch.testing.assert_close(bias.double(), expected, rtol=1e-5, atol=1e-6)
        elif block.has_bias:
            torch.testing.assert_close(bias.double(), reference[f"{proj}_bias"], rtol=1e-5, atol=1e-6)
        else:
            assert bias is None
    plain = fuse_block(block, importance, "fisher")
    assert (plain["up"][0].double() - reference["up"]).abs().max() > 0.1 * reference["up"].abs().max()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "nemotron_h"])
def test_aligned_fusion_recovers_planted_permutations_of_noisy_copies(family):
    model = build(family)
    block = get_source(model).blocks[0]
    perms = permuted_copies(block, seed=3, noise=0.2)
    fisher_row = [0.3, 0.1, 0.2, 0.4]
    ref = 3
    importance = handmade_importance(model, fisher_row)
    # expert i's neuron sigma_i[k] is base neuron perms[i][sigma_i[k]] = perms[ref][k], the reference's neuron k
    sigmas = [torch.argsort(perm)[perms[ref]] for perm in perms]
    assert torch.equal(sigmas[ref], torch.arange(len(sigmas[ref])))
    for i in range(block.num_experts):
        assert torch.equal(neuron_permutation(block.expert(i), block.expert(ref)), sigmas[i])
    expected = {}
    for i, f in enumerate(fisher_row):
        for name, value in permute_neurons(raw(block, i), sigmas[i]).items():
            expected[name] = expected.get(name, 0) + f / sum(fisher_row) * value
    fused = fuse_block(block, importance, "fisher_aligned")
    for proj, (weight, bias) in fused.items():
        torch.testing.assert_close(weight.double(), expected[proj], rtol=1e-5, atol=1e-6)
        if block.has_bias:
            torch.testing.assert_close(bias.double(), expected[f"{proj}_bias"], rtol=1e-5, atol=1e-6)


def test_aligned_fusion_of_aligned_experts_is_plain_fisher():
    model = build("qwen3_moe")
    block = get_source(model).blocks[0]
    plant(block, [raw(block, 0)] * block.num_experts)  # identical experts: the identity alignment is optimal
    importance = handmade_importance(model, [0.2, 0.5, 0.1, 0.2])
    aligned, plain = fuse_block(block, importance, "fisher_aligned"), fuse_block(block, importance, "fisher")
    for proj in plain:
        torch.testing.assert_close(aligned[proj][0], plain[proj][0], rtol=1e-6, atol=1e-7)


# -- concat ------------------------------------------------------------------------------------------

def expected_weights(importance, block, top_k: int) -> list[float]:
    """m_i = routing_mass[l, i] / num_tokens, num_tokens from the calibration shape (and routed / top_k)."""
    row = importance.moe_layers.index(block.layer_idx)
    tokens = CALIBRATION.numel()
    assert float(importance.routed[row].sum()) == tokens * top_k
    return [float(importance.routing_mass[row, i]) / tokens for i in range(block.num_experts)]


def as_dict(fused) -> dict[str, torch.Tensor]:
    out = {}
    for proj, (weight, bias) in fused.items():
        out[proj] = weight.double()
        if bias is not None:
            out[f"{proj}_bias"] = bias.double()
    return out


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_concat_at_full_width_is_the_expected_routing_mixture(family):
    model, importance = calibrated(family)
    for block in get_source(model).blocks:
        mass = expected_weights(importance, block, top_k_of(model))
        experts = [raw(block, i) for i in range(block.num_experts)]
        size, hidden = experts[0]["up"].shape
        fused = fuse_block(block, importance, "concat")
        assert set(fused) == set(block.projection_names())
        assert all(w.dtype == torch.float32 for w, _ in fused.values())
        assert fused["up"][0].shape == (block.num_experts * size, hidden)
        assert fused["down"][0].shape == (hidden, block.num_experts * size)
        x = torch.randn(7, hidden, generator=torch.Generator().manual_seed(block.layer_idx), dtype=torch.float64)
        gating = gating_of(model, block)
        expected = 0
        for m, weights in zip(mass, experts):
            expected = expected + m * hand_ffn(x, weights, gating)
        got = hand_ffn(x, as_dict(fused), gating)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        # the weights themselves: rows and biases stacked expert-major, only the down blocks scaled
        for name, value in as_dict(fused).items():
            if name == "down":
                hand = torch.cat([m * e["down"] for m, e in zip(mass, experts)], dim=1)
            elif name == "down_bias":
                hand = sum(m * e["down_bias"] for m, e in zip(mass, experts))
            else:
                hand = torch.cat([e[name] for e in experts])
            torch.testing.assert_close(value, hand, rtol=1e-5, atol=1e-7)


def test_concat_with_every_expert_and_a_uniform_router_is_the_moe_block():
    model = tiny_moe("mixtral", num_experts_per_tok=4)
    block = get_source(model).blocks[0]
    with torch.no_grad():
        block.router_weight.zero_()  # equal logits: every routing weight is exactly 1/4
    importance = compute_expert_importance(model, CALIBRATION, show_progress=False)
    assert expected_weights(importance, block, 4) == pytest.approx([0.25] * 4, abs=1e-6)
    fused = as_dict(fuse_block(block, importance, "concat"))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moe_out = block.block(x).double()
    torch.testing.assert_close(hand_ffn(x.double(), fused, gating_of(model, block)), moe_out, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("family", "width"), [("mixtral", 1), ("mixtral", 5), ("mixtral", 30), ("mixtral", 95),
                                               ("mixtral", 96), ("gpt_oss", 17), ("nemotron_h", 40)])
def test_concat_width_keeps_the_top_scored_neurons_in_order(family, width):
    model, importance = calibrated(family)
    block = get_source(model).blocks[-1]
    row = importance.moe_layers.index(block.layer_idx)
    mass = expected_weights(importance, block, top_k_of(model))
    fisher = importance.fisher[row].tolist()
    experts = [raw(block, i) for i in range(block.num_experts)]
    scored = []  # (score, expert, neuron)
    for i, e in enumerate(experts):
        energies = []
        for j in range(e["up"].shape[0]):
            energy = float(e["up"][j].square().sum() + e["down"][:, j].square().sum())
            if "gate" in e:
                energy += float(e["gate"][j].square().sum())
            energies.append(energy)
        for j, energy in enumerate(energies):
            scored.append((fisher[i] / sum(fisher) * energy / sum(energies), i, j))
    kept = sorted(sorted(scored, key=lambda s: -s[0])[:width], key=lambda s: (s[1], s[2]))
    fused = as_dict(fuse_block(block, importance, "concat", width=width))
    assert fused["up"].shape[0] == width and fused["down"].shape[1] == width
    for name, value in fused.items():
        if name == "down":
            hand = torch.stack([mass[i] * experts[i]["down"][:, j] for _, i, j in kept], dim=1)
        elif name == "down_bias":  # every expert still contributes its (scaled) bias
            hand = sum(m * e["down_bias"] for m, e in zip(mass, experts))
        else:
            hand = torch.stack([experts[i][name][j] for _, i, j in kept])
        torch.testing.assert_close(value, hand, rtol=1e-5, atol=1e-7)


def test_concat_reads_top_k_from_the_block_or_the_call():
    model, importance = calibrated("module_list")
    block = get_source(model).blocks[0]
    default = fuse_block(block, importance, "concat")
    explicit = fuse_block(block, importance, "concat", top_k=2)
    torch.testing.assert_close(default["down"][0], explicit["down"][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="contradicts"):
        fuse_block(block, importance, "concat", top_k=3)
    del block.block.top_k  # nothing left to read it from
    try:
        with pytest.raises(ValueError, match="pass top_k"):
            fuse_block(block, importance, "concat")
        torch.testing.assert_close(fuse_block(block, importance, "concat", top_k=2)["down"][0], default["down"][0])
        for bad in (0, 5, 1.5, True):
            with pytest.raises(ValueError, match="top_k must be"):
                fuse_block(block, importance, "concat", top_k=bad)
    finally:
        block.block.top_k = 2


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_width_and_missing_statistics_are_named():
    model, importance = calibrated("mixtral")
    block = get_source(model).blocks[0]
    for bad in (97, 0, -3):
        with pytest.raises(ValueError, match=r"width must be in 1\.\.96"):
            fuse_block(block, importance, "concat", width=bad)
    for bad in (2.5, True, "24"):
        with pytest.raises(ValueError, match="width must be an int"):
            fuse_block(block, importance, "concat", width=bad)
    for fusion in ("fisher", "uniform", "fisher_aligned"):
        with pytest.raises(ValueError, match="width must be None or 24"):
            fuse_block(block, importance, fusion, width=48)
    torch.testing.assert_close(fuse_block(block, importance, "fisher", width=24)["up"][0],
                               fuse_block(block, importance, "fisher")["up"][0], rtol=0, atol=0)
    for missing in ("routing_mass", "routed"):
        stripped = ExpertImportance(**{**vars(importance), missing: None})
        with pytest.raises(ValueError, match="needs importance.routing_mass and importance.routed"):
            fuse_block(block, stripped, "concat")
    silent = ExpertImportance(**{**vars(importance), "routed": torch.zeros_like(importance.routed)})
    with pytest.raises(ValueError, match="no calibration token"):
        fuse_block(block, silent, "concat")


def test_zero_fisher_falls_back_to_uniform_scores_with_a_warning():
    model, importance = calibrated("mixtral")
    block = get_source(model).blocks[0]
    zero = ExpertImportance(**{**vars(importance), "fisher": torch.zeros_like(importance.fisher)})
    with pytest.warns(UserWarning, match="zero importance"):
        fused = fuse_block(block, zero, "concat", width=10)
    assert fused["up"][0].shape == (10, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned = fuse_block(block, zero, "fisher_aligned")  # reference: expert 0, uniform weights
    assert torch.isfinite(aligned["up"][0]).all()
