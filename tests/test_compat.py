"""The private transformers APIs behind unite_hf.compat, checked against the installed transformers:
an upgrade that removes or changes one fails here, loudly, before it fails inside an extraction."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import tiny_config, tiny_gpt_oss, tiny_moe
from tolerances import assert_close_eps

from unite_hf import compat
from unite_hf.sources import get_source


def _experts(model):
    return get_source(model).blocks[0].experts


def test_supported_range_is_declared_and_installed():
    import tomllib
    from pathlib import Path

    from packaging.version import Version

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    spec = next(r for r in project["dependencies"] if r.startswith("transformers"))
    assert spec.replace(" ", "") == f"transformers>={compat.MIN_TRANSFORMERS.removesuffix('.0')},<6"
    assert Version(compat.MIN_TRANSFORMERS) <= Version(transformers.__version__) < Version("6")


def test_gating_hooks():
    mixtral, gpt_oss = _experts(tiny_moe("mixtral")), _experts(tiny_gpt_oss())
    assert not compat.has_custom_gating(mixtral) and compat.has_custom_gating(gpt_oss)
    gate_up = torch.randn(5, mixtral.gate_up_proj.shape[1])  # gate and up concatenated, as Mixtral stores them
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(compat.apply_gate(mixtral, gate_up), mixtral.act_fn(gate) * up)


def test_experts_implementation_round_trip():
    model = tiny_moe("mixtral")
    config = _experts(model).config
    before = compat.get_experts_implementation(config)
    compat.set_experts_implementation(config, "eager")
    assert compat.get_experts_implementation(config) == "eager" == config._experts_implementation
    compat.set_experts_implementation(config, before)


def test_apply_renamings_maps_a_legacy_mixtral_key():
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(tiny_config("mixtral"))
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    renamed = compat.apply_renamings("model.layers.0.block_sparse_moe.gate.weight", renamings)
    assert renamed == "model.layers.0.mlp.gate.weight" and renamed in model.state_dict()


def test_grouped_mm_multiplies_each_group_by_its_expert():
    """``transformers.integrations.moe._grouped_mm`` (the grouped probe's forward and input gradient), against
    a loop of float64 products; an empty group, and rows past the last group left to the caller."""
    generator = torch.Generator().manual_seed(0)
    counts = [5, 0, 3, 8]
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    for d_in, d_out in [(16, 24), (10, 7)]:  # (10, 7): float32 rows not 16-byte aligned, the loop instead
        x = torch.randn(sum(counts), d_in, generator=generator)
        weight = torch.randn(len(counts), d_in, d_out, generator=generator)
        got = compat.grouped_mm(x, weight, torch.tensor(counts).cumsum(0).to(torch.int32))
        expected = torch.cat([x[a:b].double() @ weight[e].double() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
        magnitude = torch.cat([x[a:b].abs() @ weight[e].abs() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
        assert_close_eps(got, expected, k=d_in, scale=magnitude)  # d_in-term float32 sums of |x| |W|


def test_a_missing_api_is_a_clear_error(monkeypatch):
    import transformers.core_model_loading as core

    monkeypatch.delattr(core, "apply_renamings")
    with pytest.raises(compat.TransformersCompatError, match=r"apply_renamings is missing.*transformers >= 5\.21"):
        compat.apply_renamings("x", [])
    with pytest.raises(compat.TransformersCompatError, match="_experts_implementation is missing"):
        compat.get_experts_implementation(object())
    with pytest.raises(compat.TransformersCompatError, match="_apply_gate is missing"):
        compat.apply_gate(torch.nn.Linear(2, 2), torch.zeros(1, 2))
