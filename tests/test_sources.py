"""Source adapters: every family's experts are read as (out, in) views that reproduce the experts' own forward."""

import pytest
import torch
from torch import nn
from tiny_models import FAMILIES, tiny_dense, tiny_gpt_oss, tiny_moe, tiny_module_list_moe

from unite_hf.sources import FusedExpertsBlock, UnsupportedSourceError, get_source

EXPECTED = {  # family -> (moe layers, dense layers, shared expert attributes)
    "mixtral": ([0, 1, 2], [], []),
    "qwen2_moe": ([0, 1, 2], [], ["shared_expert", "shared_expert_gate"]),
    "qwen3_moe": ([0, 1, 2], [], []),
    "olmoe": ([0, 1, 2], [], []),
    "deepseek_v3": ([1, 2], [0], ["shared_experts"]),
    "granitemoe": ([0, 1, 2], [], []),
}


def _expert_forward_by_hand(block, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's output computed only from the adapter's views (and the family's own gating)."""
    w = block.expert(expert)
    up = x @ w.up.T + (w.up_bias if w.up_bias is not None else 0)
    if w.gate is None:
        h = block.activation(up)
    else:
        gate = x @ w.gate.T + (w.gate_bias if w.gate_bias is not None else 0)
        if isinstance(block, FusedExpertsBlock):
            # rebuild the stored gate_up layout so the family's own _apply_gate does the gating
            gate_up = torch.cat([gate, up], -1) if block.is_concatenated else torch.stack([gate, up], -1).flatten(-2)
            h = block.experts._apply_gate(gate_up)
        else:
            h = block.activation(gate) * up
    return h @ w.down.T + (w.down_bias if w.down_bias is not None else 0)


def _expert_forward_by_module(block, expert: int, x: torch.Tensor) -> torch.Tensor:
    if isinstance(block, FusedExpertsBlock):
        index = torch.full((x.shape[0], 1), expert)
        return block.experts(x, index, torch.ones(x.shape[0], 1))
    return block.experts[expert](x)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_families_are_read_without_family_code(family):
    model = tiny_moe(family)
    source = get_source(model)
    moe_layers, dense_layers, shared = EXPECTED[family]
    assert source.moe_layers == moe_layers
    assert source.dense_layers == dense_layers
    assert source.layout == "fused_3d"
    assert [name for name, _ in source.blocks[0].shared_experts] == shared
    x = torch.randn(5, model.config.hidden_size)
    for block in source.blocks:
        assert block.num_experts == 4
        assert block.router_weight.shape == (4, model.config.hidden_size)
        for e in range(block.num_experts):
            torch.testing.assert_close(_expert_forward_by_hand(block, e, x), _expert_forward_by_module(block, e, x),
                                       rtol=1e-5, atol=1e-6)


def test_views_share_storage_with_the_model():
    model = tiny_moe("mixtral")
    block = get_source(model).blocks[1]
    weights = block.expert(2)
    param = block.experts.gate_up_proj
    for view in (weights.gate, weights.up):
        assert view.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    with torch.no_grad():
        weights.up[0, 0] = 123.0
    assert param[2, model.config.intermediate_size, 0] == 123.0  # up is the second half of gate_up_proj


def test_transposed_interleaved_biased_layout_gpt_oss():
    model = tiny_gpt_oss()
    block = get_source(model).blocks[0]
    assert (block.is_transposed, block.is_concatenated, block.has_bias, block.custom_gating) == (True, False, True, True)
    w = block.expert(1)
    # hand indexing of the stored (E, H, 2I) interleaved tensor
    torch.testing.assert_close(w.gate, block.experts.gate_up_proj[1][:, 0::2].T)
    torch.testing.assert_close(w.up, block.experts.gate_up_proj[1][:, 1::2].T)
    torch.testing.assert_close(w.down, block.experts.down_proj[1].T)
    torch.testing.assert_close(w.up_bias, block.experts.gate_up_proj_bias[1][1::2])
    x = torch.randn(3, 32)
    for e in range(4):
        torch.testing.assert_close(_expert_forward_by_hand(block, e, x), _expert_forward_by_module(block, e, x))


@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")])
def test_module_list_experts(names):
    model = tiny_module_list_moe(names=names)
    source = get_source(model)
    assert source.layout == "module_list"
    assert source.moe_layers == [0, 1, 2]
    block = source.blocks[0]
    assert block.expert(1).gate is getattr(block.experts[1], names[0]).weight  # the parameter itself, no copy
    x = torch.randn(4, 32)
    torch.testing.assert_close(_expert_forward_by_hand(block, 1, x), _expert_forward_by_module(block, 1, x))


def test_non_expert_state_dict_excludes_only_routed_experts_and_routers():
    model = tiny_moe("deepseek_v3")
    kept = get_source(model).non_expert_state_dict()
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept
    assert "model.layers.0.mlp.gate_proj.weight" in kept  # the dense first layer
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in kept
    assert any(".self_attn." in k for k in kept)
    assert not any(".mlp.experts." in k or ".mlp.gate." in k for k in kept)
    tied = tiny_moe("mixtral", tie_word_embeddings=True)
    assert "lm_head.weight" not in get_source(tied).non_expert_state_dict()


def test_dense_model_is_refused_by_name():
    with pytest.raises(UnsupportedSourceError, match=r"dense model.*model\.layers\.0\.mlp is LlamaMLP"):
        get_source(tiny_dense())


def test_unknown_layout_is_refused_naming_the_module():
    model = tiny_module_list_moe()

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4))

    model.model.layers[1].mlp.experts = Odd()
    with pytest.raises(UnsupportedSourceError, match=r"model\.layers\.1\.mlp\.experts \(Odd\)"):
        get_source(model)
    model = tiny_module_list_moe()
    model.model.layers[2].mlp.experts[3] = nn.Identity()
    with pytest.raises(UnsupportedSourceError, match=r"model\.layers\.2\.mlp\.experts\.3 \(Identity\)"):
        get_source(model)


def test_3d_experts_without_decorator_flags_are_not_guessed():
    model = tiny_moe("mixtral")
    del model.model.layers[0].mlp.experts.is_transposed
    with pytest.raises(UnsupportedSourceError, match="lacks the `@use_experts_implementation` flags"):
        get_source(model)
