"""Helpers every extraction method shares: checks before any expensive step, the source's
provenance, and the Tucker-shaped gene that UNITE and XPERT both build."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..gene import GeneConfig, UniteGene
from ..importance import ExpertImportance


def check_finite_weights(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer holding NaN or Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = "NaN" if torch.isnan(tensor).any() else "Inf"
            raise ValueError(f"source weight {name!r} contains {bad}; refusing to extract a gene from it.")


def check_on_device(model: nn.Module) -> None:
    """Raise ``ValueError`` when weights sit on the meta device with nothing to load them (a model built
    under ``init_empty_weights`` or from a config on ``meta``): it would fail inside the forward pass,
    mid-calibration. Weights offloaded by accelerate (a ``_hf_hook`` on their module) are fine."""
    for module_name, module in model.named_modules():
        if hasattr(module, "_hf_hook"):
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.device.type == "meta":
                where = f"{module_name}.{name}" if module_name else name
                raise ValueError(f"source weight {where!r} is on the meta device (no data); load the model with its "
                                 "weights (from_pretrained without init_empty_weights) before extracting")


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Raise ``ValueError`` when ``seq_len`` exceeds the model's ``max_position_embeddings``."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={limit}; choose a "
                         f"seq_len of at most {limit}")


def source_provenance(model: nn.Module, source_id: str | None, source_revision: str | None,
                       loaded_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Source id, resolved commit sha, license, model type and config of the source.

    ``loaded_from`` (default: the model's ``name_or_path``) is where the weights came from; the sha
    and license are resolved from it (Hub cache snapshot, local card, or Hub model info) by
    :func:`unite_hf.provenance.resolve_source`. The Hub is only asked about the id the model was
    loaded from, never about a name given for the record only."""
    from ..provenance import resolve_source

    config = getattr(model, "config", None)
    loaded_from = str(loaded_from or getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or "")
    commit = getattr(config, "_commit_hash", None)  # transformers 4 configs carry it
    resolved = resolve_source(loaded_from or source_id, source_revision or commit,
                              query_hub=not source_id or source_id == loaded_from)
    return {
        "source_id": source_id or resolved.repo_id or loaded_from or None,
        "source_revision": resolved.revision,
        "source_license": resolved.license,
        "source_model_type": getattr(config, "model_type", None),
        "source_config": config.to_dict() if hasattr(config, "to_dict") else {},
    }


def make_gene(source, provenance: dict[str, Any], decompositions, fused_biases,
              importance: ExpertImportance | torch.Tensor, source_weights: dict[str, torch.Tensor],
              gene_class: type[UniteGene] = UniteGene, gene_kwargs: dict[str, Any] | None = None,
              **method: Any) -> UniteGene:
    """A Tucker-shaped gene of ``source``. ``importance``: the calibration's statistics (Fisher and routing
    frequency), or the routing frequency alone (``(len(moe_layers), E)``) for a method that computes no Fisher."""
    first = source.blocks[0]
    meta_first = getattr(first, "meta_block", first)
    expert = meta_first.expert(0)
    projections = first.projection_names()
    config = GeneConfig(
        **provenance,
        source_layout=meta_first.layout,
        num_layers=source.num_layers,
        moe_layers=source.moe_layers,
        dense_layers=source.dense_layers,
        num_experts=source.num_experts,
        hidden_size=expert.down.shape[0],
        expert_intermediate_size=decompositions["down"].shape[2],  # the fused width (concat may widen it)
        projections=list(projections),
        has_bias=first.has_bias,
        custom_gating=meta_first.custom_gating,  # the layout's to say (False unless it overrides act(gate) * up)
        shared_experts=[name for name, _ in first.shared_experts],
        ranks={proj: list(dec.ranks) for proj, dec in decompositions.items()},
        relative_error={proj: dec.relative_error for proj, dec in decompositions.items()},
        retained_energy={proj: dec.retained_energy() for proj, dec in decompositions.items()},
        **method,
    )
    if isinstance(importance, torch.Tensor):  # routing frequency only: no Fisher
        gene = gene_class(config, decompositions, None, importance.clone(), source_weights, fused_biases,
                          **(gene_kwargs or {}))
        return gene
    gene = gene_class(config, decompositions, importance.fisher.clone(), importance.frequency.clone(),
                      source_weights, fused_biases, **(gene_kwargs or {}))
    if importance.routed is not None and importance.routing_mass is not None:  # concat fusion re-fuses from these
        gene.routing = {"routed": importance.routed.clone(), "routing_mass": importance.routing_mass.clone()}
    return gene
