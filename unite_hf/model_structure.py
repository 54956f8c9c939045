"""Where a decoder stack keeps its layers, its MoE blocks, their routers and their shared experts.

One place for the structure rules that both the extractor (:mod:`unite_hf.sources`) and the targets
(:mod:`unite_hf.modeling_unite`) apply. ``modeling_unite.py`` imports this module relatively, so it is
saved beside it as remote code and needs nothing but torch.
"""

from __future__ import annotations

from torch import nn

# where a model keeps its decoder layer list (a causal LM under model./transformer., a backbone directly)
LAYER_LIST_PATHS: tuple[str, ...] = ("model.layers", "layers", "model.decoder.layers", "decoder.layers",
                                     "transformer.h", "transformer.layers", "h")
ROUTER_ATTRS: tuple[str, ...] = ("gate", "router")


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(path, layers)`` of the first non-empty layer list at :data:`LAYER_LIST_PATHS`, else None."""
    for path in LAYER_LIST_PATHS:
        module: nn.Module | None = model
        for attr in path.split("."):
            module = getattr(module, attr, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    return None


def moe_slot(layer: nn.Module) -> str | None:
    """Name of the decoder layer's child that holds experts (``mlp``, ``block_sparse_moe``, ``mixer``, ...)."""
    return next((name for name, child in layer.named_children() if hasattr(child, "experts")), None)


def router_attr(block: nn.Module) -> str | None:
    """The MoE block's router child (``gate`` or ``router``)."""
    return next((name for name in ROUTER_ATTRS if isinstance(getattr(block, name, None), nn.Module)), None)


def shared_expert_children(block: nn.Module, names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """A MoE block's shared experts, found by structure rather than by name: every child besides the
    experts and the router that holds parameters. That is a dense MLP run on every token (Qwen2-MoE's
    ``shared_expert``, DeepSeek's ``shared_experts``, HunYuan's ``shared_mlp``) or the scalar gate that
    scales it (Qwen2-MoE's ``shared_expert_gate``, see :func:`is_shared_gate`).

    ``names``: the children recorded where the block was read (a gene records what its source's layout
    found, ``MoEBlock.find_shared_experts``, and a target's config carries it as ``shared_expert_names``):
    exactly those, in that order, whatever the rule would say. ``None`` (a target saved before names
    were recorded): by the rule."""
    if names is not None:
        missing = [name for name in names if not isinstance(getattr(block, name, None), nn.Module)]
        if missing:
            raise ValueError(f"{type(block).__name__} has no shared-expert child {missing} (recorded: {list(names)}); "
                             "the config does not describe this model's MoE blocks")
        return [(name, getattr(block, name)) for name in names]
    skip = {"experts", router_attr(block)}
    return [(name, child) for name, child in block.named_children()
            if name not in skip and next(child.parameters(), None) is not None]


def is_shared_gate(module: nn.Module) -> bool:
    """A shared expert's gate: a linear map to one output, applied as ``sigmoid(gate(x)) * shared(x)``."""
    return isinstance(module, nn.Linear) and module.out_features == 1


# An MLP's (gate, up, down) nn.Linear attribute names, one row per naming convention (None: no gate).
# One table for routed experts stored as modules, shared experts and dense MLPs alike.
MLP_LINEAR_NAMES: tuple[tuple[str | None, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),  # Mixtral v4: w1 the gate, w3 the up projection
    (None, "up_proj", "down_proj"),
    (None, "fc1", "fc2"),
)
MLP_ACTIVATION_ATTRS: tuple[str, ...] = ("act_fn", "act", "activation_fn")


def mlp_linear_names(mlp: nn.Module, gated_only: bool = False) -> dict[str, str] | None:
    """``proj -> attribute`` of the first row of :data:`MLP_LINEAR_NAMES` whose names are all
    ``nn.Linear`` children of ``mlp`` (``proj`` in gate, up, down; no gate for a non-gated row), else None."""
    for row in MLP_LINEAR_NAMES:
        if gated_only and row[0] is None:
            continue
        if all(name is None or isinstance(getattr(mlp, name, None), nn.Linear) for name in row):
            return {proj: name for proj, name in zip(("gate", "up", "down"), row) if name is not None}
    return None


def mlp_activation(mlp: nn.Module):
    """The MLP's activation callable (first of :data:`MLP_ACTIVATION_ATTRS`), else None."""
    return next((getattr(mlp, a) for a in MLP_ACTIVATION_ATTRS if callable(getattr(mlp, a, None))), None)
