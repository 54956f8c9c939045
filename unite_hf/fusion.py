"""Expert fusion: one dense FFN per MoE layer, as an importance-weighted average of its experts.

Every strategy returns normalised fusion weights that sum to one over experts and is applied to each
projection (gate, up, down) and bias separately:

    W_l[proj] = sum_i  w[l, i] * W_{l,i}[proj]

===============  ==================================================  ===========================
strategy         weights                                             paper
===============  ==================================================  ===========================
``fisher``       ``F[l,i] / sum_j F[l,j]`` (exact per-sequence       Eq. 3 (default)
                 Fisher, one scalar per expert)
``uniform``      ``1 / E``                                           Eq. 1
``frequency``    share of routed tokens, ``freq[l,i]``               ablation
``fisher_diag``  elementwise ``F_diag[l,i] / sum_j F_diag[l,j]``     ablation (Fisher merging)
===============  ==================================================  ===========================

Where every expert of a layer has zero importance (for example none was routed a token), the
weights fall back to uniform, with a warning, rather than dividing by zero.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .importance import ExpertImportance
from .sources import MoEBlock

# statistic -> what has to be collected during calibration
STATISTICS: tuple[str, ...] = ("none", "fisher", "frequency", "fisher_diag")


@dataclass(frozen=True)
class FusionStrategy:
    name: str
    requires: str  # one of STATISTICS
    weights: Callable[[ExpertImportance, int, str, bool], torch.Tensor | None]
    description: str


FUSIONS: dict[str, FusionStrategy] = {}


def register_fusion(name: str, requires: str, description: str):
    """Decorator: ``fn(importance, layer, proj, bias) -> weights`` shaped ``(E, 1, 1)`` / ``(E, 1)`` for
    scalar strategies or like the stacked parameters for elementwise ones, summing to 1 over experts.
    """
    if requires not in STATISTICS:
        raise ValueError(f"requires must be one of {STATISTICS}")

    def decorator(fn):
        FUSIONS[name] = FusionStrategy(name, requires, fn, description)
        return fn

    return decorator


def get_fusion(name: str) -> FusionStrategy:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {sorted(FUSIONS)}")
    return FUSIONS[name]


def _normalise(scores: torch.Tensor, what: str) -> torch.Tensor:
    """Scores ``(E, ...)`` -> weights summing to one over experts (uniform where all are zero)."""
    scores = scores.double().clamp_min(0)
    total = scores.sum(0, keepdim=True)
    empty = total == 0
    if empty.any():
        warnings.warn(f"{what}: every expert has zero importance at {int(empty.sum())} position(s); using uniform weights there.")
    uniform = torch.full_like(scores, 1.0 / scores.shape[0])
    return torch.where(empty, uniform, scores / total.where(~empty, torch.ones_like(total)))


def _per_expert(values: torch.Tensor, bias: bool) -> torch.Tensor:
    return values[:, None] if bias else values[:, None, None]


@register_fusion("fisher", "fisher", "Fisher-weighted average (paper Eq. 3)")
def _fisher(importance: ExpertImportance, layer: int, proj: str, bias: bool) -> torch.Tensor:
    return _per_expert(_normalise(importance.fisher[importance.row(layer)], f"Fisher fusion, layer {layer}"), bias)


@register_fusion("uniform", "none", "plain average (paper Eq. 1)")
def _uniform(importance: ExpertImportance, layer: int, proj: str, bias: bool) -> torch.Tensor:
    num_experts = importance.fisher.shape[1]
    return _per_expert(torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64), bias)


@register_fusion("frequency", "frequency", "routing-frequency-weighted average")
def _frequency(importance: ExpertImportance, layer: int, proj: str, bias: bool) -> torch.Tensor:
    return _per_expert(_normalise(importance.frequency[importance.row(layer)], f"frequency fusion, layer {layer}"), bias)


@register_fusion("fisher_diag", "fisher_diag", "elementwise diagonal-Fisher-weighted average")
def _fisher_diag(importance: ExpertImportance, layer: int, proj: str, bias: bool) -> torch.Tensor:
    table = importance.fisher_diag_bias if bias else importance.fisher_diag
    if table is None:
        raise ValueError("fisher_diag fusion needs importance computed with diagonal=True")
    return _normalise(table[(layer, proj)], f"diagonal Fisher fusion, layer {layer} {proj}")


def fuse_block(
    block: MoEBlock, importance: ExpertImportance, fusion: str = "fisher"
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Fuse one MoE block: ``proj -> (fused_weight (out, in), fused_bias (out,) or None)``, float32.

    Experts are visited one at a time (float64 accumulators), so memory stays at one expert plus the
    fused result whatever the number of experts; for a checkpoint block
    (:class:`unite_hf.sources.checkpoint.CheckpointMoEBlock`) each expert is read from disk once.
    """
    strategy = get_fusion(fusion)
    projections = block.projection_names()
    weights = {proj: strategy.weights(importance, block.layer_idx, proj, False) for proj in projections}
    bias_weights = ({proj: strategy.weights(importance, block.layer_idx, proj, True) for proj in projections}
                    if block.has_bias else {})
    totals: dict[str, torch.Tensor] = {}
    bias_totals: dict[str, torch.Tensor] = {}
    for index in range(block.num_experts):
        expert = block.expert(index)
        for proj in projections:
            _accumulate(totals, proj, expert.projection(proj), weights[proj][index])
            if block.has_bias:
                _accumulate(bias_totals, proj, expert.bias(proj), bias_weights[proj][index])
    return {proj: (totals[proj].float(), bias_totals[proj].float() if proj in bias_totals else None)
            for proj in projections}


def _accumulate(totals: dict[str, torch.Tensor], proj: str, matrix: torch.Tensor, weight: torch.Tensor) -> None:
    if proj not in totals:
        totals[proj] = torch.zeros(matrix.shape, dtype=torch.float64, device=matrix.device)
    totals[proj] += weight.to(totals[proj].device) * matrix.detach().double()
