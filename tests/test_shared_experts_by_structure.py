"""Shared experts are found by structure (a parameterised child of the MoE block besides the experts and
the router), so a family that names them differently (HunYuan-MoE's ``shared_mlp``) grows targets too."""

import pytest
import torch
import transformers

from tiny_models import COMMON
from unite_hf import UniteForCausalLM, extract_universal_knowledge, get_source
from unite_hf.model_structure import is_shared_gate, shared_expert_children

HUNYUAN = dict(intermediate_size=24, num_experts=4, moe_topk=2, head_dim=8)


def _hunyuan():
    if not hasattr(transformers, "HunYuanMoEV1ForCausalLM"):
        pytest.skip("this transformers has no HunYuan-MoE")
    torch.manual_seed(0)
    return transformers.HunYuanMoEV1ForCausalLM(transformers.HunYuanMoEV1Config(**{**COMMON, **HUNYUAN})).eval()


def test_structure_rules_on_hand_built_blocks():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Linear(4, 4)
            self.gate = torch.nn.Linear(4, 3)               # the router
            self.extra_mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
            self.scale = torch.nn.Linear(4, 1)              # a gate on the shared branch
            self.act = torch.nn.SiLU()                      # no parameters: not an expert

    found = shared_expert_children(Block())
    assert [name for name, _ in found] == ["extra_mlp", "scale"]
    assert [is_shared_gate(m) for _, m in found] == [False, True]


@pytest.mark.parametrize("mode", ["keep", "drop", "fuse"])
def test_hunyuan_shared_mlp_is_kept_dropped_or_fused(mode):
    model = _hunyuan()
    source = get_source(model)
    assert [n for n, _ in source.blocks[0].shared_experts] == ["shared_mlp"]
    ids = torch.randint(0, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    gene = extract_universal_knowledge(model, calibration=ids, rank=8, show_progress=False)
    target = UniteForCausalLM.from_gene(gene, rank=8, shared_experts=mode).eval()
    ffn = target.model.ffn(0)
    hidden = torch.randn(2, 5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(1))
    routed = ffn.routed(hidden)
    source_shared = model.model.layers[0].mlp.shared_mlp
    expected = {"keep": routed + source_shared(hidden), "drop": routed}
    if mode in expected:
        torch.testing.assert_close(ffn(hidden), expected[mode])
        assert hasattr(ffn, "shared_mlp") == (mode == "keep")
    else:  # fused onto the gene's bases: the shared MLP seen through the rank-8 bases, by hand
        def projected(proj, x):
            bases = ffn._bases(proj)
            return ((x @ bases.in_basis) @ ffn.shared_cores[proj].T) @ bases.out_basis.T
        act = source_shared.act_fn
        by_hand = projected("down", act(projected("gate", hidden)) * projected("up", hidden))
        torch.testing.assert_close(ffn(hidden), routed + by_hand)
        # and the cores are the shared weights in the bases' coordinates
        bases = ffn._bases("up")
        torch.testing.assert_close(ffn.shared_cores["up"],
                                   bases.out_basis.T @ source_shared.up_proj.weight @ bases.in_basis)


def test_shared_linear_names_is_a_deprecated_alias():
    import unite_hf.targets as targets

    with pytest.warns(FutureWarning, match="SHARED_LINEAR_NAMES is deprecated"):
        names = targets.SHARED_LINEAR_NAMES
    assert names == {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
