"""Ranks per axis and parameter budgets for the fused FFN of a gene.

A projection's matrix has a *hidden* axis (the residual stream, ``d``) and a *neuron* axis (the fused
width ``w``): ``gate``/``up`` are ``(w, d)``, ``down`` is ``(d, w)``. A single int rank cuts both axes
alike, so ranks are given per axis here (``{"hidden": r_h, "neuron": r_n}``, optionally ``"layer"``)
and turned into each projection's ``(r_L, r_out, r_in)``.

A target layer's factorized FFN costs, per projection, ``d r_h + w r_n + r_h r_n`` parameters, where a
side at full rank costs no basis (targets fold it into the core). A *budget* is a fraction of the
routed experts' parameters (``E`` experts of width ``I``: ``E I d`` per projection and layer). The
allocation rule, :func:`allocate`, spends a budget dense-first: the full hidden rank, and the widest
fused FFN that fits (a fusion that keeps neurons side by side picks that many); a fusion of fixed width
``I`` gets the largest equal fraction of both axes that fits. Why dense-first: on calibration data a
narrower dense FFN fits the routed output better than a wider one compressed to the same size
(``benchmarks/RETENTION.md`` has the comparison).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

AXES = ("layer", "hidden", "neuron")


@dataclass(frozen=True)
class Allocation:
    """What a budget buys: the fused width and the per-axis ranks (``None``: every layer kept)."""

    fused_width: int
    hidden_rank: int
    neuron_rank: int
    parameter_fraction: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def check_axis_ranks(rank: Mapping) -> dict[str, int]:
    """``{"hidden": r_h, "neuron": r_n[, "layer": r_L]}`` with positive ints, else ``ValueError``."""
    unknown = sorted(set(rank) - set(AXES))
    if unknown or not {"hidden", "neuron"} <= set(rank):
        raise ValueError(f"per-axis ranks take 'hidden' and 'neuron' (and optionally 'layer'), got {dict(rank)!r}")
    for axis, value in rank.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"the {axis} rank must be a positive int, got {value!r}")
    return dict(rank)


def projection_ranks(rank: Mapping, projection: str, num_layers: int) -> tuple[int, int, int]:
    """A projection's ``(r_L, r_out, r_in)`` from per-axis ranks (``down``'s output is the hidden axis)."""
    rank = check_axis_ranks(rank)
    layer = rank.get("layer", num_layers)
    if projection == "down":
        return (layer, rank["hidden"], rank["neuron"])
    return (layer, rank["neuron"], rank["hidden"])


def ffn_parameters(hidden: int, width: int, hidden_rank: int, neuron_rank: int, num_projections: int) -> int:
    """Parameters of one target layer's factorized FFN (no biases): per projection
    ``d r_h [r_h < d] + w r_n [r_n < w] + r_h r_n`` (a full-rank side is folded into the core)."""
    per = hidden * hidden_rank * (hidden_rank < hidden) + width * neuron_rank * (neuron_rank < width) \
        + hidden_rank * neuron_rank
    return num_projections * per


def routed_parameters(hidden: int, num_experts: int, intermediate: int, num_projections: int) -> int:
    """Parameters of one layer's routed experts (no biases)."""
    return num_projections * num_experts * intermediate * hidden


def allocate(budget: float, *, hidden: int, num_experts: int, intermediate: int, num_projections: int,
             variable_width: bool) -> Allocation:
    """The dense-first allocation of ``budget`` (a fraction of the routed parameters, in (0, 1]); see the
    module docstring. Raises ``ValueError`` when not even a rank-1 FFN fits."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1] of the routed experts' parameters, got {budget!r}")
    routed = routed_parameters(hidden, num_experts, intermediate, num_projections)
    allowed = budget * routed

    def fraction(width: int, r_h: int, r_n: int) -> float:
        return ffn_parameters(hidden, width, r_h, r_n, num_projections) / routed

    if variable_width:
        width = min(num_experts * intermediate, math.floor(allowed / (num_projections * hidden)))
        if width >= 1:
            return Allocation(width, hidden, width, fraction(width, hidden, width))
        width = 1
    else:
        width = intermediate
    # the largest r = ceil(s d), ceil(s w) with one s that fits (fixed width, or a budget below one neuron)
    best = None
    low, high = 1, max(hidden, width)
    while low <= high:
        step = (low + high) // 2
        r_h, r_n = min(hidden, max(1, round(step * hidden / max(hidden, width)))), \
            min(width, max(1, round(step * width / max(hidden, width))))
        if fraction(width, r_h, r_n) <= budget:
            best, low = (r_h, r_n), step + 1
        else:
            high = step - 1
    if best is None:
        raise ValueError(f"budget {budget} of the routed experts' parameters ({routed} per layer) buys no FFN")
    return Allocation(width, best[0], best[1], fraction(width, *best))
