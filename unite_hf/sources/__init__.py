"""Source adapters: read any transformers MoE causal LM through one interface.

>>> source = get_source(model)
>>> source.moe_layers            # [1, 2, 3] for DeepSeek-V3 with first_k_dense_replace=1
>>> block = source.block(1)
>>> block.expert(0).gate         # (I, H) view into the model's parameters
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import torch
from torch import nn

from .base import (
    LAYOUTS,
    PROJECTIONS,
    DiskKeys,
    ExpertProbe,
    ExpertWeights,
    MoEBlock,
    UnsupportedSourceError,
    register_layout,
)
from .fused import FusedExpertsBlock
from .module_list import ModuleListExpertsBlock
from ..model_structure import LAYER_LIST_PATHS, ROUTER_ATTRS, find_layer_list, moe_slot, router_attr

# Every other module of this package is a layout that registers itself on import: a new layout is one new
# file here, imported (and so tried by get_source) without an edit anywhere else.
_NOT_LAYOUTS = {"base", "checkpoint", "fused", "module_list"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_LAYOUTS and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LAYOUTS", "PROJECTIONS", "DiskKeys", "ExpertProbe", "ExpertWeights", "FusedExpertsBlock", "MoEBlock", "MoESource",
    "ModuleListExpertsBlock", "UnsupportedSourceError", "find_decoder_layers", "get_source", "register_layout",
]

# Where dense decoder layers usually keep their FFN (named in errors), and where MoE blocks keep
# their router and shared experts.
FFN_ATTRS: tuple[str, ...] = ("mlp", "block_sparse_moe", "feed_forward", "moe", "ffn")


@dataclass
class MoESource:
    """Everything the extractor reads from a source model."""

    model: nn.Module
    layers_path: str
    num_layers: int
    blocks: list[MoEBlock]
    dense_layers: list[int] = field(default_factory=list)

    @property
    def moe_layers(self) -> list[int]:
        """Source layer indices that hold experts, in order."""
        return [block.layer_idx for block in self.blocks]

    @property
    def layout(self) -> str:
        return self.blocks[0].layout

    @property
    def num_experts(self) -> int:
        return self.blocks[0].num_experts

    def block(self, layer_idx: int) -> MoEBlock:
        for block in self.blocks:
            if block.layer_idx == layer_idx:
                return block
        raise KeyError(f"layer {layer_idx} holds no experts; MoE layers are {self.moe_layers}")

    def routed_prefixes(self) -> tuple[str, ...]:
        return tuple(prefix for block in self.blocks for prefix in block.routed_prefixes())

    def non_expert_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights UNITE copies as they are: embeddings, attention, norms, shared experts, dense
        layers and an untied lm_head; everything except routed experts and routers."""
        prefixes = self.routed_prefixes()
        tied = _tied_parameter_names(self.model)
        return {
            name: tensor
            for name, tensor in self.model.state_dict().items()
            if not name.startswith(prefixes) and name not in tied
        }


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Names that alias another parameter (a tied lm_head): storing them twice would be waste."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = find_layer_list(model)
    if found is not None:
        return found
    raise UnsupportedSourceError(
        f"{type(model).__name__} has no decoder layer list at any of {LAYER_LIST_PATHS}; "
        "pass a causal LM (e.g. from AutoModelForCausalLM)."
    )


def _find_attr(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if isinstance(getattr(module, name, None), nn.Module)), None)


def _read_block(layer_idx: int, name: str, block: nn.Module) -> MoEBlock:
    experts = block.experts
    layout = next((cls for cls in LAYOUTS.values() if cls.matches(experts)), None)
    if layout is None:
        raise UnsupportedSourceError(
            f"{name}.experts ({type(experts).__name__}) has an expert layout unite_hf cannot read; "
            f"known layouts: {sorted(LAYOUTS)}. Register one with unite_hf.sources.register_layout."
        )
    router = router_attr(block)
    if router is None:
        raise UnsupportedSourceError(f"{name} ({type(block).__name__}) has experts but no router at {ROUTER_ATTRS}.")
    moe_block = layout(layer_idx, name, block, "experts", router, layout.find_shared_experts(block))
    router_weight = moe_block.router_weight
    if router_weight.shape[0] != moe_block.num_experts:
        raise UnsupportedSourceError(
            f"{name}.{router_attr}: router weight {tuple(router_weight.shape)} does not score "
            f"{moe_block.num_experts} experts."
        )
    return moe_block


def get_source(model: nn.Module) -> MoESource:
    """Read a MoE causal LM's layers. Raises :class:`UnsupportedSourceError` for dense models or
    expert layouts no registered adapter can read, naming the offending module."""
    layers_path, layers = find_decoder_layers(model)
    blocks: list[MoEBlock] = []
    dense: list[int] = []
    for idx, layer in enumerate(layers):
        moe_attr = moe_slot(layer)  # whichever child holds experts (mlp, block_sparse_moe, NemotronH's mixer)
        if moe_attr is None:
            dense.append(idx)
        else:
            blocks.append(_read_block(idx, f"{layers_path}.{idx}.{moe_attr}", getattr(layer, moe_attr)))
    if not blocks:
        ffn_attr = _find_attr(layers[0], FFN_ATTRS) or next(iter(dict(layers[0].named_children())), "?")
        raise UnsupportedSourceError(
            f"{type(model).__name__} is a dense model: none of its {len(layers)} layers has experts "
            f"(e.g. {layers_path}.0.{ffn_attr} is {type(getattr(layers[0], ffn_attr, None)).__name__}). "
            "UNITE extracts from Mixture-of-Experts models."
        )
    _check_consistent(blocks)
    return MoESource(model=model, layers_path=layers_path, num_layers=len(layers), blocks=blocks, dense_layers=dense)


def _check_consistent(blocks: list[MoEBlock]) -> None:
    """Fused experts are stacked across layers, so every MoE block must agree on shapes and layout."""
    reference = blocks[0]
    ref_shapes = {p: tuple(w.shape) for p, w in vars(reference.expert(0)).items() if w is not None}
    for block in blocks[1:]:
        shapes = {p: tuple(w.shape) for p, w in vars(block.expert(0)).items() if w is not None}
        if type(block) is not type(reference) or block.num_experts != reference.num_experts or shapes != ref_shapes:
            raise UnsupportedSourceError(
                f"{block.name} ({block.num_experts} experts, {shapes}) differs from {reference.name} "
                f"({reference.num_experts} experts, {ref_shapes}); UNITE needs identical MoE blocks to stack."
            )
