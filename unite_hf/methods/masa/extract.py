"""MASA (ICLR 2026): small square gene matrices, trained by output and spectral alignment.

**Gene matrices.** Each selected source FFN weight ``W`` (``d_out x d_in``, ``nn.Linear`` layout) gets
one matrix ``M`` (``r x r``). Its forward is ``x̃ = f_d(M · f_c(x))``:

- ``f_c`` (:func:`fold_input`) lays ``x`` (length ``d_in``) out as ``n = ceil(d_in / r)`` chunks of
  ``r`` consecutive entries, zero-padding the last one: chunk ``j`` is ``x[j r : (j + 1) r]``. ``M``
  multiplies every chunk.
- ``f_d`` (:func:`unfold_output`) maps the ``n`` transformed chunks to ``m = ceil(d_out / r)`` output
  chunks by adaptive average pooling over the chunk axis (output chunk ``i`` is the mean of input
  chunks ``floor(i n / m)`` to ``ceil((i + 1) n / m) - 1``, exactly ``torch``'s
  ``adaptive_avg_pool1d``), lays them end to end and keeps the first ``d_out`` entries.

So the gene matrix stands for the structured weight ``W̃ = (P ⊗ M)[:d_out, :d_in]`` with ``P`` the
``m x n`` pooling matrix (:func:`effective_weight`); for ``d_in = d_out``, ``P = I`` and ``W̃`` is
block-diagonal. ``M`` starts at the Frobenius-optimal ``argmin ||W - W̃||_F`` (:func:`kronecker_init`).

**Alignment.** The source is frozen; only the ``M``'s train, on real activations captured by a
forward pre-hook on each FFN: gate and up see the FFN input ``h``, down sees
``act(W_gate h) * (W_up h)`` computed from the unit's own weights. The loss per weight is

    ||W x - x̃||^2 / ||W x||^2  +  λ · mean_i (log s_i(W) - log s_i(M))^2,   i < r

(the output term relative, so layers of different scale weigh alike; the spectral term averaged
over the r singular values, i.e. the paper's sum with λ divided by r). Singular values are clamped at
``1e-8`` before the log, so a rank-deficient ``W`` or ``M`` never yields ``-inf``.

**Which weights** (:data:`UNIT_SELECTIONS`): ``"dense"`` (every dense FFN), ``"frequent"`` (the
``num_experts`` most frequently routed experts of each MoE layer, by an inference-only routing pass),
``"shared"`` (the shared experts); ``"auto"`` picks dense, shared or frequent in that order. A MoE
expert sees every token that reaches its block, not only those routed to it: the target's dense FFN
will see them all. A layer with several units gets their routing-frequency-weighted mean matrix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...calibration import CalibrationSet, load_calibration, load_mixed_calibration, published_calibration
from ...gene import Gene, GeneConfig, register_gene
from ...sources import FFN_ATTRS, PROJECTIONS, UnsupportedSourceError, find_decoder_layers, get_source
from ...model_structure import mlp_activation, mlp_linear_names
from ...seeding import seeded_by_argument
from ..common import check_finite_weights, check_on_device, check_seq_len, source_provenance
from .config import DEFAULT_CORPORA, NOT_MASA, MasaExtractionConfig

SINGULAR_VALUE_FLOOR = 1e-8


# -- f_c and f_d ------------------------------------------------------------------------------------------

def fold_input(x: torch.Tensor, r: int) -> torch.Tensor:
    """``f_c``: ``(..., d_in) -> (..., n, r)`` chunks of ``r`` consecutive entries, zero-padded."""
    n = math.ceil(x.shape[-1] / r)
    return F.pad(x, (0, n * r - x.shape[-1])).reshape(*x.shape[:-1], n, r)


def unfold_output(chunks: torch.Tensor, d_out: int) -> torch.Tensor:
    """``f_d``: ``(..., n, r) -> (..., d_out)``: pool the ``n`` chunks to ``ceil(d_out / r)`` and
    lay them end to end."""
    *lead, n, r = chunks.shape
    m = math.ceil(d_out / r)
    pooled = F.adaptive_avg_pool1d(chunks.reshape(-1, n, r).transpose(1, 2), m)  # (B, r, m)
    return pooled.transpose(1, 2).reshape(*lead, m * r)[..., :d_out]


def masa_forward(matrix: torch.Tensor, x: torch.Tensor, d_out: int) -> torch.Tensor:
    """``x̃ = f_d(M · f_c(x))`` for ``x`` of shape ``(..., d_in)``."""
    return unfold_output(fold_input(x, matrix.shape[0]) @ matrix.T, d_out)


def pooling_matrix(n: int, m: int) -> torch.Tensor:
    """The ``m x n`` matrix of ``f_d``'s chunk pooling (row ``i`` averages chunks ``floor(i n/m)`` ..
    ``ceil((i+1) n/m) - 1``)."""
    pool = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        start, end = (i * n) // m, -((-(i + 1) * n) // m)
        pool[i, start:end] = 1.0 / (end - start)
    return pool


def effective_weight(matrix: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The ``d_out x d_in`` weight a gene matrix stands for: ``(P ⊗ M)[:d_out, :d_in]``."""
    r = matrix.shape[0]
    pool = pooling_matrix(math.ceil(d_in / r), math.ceil(d_out / r)).to(matrix)
    return torch.kron(pool, matrix)[:d_out, :d_in]


def kronecker_init(weight: torch.Tensor, r: int) -> torch.Tensor:
    """The ``M`` minimising ``||W - (P ⊗ M)[:d_out, :d_in]||_F``: a ``P``-weighted mean of ``W``'s
    ``r x r`` blocks, each entry over the blocks that reach it."""
    d_out, d_in = weight.shape
    n, m = math.ceil(d_in / r), math.ceil(d_out / r)
    pool = pooling_matrix(n, m).to(weight.device)
    padded = F.pad(weight.double(), (0, n * r - d_in, 0, m * r - d_out)).reshape(m, r, n, r)
    mask = F.pad(torch.ones_like(weight, dtype=torch.float64), (0, n * r - d_in, 0, m * r - d_out)).reshape(m, r, n, r)
    numerator = torch.einsum("ij,iajb->ab", pool, padded)
    denominator = torch.einsum("ij,iajb->ab", pool.square(), mask)
    return (numerator / denominator.clamp_min(1e-12)).to(weight.dtype)


# -- which source weights ---------------------------------------------------------------------------------

@dataclass
class FFNUnit:
    """One source FFN (a dense MLP, a routed expert or a shared expert) whose weights get gene matrices."""

    layer: int
    name: str  # "mlp", "expert3", "shared_expert"
    module: nn.Module  # where the FFN input arrives (the dense MLP or the MoE block)
    weights: dict[str, torch.Tensor]  # proj -> (out, in)
    activation: Callable[[torch.Tensor], torch.Tensor]
    mix_weight: float = 1.0  # share in the layer's mean matrix
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # proj -> (out,), where the FFN has them

    def _linear(self, x: torch.Tensor, proj: str) -> torch.Tensor:
        out = x @ self.weights[proj].T
        return out + self.biases[proj] if proj in self.biases else out

    def inputs(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        """The activations reaching each projection, from the FFN input ``hidden`` ``(tokens, H)``
        (the unit's own weights and biases; a hook on ``down`` itself would see routed tokens only)."""
        up = self._linear(hidden, "up")
        if "gate" in self.weights:
            inner = self.activation(self._linear(hidden, "gate")) * up
        else:
            inner = self.activation(up)
        return {proj: inner if proj == "down" else hidden for proj in self.weights}


def _mlp_linears(mlp: nn.Module) -> dict[str, nn.Linear] | None:
    """``proj -> nn.Linear`` of a gate/up/down (or w1/w3/w2, or up/down) MLP, else ``None``
    (the naming conventions of :data:`unite_hf.model_structure.MLP_LINEAR_NAMES`)."""
    names = mlp_linear_names(mlp)
    return None if names is None else {proj: getattr(mlp, name) for proj, name in names.items()}


def _mlp_unit(layer: int, name: str, module: nn.Module, mlp: nn.Module) -> FFNUnit | None:
    linears = _mlp_linears(mlp)
    if not linears:
        return None
    return FFNUnit(layer, name, module, {p: lin.weight.detach() for p, lin in linears.items()}, _activation(mlp),
                   biases={p: lin.bias.detach() for p, lin in linears.items() if lin.bias is not None})


def _activation(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = mlp_activation(mlp)
    if fn is None:
        raise UnsupportedSourceError(f"{type(mlp).__name__} has no act_fn; cannot compute what reaches its down projection")
    return fn


def _dense_units(model: nn.Module, **_: Any) -> list[FFNUnit]:
    _, layers = find_decoder_layers(model)
    units = []
    for idx, layer in enumerate(layers):
        for attr in FFN_ATTRS:
            mlp = getattr(layer, attr, None)
            unit = _mlp_unit(idx, "mlp", mlp, mlp) if isinstance(mlp, nn.Module) and not hasattr(mlp, "experts") else None
            if unit:
                units.append(unit)
                break
    return units


def _shared_units(model: nn.Module, **_: Any) -> list[FFNUnit]:
    units = []
    for block in get_source(model).blocks:
        for attr, shared in block.shared_experts:
            unit = _mlp_unit(block.layer_idx, attr, block.block, shared)
            if unit:  # skips Qwen2-MoE's shared_expert_gate (a 1-output Linear, not an FFN)
                units.append(unit)
    return units


def _frequent_units(model: nn.Module, *, frequency: torch.Tensor | None = None, num_experts: int = 1,
                    **_: Any) -> list[FFNUnit]:
    source = get_source(model)
    if frequency is None:
        raise ValueError("selection 'frequent' needs routing frequencies")
    if not 1 <= num_experts <= source.num_experts:
        raise ValueError(f"num_experts={num_experts} is out of range: the source has {source.num_experts} experts per layer")
    units = []
    for row, block in enumerate(source.blocks):
        top = torch.topk(frequency[row].double(), num_experts).indices.tolist()
        share = frequency[row, top].double()
        share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / len(top))
        for expert, weight in zip(top, share.tolist()):
            ew = block.expert(expert)
            weights = {proj: ew.projection(proj).detach() for proj in block.projection_names()}
            biases = {proj: ew.bias(proj).detach() for proj in weights if ew.bias(proj) is not None}
            units.append(FFNUnit(block.layer_idx, f"expert{expert}", block.block, weights, block.activation, weight,
                                 biases))
    return units


UNIT_SELECTIONS: dict[str, Callable[..., list[FFNUnit]]] = {
    "dense": _dense_units,
    "frequent": _frequent_units,
    "shared": _shared_units,
}


def _is_moe(model: nn.Module) -> bool:
    try:
        get_source(model)
    except UnsupportedSourceError:
        return False
    return True


def _resolve_selection(model: nn.Module, selection: str) -> str:
    if selection != "auto":
        if selection not in UNIT_SELECTIONS:
            raise ValueError(f"selection must be 'auto' or one of {sorted(UNIT_SELECTIONS)}, got {selection!r}")
        return selection
    if not _is_moe(model):
        return "dense"
    return "shared" if _shared_units(model) else "frequent"


# -- the gene ---------------------------------------------------------------------------------------------

@register_gene("masa")
class MasaGene(Gene):
    """Trained ``r x r`` gene matrices, one per selected source FFN weight.

    Tensor keys in ``gene.safetensors``: ``masa.{layer}.{unit}.{proj}`` (the matrix ``M``) and
    ``spectrum.{layer}.{unit}.{proj}`` (the top-``r`` singular values of the source weight ``W``).
    ``config.method_config`` holds the rank, the units and their mixing weights, the alignment
    settings and budget, and the final losses. ``fisher_labels``, ``fusion``, ``decomposition`` and
    ``n_iter_max`` hold :data:`NOT_MASA` (genes saved before said UNITE's defaults: read as these).
    """

    card_template = "gene_masa.md"
    default_scaling = "adaptive"

    def __init__(self, config: GeneConfig, matrices: dict[tuple[int, str, str], torch.Tensor],
                 spectra: dict[tuple[int, str, str], torch.Tensor] | None = None, tokenizer=None) -> None:
        super().__init__(config, {}, tokenizer)
        self.matrices = matrices
        self.spectra = spectra or {}

    @property
    def rank(self) -> int:
        return int(self.config.method_config["rank"])

    @property
    def matrix_layers(self) -> list[int]:
        """Source layers that hold gene matrices, in order."""
        return sorted({layer for layer, _, _ in self.matrices})

    def units(self, layer: int) -> dict[str, float]:
        """``unit -> mixing weight`` of a source layer."""
        return dict(self.config.method_config["units"][str(layer)])

    def gene_matrix(self, layer: int, proj: str) -> torch.Tensor:
        """The layer's ``r x r`` matrix for ``proj``: its units' matrices, mixed by routing frequency."""
        if layer not in self.matrix_layers:
            raise KeyError(f"layer {layer} holds no gene matrices; the gene's layers are {self.matrix_layers}")
        units = self.units(layer)
        if (layer, next(iter(units)), proj) not in self.matrices:
            raise KeyError(f"unknown projection {proj!r}; this gene has {self.config.projections}")
        return sum(weight * self.matrices[(layer, unit, proj)] for unit, weight in units.items())

    def gene_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"masa.{layer}.{unit}.{proj}": m.detach().float() for (layer, unit, proj), m in self.matrices.items()}
        tensors.update({f"spectrum.{layer}.{unit}.{proj}": s.float() for (layer, unit, proj), s in self.spectra.items()})
        return tensors

    @classmethod
    def known_tensors(cls, config: GeneConfig) -> set[str] | None:
        """A matrix and a spectrum per unit and projection of ``method_config["units"]`` (``None`` where that
        record is malformed: the rebuild then refuses the gene)."""
        units = config.method_config.get("units")
        if not isinstance(units, dict) or not all(isinstance(names, dict) for names in units.values()):
            return None
        return {f"{kind}.{layer}.{unit}.{proj}" for kind in ("masa", "spectrum") for layer, names in units.items()
                for unit in names for proj in config.projections}

    @classmethod
    def _from_tensors(cls, config: GeneConfig, gene_tensors: dict[str, torch.Tensor],
                      source_tensors: dict[str, torch.Tensor]) -> "MasaGene":
        matrices, spectra = {}, {}
        for key, tensor in gene_tensors.items():
            kind, layer, unit, proj = key.split(".")
            (matrices if kind == "masa" else spectra)[(int(layer), unit, proj)] = tensor
        expected = {(int(layer), unit, proj) for layer, units in config.method_config["units"].items()
                    for unit in units for proj in config.projections}
        if set(matrices) != expected:
            raise ValueError(f"gene matrices {sorted(expected - set(matrices))} are missing")
        rank = config.method_config["rank"]
        if any(m.shape != (rank, rank) for m in matrices.values()):
            raise ValueError(f"every gene matrix must be {rank} x {rank}")
        return cls(dataclasses.replace(config, **NOT_MASA), matrices, spectra)  # older genes: UNITE's defaults

    def card_variables(self, config: GeneConfig) -> dict[str, Any]:
        mc = config.method_config
        loss_rows = "\n".join(f"| {proj} | {mc['final_output_error'].get(proj, float('nan')):.4f} | "
                              f"{mc['final_spectral_error'].get(proj, float('nan')):.4f} | "
                              f"{mc['initial_output_error'].get(proj, float('nan')):.4f} |"
                              for proj in config.projections)
        return {"mc": mc, "loss_rows": loss_rows, "num_matrices": len(self.matrices)}

    def __repr__(self) -> str:
        mc = self.config.method_config
        return (f"MasaGene(source={self.config.source_id!r}, rank={mc.get('rank')}, layers={self.matrix_layers}, "
                f"selection={mc.get('selection')!r}, matrices={len(self.matrices)})")


# -- extraction -------------------------------------------------------------------------------------------

def _spectral_loss(matrix: torch.Tensor, target_log_spectrum: torch.Tensor) -> torch.Tensor:
    log_s = torch.linalg.svdvals(matrix).clamp_min(SINGULAR_VALUE_FLOOR).log()
    return (target_log_spectrum - log_s).square().mean()


def _validate_rank(units: list[FFNUnit], rank: int) -> None:
    smallest = min(min(w.shape) for unit in units for w in unit.weights.values())
    if rank > smallest:
        raise ValueError(f"rank {rank} is larger than the source's smallest FFN dimension ({smallest}); "
                         f"a gene matrix has at most that many singular values to align. Choose rank <= {smallest}.")


@seeded_by_argument  # anything drawn from torch's global generator comes from `seed`, and the caller's state is kept
def extract_masa_gene(
    model: nn.Module,
    tokenizer=None,
    corpora: Any = DEFAULT_CORPORA,
    *,
    rank: int = 64,
    selection: str = "auto",
    num_experts: int = 1,
    spectral_weight: float = 0.1,
    tokens: int = 262_144,
    seq_len: int = 256,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    source_id: str | None = None,
    source_revision: str | None = None,
    show_progress: bool = True,
) -> MasaGene:
    """Train MASA gene matrices against a frozen source (dense or MoE causal LM).

    Args:
        model: the source causal LM.
        tokenizer: for text corpora.
        corpora: the alignment text: a list of calibration inputs mixed in equal shares (default the
            local WikiText-2 and SimpleBooks, a stand-in for the paper's RedPajama), any single input
            :func:`~unite_hf.calibration.load_calibration` accepts, or a token tensor ``[N, T]``.
        rank: ``r``, the size of every gene matrix; at most the smallest FFN dimension.
        selection: ``auto`` | ``dense`` | ``frequent`` | ``shared`` (see the module docstring).
        num_experts: experts per MoE layer for ``frequent``.
        spectral_weight: λ; 0 turns the spectral alignment off (the paper's ablation).
        tokens: alignment budget in tokens (one optimizer step per batch of ``batch_size x seq_len``).
        learning_rate: Adam learning rate, decayed linearly to 0.
    """
    from ...progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    recipe = MasaExtractionConfig(  # validates every setting before anything runs; saved as the gene's recipe
        corpora=corpora, rank=rank, selection=selection, num_experts=num_experts, spectral_weight=spectral_weight,
        tokens=tokens, seq_len=seq_len, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    check_on_device(model)  # before any pass over the data
    selection = _resolve_selection(model, selection)
    check_finite_weights(model)
    frequency = None
    if selection == "frequent":
        num_source_experts = get_source(model).num_experts
        if not 1 <= num_experts <= num_source_experts:
            raise ValueError(f"num_experts={num_experts} is out of range: the source has {num_source_experts} "
                             "experts per layer")
        from ...importance import compute_routing_frequency

        probe = _alignment_text(corpora, tokenizer, max(1, min(16, tokens // seq_len)), seq_len, seed, show_progress)
        check_seq_len(model, probe.seq_len)  # the windows' real length, before the routing pass
        frequency = compute_routing_frequency(model, probe, batch_size=batch_size, show_progress=show_progress)
    units = UNIT_SELECTIONS[selection](model, frequency=frequency, num_experts=num_experts)
    if not units:
        raise UnsupportedSourceError(
            f"{type(model).__name__} has no FFN weights of the kind {selection!r} "
            f"({'no shared experts' if selection == 'shared' else 'no gate/up/down MLPs or experts found'}).")
    _validate_rank(units, rank)
    num_sequences = max(1, math.ceil(tokens / seq_len))
    calib = _alignment_text(corpora, tokenizer, num_sequences, seq_len, seed, show_progress)
    check_seq_len(model, calib.seq_len)  # the windows' real length, before the alignment
    if calib.input_ids.max() >= model.get_input_embeddings().num_embeddings:
        raise ValueError("the alignment corpus has token ids beyond the source's vocabulary: wrong tokenizer?")

    device = next(model.parameters()).device
    matrices: dict[tuple[int, str, str], torch.Tensor] = {}
    log_spectra: dict[tuple[int, str, str], torch.Tensor] = {}
    spectra: dict[tuple[int, str, str], torch.Tensor] = {}
    for unit in units:
        for proj, weight in unit.weights.items():
            key = (unit.layer, unit.name, proj)
            # each matrix lives where its weight does (device_map="auto" spreads layers over devices)
            matrices[key] = kronecker_init(weight.float(), rank).requires_grad_(True)
            s = torch.linalg.svdvals(weight.double())[:rank].float()
            spectra[key] = s.cpu()
            log_spectra[key] = s.clamp_min(SINGULAR_VALUE_FLOOR).log()
    optimizer = torch.optim.Adam(list(matrices.values()), lr=learning_rate)
    steps = math.ceil(calib.num_sequences / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    stats = {"output": {}, "spectral": {}}

    def hook_for(layer_units: list[FFNUnit]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = (args[0] if args else next(iter(kwargs.values()))).detach()
            hidden = hidden.reshape(-1, hidden.shape[-1]).float()
            with torch.enable_grad():
                for unit in layer_units:
                    with torch.no_grad():
                        inputs = unit.inputs(hidden.to(unit.weights["up"]))
                    for proj, x in inputs.items():
                        key = (unit.layer, unit.name, proj)
                        x = x.float()
                        target = x @ unit.weights[proj].float().T
                        approx = masa_forward(matrices[key], x, target.shape[-1])
                        output = (target - approx).square().sum() / target.square().sum().clamp_min(1e-12)
                        spectral = _spectral_loss(matrices[key], log_spectra[key])
                        (output + spectral_weight * spectral).backward()
                        stats["output"].setdefault(proj, []).append(output.item())
                        stats["spectral"].setdefault(proj, []).append(spectral.item())
        return hook

    by_module: dict[int, list[FFNUnit]] = {}
    for unit in units:
        by_module.setdefault(id(unit.module), []).append(unit)
    handles = [group[0].module.register_forward_pre_hook(hook_for(group), with_kwargs=True) for group in by_module.values()]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    history = []
    try:
        with torch.no_grad():
            for step, batch in enumerate(tqdm(calib.batches(batch_size), total=steps, desc="MASA alignment",
                                              disable=not show_progress)):
                for stat in stats.values():
                    stat.clear()
                model(input_ids=batch.to(device))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if step == 0:
                    initial = {proj: sum(v) / len(v) for proj, v in stats["output"].items()}
                history.append(sum(sum(v) for v in stats["output"].values()) / sum(len(v) for v in stats["output"].values()))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for key, matrix in matrices.items():
        if not torch.isfinite(matrix).all():
            raise FloatingPointError(f"gene matrix {key} diverged (non-finite); lower learning_rate")

    units_config: dict[str, dict[str, float]] = {}
    for unit in units:
        units_config.setdefault(str(unit.layer), {})[unit.name] = unit.mix_weight
    num_layers = len(find_decoder_layers(model)[1])
    cfg = model.config
    config = GeneConfig(
        method="masa",
        **source_provenance(model, source_id, source_revision),
        num_layers=num_layers,
        moe_layers=sorted({u.layer for u in units}),
        hidden_size=cfg.hidden_size,
        projections=sorted(units[0].weights, key=PROJECTIONS.index),
        calibration=calib.name,
        num_sequences=calib.num_sequences,
        seq_len=calib.seq_len,
        seed=seed,
        **NOT_MASA,
        method_config={
            "rank": rank, "selection": selection, "num_experts": num_experts if selection == "frequent" else None,
            "units": units_config, "spectral_weight": spectral_weight, "tokens": calib.input_ids.numel(),
            "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
            "seconds": round(time.perf_counter() - started, 1),
            "initial_output_error": initial,
            "final_output_error": {p: sum(v) / len(v) for p, v in stats["output"].items()},
            "final_spectral_error": {p: sum(v) / len(v) for p, v in stats["spectral"].items()},
            "output_error_per_step": [round(v, 6) for v in history],
            "source_widths": {proj: list(units[0].weights[proj].shape) for proj in units[0].weights},
        },
        recipe=_published_recipe(recipe, calib),
    )
    detached = {key: m.detach().cpu() for key, m in matrices.items()}
    return MasaGene(config, detached, spectra, tokenizer=tokenizer)


def _is_corpus_list(corpora: Any) -> bool:
    """Whether ``corpora`` lists corpora to mix (names or paths), not the documents of one corpus."""
    from ...calibration import CORPUS_ALIASES

    return isinstance(corpora, (list, tuple)) and bool(corpora) and all(
        isinstance(c, (str, os.PathLike)) and (str(c) in CORPUS_ALIASES or os.path.exists(c)) for c in corpora)


def _published_recipe(recipe: MasaExtractionConfig, calib: CalibrationSet) -> dict[str, Any]:
    """The recipe the gene records (and ``push_to_hub`` publishes): each corpus as
    :func:`~unite_hf.calibration.published_calibration` records it (a file by its name; never the text of a
    list of documents nor a local folder), and for token windows given as they are (a tensor) the
    ``seq_len`` and ``tokens`` they set, so the recipe says what the provenance says."""
    data = recipe.to_dict()
    corpora = recipe.corpora
    data["corpora"] = ([published_calibration(c) for c in corpora] if _is_corpus_list(corpora)
                       else published_calibration(corpora))
    if isinstance(corpora, (torch.Tensor, CalibrationSet)):
        data["seq_len"], data["tokens"] = calib.seq_len, int(calib.input_ids.numel())
    return data


def _alignment_text(corpora: Any, tokenizer, num_sequences: int, seq_len: int, seed: int,
                    show_progress: bool) -> CalibrationSet:
    """A list of corpus names or paths is mixed in equal shares; anything else is one corpus."""
    if _is_corpus_list(corpora):
        if len(corpora) > 1:
            return load_mixed_calibration(list(corpora), tokenizer, num_sequences=num_sequences, seq_len=seq_len,
                                          seed=seed, show_progress=show_progress)
        corpora = corpora[0]
    return load_calibration(corpora, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                            show_progress=show_progress)


def extract_from_config(config: MasaExtractionConfig, model: nn.Module, tokenizer=None, *, source_id: str | None = None,
                        source_revision: str | None = None, show_progress: bool = True) -> MasaGene:
    """Run MASA with ``config`` (see :func:`extract_masa_gene`)."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return extract_masa_gene(model, tokenizer, source_id=source_id, source_revision=source_revision,
                             show_progress=show_progress, **settings)
