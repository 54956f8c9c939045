"""Expert fusion: one dense FFN per MoE layer, from its experts.

Most strategies are importance-weighted averages: normalised fusion weights that sum to one over
experts, applied to each projection (gate, up, down) and bias separately:

    W_l[proj] = sum_i  w[l, i] * W_{l,i}[proj]

==================  ==================================================  ===========================
strategy            weights                                             paper
==================  ==================================================  ===========================
``fisher``          ``F[l,i] / sum_j F[l,j]`` (exact per-sequence       Eq. 3 (default)
                    Fisher, one scalar per expert)
``uniform``         ``1 / E``                                           Eq. 1
``frequency``       share of routed tokens, ``freq[l,i]``               ablation
``fisher_diag``     elementwise ``F_diag[l,i] / sum_j F_diag[l,j]``     ablation (Fisher merging)
``fisher_aligned``  ``fisher``, after aligning every expert's neurons   MC-SMoE (Li et al., 2024)
                    to the reference expert (below)
``concat``          no average: all experts side by side (below)        ablation
==================  ==================================================  ===========================

Where every expert of a layer has zero importance (for example none was routed a token), the
weights fall back to uniform, with a warning, rather than dividing by zero.

``fisher_aligned``: averaging experts whose intermediate neurons do not share a basis averages
unrelated neurons. Permuting an expert's intermediate neurons (gate/up rows, down columns and
gate/up biases together) leaves the expert's function unchanged, so before the ``fisher`` average
every expert is permuted to match the reference expert, the one with the highest Fisher in the
layer. The permutation comes from WEIGHT MATCHING: the similarity of neuron j of expert i and neuron
k of the reference is the dot product of their per-neuron weight vectors ``[gate row j; up row j;
down column j]`` (plus the gate/up biases of the neuron where present; ``[up row j; down column j]``
for non-gated experts), and ``scipy.optimize.linear_sum_assignment`` picks the permutation with the
largest total similarity. Weight matching was chosen over activation matching because it needs no
extra calibration pass and works from a checkpoint stream (one expert at a time next to the
reference); matching by activation correlation would need every expert's per-neuron activations on
calibration tokens, which the Fisher pass does not record. The down bias is not permuted (it is per
output feature, not per neuron). The assignment costs ``O(I^3)`` per expert.

``concat`` keeps every neuron: the fused FFN has width ``E * I``, the gate/up rows (and gate/up
biases) of all experts stacked expert-major, the down columns likewise, and each expert's down block
scaled by its EXPECTED ROUTING WEIGHT per token on the calibration tokens,

    m[l, i] = routing_mass[l, i] / num_tokens[l],   num_tokens[l] = sum_i routed[l, i] / top_k,

where ``routing_mass`` sums the routing weights expert i's output was scaled by. The MoE output is
``sum_i w_i(x) E_i(x)``; replacing each routing weight ``w_i(x)`` (zero where expert i is not
chosen) by its calibration mean ``m_i``, a constant independent of x, gives ``sum_i m_i E_i(x)``:
exactly this FFN, with down bias ``sum_i m_i b_down_i``. That replacement is the approximation; it
is exact where the routing weights are constant (``top_k = E`` with a uniform router). With
``width < E * I`` only the ``width`` highest-scoring neurons are kept, in their original
(expert-major) order: the score of neuron j of expert i is
``F[l,i] / sum_e F[l,e] * (||gate_j||^2 + ||up_j||^2 + ||down_j||^2) / sum_k (||gate_k||^2 + ...)``
over expert i's neurons k (weights only, before the ``m_i`` scaling). This spreads each expert's
Fisher over its neurons by weight energy, an approximation of a per-neuron Fisher; ties go to the
earlier neuron.

Strategies come in two kinds, both in :data:`FUSIONS`: per-expert weights
(:func:`register_fusion`), averaged by :func:`fuse_block`, and whole-block functions
(:func:`register_block_fusion`) that build the fused FFN themselves and may change its width.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .importance import ExpertImportance
from .sources import ExpertWeights, MoEBlock

# statistic -> what has to be collected during calibration
STATISTICS: tuple[str, ...] = ("none", "fisher", "frequency", "fisher_diag")

# proj -> (fused weight (out, in), fused bias (out,) or None)
FusedBlock = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def fused_projection(fused: FusedBlock, proj: str, x: torch.Tensor) -> torch.Tensor:
    """``x W^T (+ b)`` with a fused block's ``proj`` matrix, in ``x``'s dtype."""
    weight, bias = fused[proj]
    out = x @ weight.to(x.dtype).T
    return out if bias is None else out + bias.to(x.dtype)


def fused_intermediate(fused: FusedBlock, activation: Callable[[torch.Tensor], torch.Tensor],
                       x: torch.Tensor) -> torch.Tensor:
    """What a fused block's ``down`` receives: ``act(gate x) * up x`` (or ``act(up x)`` without a gate)."""
    if "gate" in fused:
        return activation(fused_projection(fused, "gate", x)) * fused_projection(fused, "up", x)
    return activation(fused_projection(fused, "up", x))
WeightsFn = Callable[[ExpertImportance, int, str, bool], torch.Tensor | None]


@dataclass(frozen=True)
class FusionOptions:
    """What a whole-block strategy may need beyond the block and the importance."""

    width: int | None = None  # fused intermediate width; None: the strategy's natural width
    top_k: int | None = None  # experts per token; None: read from the block when needed


BlockFusionFn = Callable[[MoEBlock, ExpertImportance, FusionOptions], FusedBlock]


@dataclass(frozen=True)
class FusionStrategy:
    name: str
    requires: str  # one of STATISTICS
    weights: WeightsFn | None  # per-expert averaging weights; None for whole-block strategies
    description: str
    fuse: BlockFusionFn | None = None  # whole-block strategies; None: average with ``weights``
    variable_width: bool = False  # whether ``width`` may differ from the experts' intermediate size


FUSIONS: dict[str, FusionStrategy] = {}


def _registrar(strategy: Callable[[Callable], FusionStrategy], requires: str):
    """The decorator that registers ``strategy(fn)``; ``requires`` is checked at once, before any ``fn``."""
    if requires not in STATISTICS:
        raise ValueError(f"requires must be one of {STATISTICS}")

    def decorator(fn):
        made = strategy(fn)
        FUSIONS[made.name] = made
        return fn

    return decorator


def register_fusion(name: str, requires: str, description: str):
    """Decorator: ``fn(importance, layer, proj, bias) -> weights`` shaped ``(E, 1, 1)`` / ``(E, 1)`` for
    scalar strategies or like the stacked parameters for elementwise ones, summing to 1 over experts.
    """
    return _registrar(lambda fn: FusionStrategy(name, requires, fn, description), requires)


def register_block_fusion(name: str, requires: str, description: str, *, variable_width: bool = False):
    """Decorator: ``fn(block, importance, options) -> {proj: (weight (out, in), bias or None)}``, float32.

    ``variable_width``: the strategy accepts any ``options.width`` in ``1..E*I`` (validated by
    :func:`fuse_block`); otherwise ``width`` must be None or the experts' intermediate size.
    """
    return _registrar(lambda fn: FusionStrategy(name, requires, None, description, fuse=fn,
                                                variable_width=variable_width), requires)


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


# -- fisher_aligned ------------------------------------------------------------------------------------

def _neuron_features(expert: ExpertWeights, biases: bool) -> torch.Tensor:
    """``(I, D)`` float64: one row per intermediate neuron, ``[gate row; up row; down column]`` (+ gate/up
    biases when ``biases``); the gate part is absent for non-gated experts."""
    parts = [expert.gate, expert.up, expert.down.T]
    if biases:
        parts += [b[:, None] for b in (expert.gate_bias, expert.up_bias) if b is not None]
    return torch.cat([p.detach().double() for p in parts if p is not None], dim=1)


def neuron_permutation(expert: ExpertWeights, reference: ExpertWeights) -> torch.Tensor:
    """Weight matching: the permutation ``perm`` (long, on CPU) such that neuron ``perm[k]`` of ``expert``
    is matched to neuron ``k`` of ``reference``, maximising the summed dot products of their
    ``[gate row; up row; down column; gate/up biases]`` vectors (``linear_sum_assignment``)."""
    return _match(_neuron_features(expert, True), _neuron_features(reference, True))


def _match(features: torch.Tensor, reference_features: torch.Tensor) -> torch.Tensor:
    similarity = features @ reference_features.to(features.device).T  # (I, I): expert neuron x reference neuron
    rows, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)  # rows == arange(I)
    return torch.from_numpy(rows[np.argsort(cols)]).long()


def _permuted(expert: ExpertWeights, perm: torch.Tensor) -> ExpertWeights:
    """The same expert (same function) with its intermediate neurons reordered: neuron k <- ``perm[k]``."""
    perm = perm.to(expert.up.device)

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[perm]

    return ExpertWeights(gate=rows(expert.gate), up=rows(expert.up), down=expert.down[:, perm],
                         gate_bias=rows(expert.gate_bias), up_bias=rows(expert.up_bias), down_bias=expert.down_bias)


def _aligned_experts(block: MoEBlock, reference_index: int) -> Iterator[ExpertWeights]:
    """Every expert in index order, permuted onto the reference; each is read once."""
    reference = block.expert(reference_index)
    reference_features = _neuron_features(reference, True)
    for index in range(block.num_experts):
        if index == reference_index:
            yield reference
        else:
            expert = block.expert(index)
            yield _permuted(expert, _match(_neuron_features(expert, True), reference_features))


@register_block_fusion("fisher_aligned", "fisher",
                       "Fisher-weighted average of experts permutation-aligned to the top-Fisher expert (MC-SMoE)")
def _fisher_aligned(block: MoEBlock, importance: ExpertImportance, options: FusionOptions) -> FusedBlock:
    reference_index = int(torch.argmax(importance.fisher[importance.row(block.layer_idx)]))
    return _weighted_average(block, importance, _fisher, _aligned_experts(block, reference_index))


# -- concat --------------------------------------------------------------------------------------------

def block_top_k(block: MoEBlock) -> int | None:
    """Experts per token as the block's own modules state it (``top_k`` / ``num_experts_per_tok`` on the
    MoE block or its router), or None when neither says."""
    for module in (block.block, block.router):
        for attr in ("top_k", "num_experts_per_tok"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _resolve_top_k(block: MoEBlock, top_k: int | None) -> int:
    own = block_top_k(block)
    if top_k is None:
        if own is None:
            raise ValueError(f"{block.name}: cannot tell how many experts each token is routed to (no top_k or "
                             "num_experts_per_tok on the block or its router); pass top_k=... to fuse_block")
        top_k = own
    elif own is not None and own != top_k:
        raise ValueError(f"{block.name}: top_k={top_k} contradicts the block's own top_k={own}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= block.num_experts:
        raise ValueError(f"{block.name}: top_k must be an int in 1..{block.num_experts}, got {top_k!r}")
    return top_k


def expected_routing_weights(block: MoEBlock, importance: ExpertImportance, top_k: int | None = None) -> torch.Tensor:
    """``(E,)`` float64 mean routing weight per calibration token, ``routing_mass[l] / (routed[l].sum() / top_k)``."""
    if importance.routing_mass is None or importance.routed is None:
        present = {name: getattr(importance, name) is not None for name in ("routing_mass", "routed")}
        raise ValueError("concat fusion needs importance.routing_mass and importance.routed (recorded by "
                         f"compute_expert_importance); present here: {present} (a ModuleList router whose output "
                         "cannot be read leaves routing_mass None)")
    row = importance.row(block.layer_idx)
    num_tokens = importance.routed[row].double().sum() / _resolve_top_k(block, top_k)
    if num_tokens <= 0:
        raise ValueError(f"{block.name}: no calibration token was routed through this layer")
    return importance.routing_mass[row].double() / num_tokens


def _concat_pieces(expert: ExpertWeights, mass: torch.Tensor, score: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert as neuron-major float32 pieces (dim 0 = neuron), its down block scaled by ``mass``."""
    pieces = {"up": expert.up.detach().float(), "down_t": (mass.item() * expert.down.detach().double()).T.float(),
              "score": score}
    for name in ("gate", "gate_bias", "up_bias"):
        value = getattr(expert, name)
        if value is not None:
            pieces[name] = value.detach().float()
    return pieces


def _keep_top(pieces: list[dict[str, torch.Tensor]], width: int) -> list[dict[str, torch.Tensor]]:
    """Concatenate neuron-major pieces and keep the ``width`` best-scoring neurons, in their order."""
    merged = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
    if merged["score"].numel() > width:
        keep = torch.argsort(merged["score"], descending=True, stable=True)[:width].sort().values
        merged = {name: value[keep.to(value.device)] for name, value in merged.items()}
    return [merged]


@register_block_fusion("concat", "fisher",
                       "experts side by side (width E*I, or the top-width neurons by Fisher x energy), down blocks "
                       "scaled by the expected routing weight", variable_width=True)
def _concat(block: MoEBlock, importance: ExpertImportance, options: FusionOptions) -> FusedBlock:
    mass = expected_routing_weights(block, importance, options.top_k)
    expert_scores = _normalise(importance.fisher[importance.row(block.layer_idx)],
                               f"concat fusion, layer {block.layer_idx}")
    width = options.width
    pieces: list[dict[str, torch.Tensor]] = []
    count = 0
    down_bias = None
    for index in range(block.num_experts):
        expert = block.expert(index)
        energy = _neuron_features(expert, False).square().sum(1).cpu()
        total = energy.sum()
        share = energy / total if total > 0 else torch.zeros_like(energy)
        pieces.append(_concat_pieces(expert, mass[index], expert_scores[index] * share))
        count += energy.numel()
        if expert.down_bias is not None:
            term = mass[index].item() * expert.down_bias.detach().double()
            down_bias = term if down_bias is None else down_bias + term
        if width is not None and count > 2 * width:  # bounded memory: at most 2 * width + I neurons held
            pieces = _keep_top(pieces, width)
            count = width
    kept = _keep_top(pieces, count if width is None else width)[0]
    fused = {"up": (kept["up"], kept.get("up_bias")),
             "down": (kept["down_t"].T.contiguous(), None if down_bias is None else down_bias.float())}
    if "gate" in kept:
        fused["gate"] = (kept["gate"], kept.get("gate_bias"))
    return {proj: fused[proj] for proj in block.projection_names()}


# -- the entry point -----------------------------------------------------------------------------------

def check_width(block: MoEBlock, strategy: FusionStrategy, width: int | None) -> None:
    if width is None:
        return
    if isinstance(width, bool) or not isinstance(width, int):
        raise ValueError(f"width must be an int or None, got {width!r}")
    intermediate = block.expert(0).up.shape[0]
    if not strategy.variable_width:
        if width != intermediate:
            raise ValueError(f"fusion={strategy.name!r} keeps the experts' intermediate size {intermediate}; width "
                             f"must be None or {intermediate}, got {width} (use fusion='concat' for other widths)")
        return
    limit = block.num_experts * intermediate
    if not 1 <= width <= limit:
        raise ValueError(f"width must be in 1..{limit} (E * I = {block.num_experts} * {intermediate}), got {width}")


def fuse_block(
    block: MoEBlock, importance: ExpertImportance, fusion: str = "fisher", *, width: int | None = None,
    top_k: int | None = None,
) -> FusedBlock:
    """Fuse one MoE block: ``proj -> (fused_weight (out, in), fused_bias (out,) or None)``, float32.

    ``width``: the fused intermediate size, for strategies that can change it (``concat``: ``1..E*I``,
    default ``E*I``); every other strategy keeps the experts' ``I`` and accepts only None or ``I``.
    ``top_k``: experts per token, used by ``concat`` to count the calibration tokens; None reads it from
    the block (``top_k`` / ``num_experts_per_tok`` of the MoE block or its router). Ignored by the others.

    Averaging strategies visit experts one at a time (float64 accumulators), so memory stays at one
    expert plus the fused result whatever the number of experts; ``fisher_aligned`` also holds the
    reference expert, ``concat`` the kept neurons. For a checkpoint block
    (:class:`unite_hf.sources.checkpoint.CheckpointMoEBlock`) each expert is read from disk once
    (plus expert 0 once more when ``width`` is given, to check it).
    """
    strategy = get_fusion(fusion)
    check_width(block, strategy, width)
    if strategy.fuse is not None:
        return strategy.fuse(block, importance, FusionOptions(width=width, top_k=top_k))
    return _weighted_average(block, importance, strategy.weights, (block.expert(i) for i in range(block.num_experts)))


def _weighted_average(block: MoEBlock, importance: ExpertImportance, weights_fn: WeightsFn,
                      experts: Iterable[ExpertWeights]) -> FusedBlock:
    """``sum_i w_i W_i`` for every projection and bias, the experts given in index order."""
    projections = block.projection_names()
    weights = {proj: weights_fn(importance, block.layer_idx, proj, False) for proj in projections}
    bias_weights = ({proj: weights_fn(importance, block.layer_idx, proj, True) for proj in projections}
                    if block.has_bias else {})
    totals: dict[str, torch.Tensor] = {}
    bias_totals: dict[str, torch.Tensor] = {}
    for index, expert in enumerate(experts):
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
