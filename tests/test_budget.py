"""Parameter budgets and per-axis ranks (unite_hf.decomposition.budget), checked by hand counts."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_moe

from unite_hf import UniteForCausalLM, extract_universal_knowledge
from unite_hf.decomposition.budget import allocate, projection_ranks
from unite_hf.methods.config import parse_rank
from unite_hf.methods.unite import UniteExtractionConfig

CALIBRATION = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))


def test_dense_first_allocation_by_hand():
    # native-like: d 256, 8 experts of 256, 3 projections; 25% of 3 * 8 * 256 * 256 per layer buys a dense
    # FFN of 512 neurons (3 * 256 * 512), no basis on either side
    a = allocate(0.25, hidden=256, num_experts=8, intermediate=256, num_projections=3, variable_width=True)
    assert (a.fused_width, a.hidden_rank, a.neuron_rank, a.parameter_fraction) == (512, 256, 512, 0.25)
    a = allocate(0.1, hidden=256, num_experts=8, intermediate=256, num_projections=3, variable_width=True)
    assert (a.fused_width, a.hidden_rank, a.neuron_rank) == (204, 256, 204)  # floor(0.1 * 2048)
    # fixed width 256 at 5%: one fraction s of both axes, bases on both sides; 3 * (256 r + 256 r + r^2) <= 0.05 * routed
    a = allocate(0.05, hidden=256, num_experts=8, intermediate=256, num_projections=3, variable_width=False)
    assert a.fused_width == 256 and a.hidden_rank == a.neuron_rank
    r = a.hidden_rank
    routed = 3 * 8 * 256 * 256
    assert 3 * (512 * r + r * r) <= 0.05 * routed < 3 * (512 * (r + 1) + (r + 1) ** 2)
    with pytest.raises(ValueError, match="budget must be a fraction"):
        allocate(0.0, hidden=4, num_experts=2, intermediate=4, num_projections=3, variable_width=True)


def test_per_axis_ranks_map_to_each_projection():
    assert projection_ranks({"hidden": 5, "neuron": 7}, "gate", 3) == (3, 7, 5)
    assert projection_ranks({"hidden": 5, "neuron": 7, "layer": 2}, "down", 3) == (2, 5, 7)
    assert parse_rank("hidden=5,neuron=7") == {"hidden": 5, "neuron": 7}
    with pytest.raises(ValueError, match="per-axis rank"):
        UniteExtractionConfig(rank={"hidden": 5})
    with pytest.raises(ValueError, match="give the budget or them"):
        UniteExtractionConfig(budget=0.25, fused_width=8, fusion="concat")
    with pytest.raises(ValueError, match="budget must be a fraction"):
        UniteExtractionConfig(budget=1.5)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_a_budgeted_gene_grows_targets_within_the_budget(budget):
    model = tiny_moe("mixtral").float()  # d 32, 4 experts of 24, 3 MoE layers
    gene = extract_universal_knowledge(model, calibration=CALIBRATION, fusion="concat", decomposition="tucker_hidden",
                                       budget=budget, show_progress=False)
    allocation = gene.config.method_config["allocation"]
    width = int(budget * 4 * 24)
    assert allocation == {"fused_width": width, "hidden_rank": 32, "neuron_rank": width,
                          "parameter_fraction": 3 * 32 * width / (3 * 4 * 24 * 32)}
    assert gene.ranks["down"][1:] == (32, width) and gene.ranks["gate"][1:] == (width, 32)
    target = UniteForCausalLM.from_gene(gene, core_init="tucker")
    breakdown = target.unite_parameter_breakdown()
    ffn = breakdown.get("bases", 0) + breakdown["cores"]
    assert ffn == 3 * 3 * 32 * width  # 3 layers x 3 projections, dense: no bases at full rank
    assert ffn <= budget * 3 * 3 * 4 * 24 * 32
    # per-axis ranks given directly take the same path
    direct = extract_universal_knowledge(model, calibration=CALIBRATION, fusion="concat", decomposition="tucker_hidden",
                                         fused_width=width, rank={"hidden": 32, "neuron": width}, show_progress=False)
    assert direct.ranks == gene.ranks
