"""The refit registry, the rebuilt FFN of one layer, and the calibration passes that feed a refit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..decomposition import Decomposition
from ..model_structure import is_shared_gate
from ..sources import MoESource


@dataclass(frozen=True)
class RefitOptions:
    """How a refit runs: the extraction config's ``refit_*`` fields (their defaults live there)."""

    ridge: float
    """ridge strength, relative: ``lambda = ridge * mean eigenvalue of A^T A * mean eigenvalue of Z^T Z``"""
    sequential: bool
    """fit layer l on the inputs it sees once every earlier MoE layer is replaced by its refitted FFN"""
    steps: int
    """Adam steps per layer (distill)"""
    lr: float
    """Adam learning rate (distill)"""
    max_tokens: int
    """calibration tokens kept per layer for the iterative refits (distill)"""
    seed: int
    """seed of the token sampling (distill)"""
    max_memory_gb: float
    """memory for the layers' statistics: layers are refitted in groups that fit, one (partial) pass each"""
    batch_tokens: int = 1024
    """tokens per Adam step (distill); not a setting of the recipe"""

    @classmethod
    def from_config(cls, config) -> RefitOptions:
        """From a :class:`~unite_hf.methods.unite.UniteExtractionConfig`."""
        return cls(ridge=config.refit_ridge, sequential=config.refit_sequential, steps=config.refit_steps,
                   lr=config.refit_lr, max_tokens=config.refit_max_tokens, seed=config.seed,
                   max_memory_gb=config.refit_max_memory_gb)


class LayerFFN:
    """The rebuilt routed FFN of one MoE layer from the gene's pieces: fixed bases, per-layer cores that a
    refit may change, the fused biases; ``act(gate x) * up x`` (or ``act(up x)``) as the source's experts."""

    def __init__(self, decompositions: dict[str, Decomposition], biases: dict[str, torch.Tensor], row: int,
                 activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.projections = list(decompositions)
        self.out_basis = {p: d.layer_out_factor(row).float() for p, d in decompositions.items()}
        self.in_basis = {p: d.layer_in_factor(row).float() for p, d in decompositions.items()}
        self.cores = {p: d.layer_core(row).float().clone() for p, d in decompositions.items()}
        self.bias = {p: (b[row].float() if b is not None else None) for p, b in
                     ((p, biases.get(p)) for p in decompositions)}
        self.activation = activation

    def to(self, device: torch.device) -> LayerFFN:
        for table in (self.out_basis, self.in_basis, self.cores):
            for proj in table:
                table[proj] = table[proj].to(device)
        self.bias = {p: (b.to(device) if b is not None else None) for p, b in self.bias.items()}
        return self

    def coordinates(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ U_in``: the input in the projection's input basis."""
        return x @ self.in_basis[proj]

    def project(self, proj: str, x: torch.Tensor, cores: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        core = (cores or self.cores)[proj]
        y = (self.coordinates(proj, x) @ core.T) @ self.out_basis[proj].T
        return y if self.bias[proj] is None else y + self.bias[proj]

    def hidden(self, x: torch.Tensor, cores: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """What ``down`` receives."""
        if "gate" in self.projections:
            return self.activation(self.project("gate", x, cores)) * self.project("up", x, cores)
        return self.activation(self.project("up", x, cores))

    def __call__(self, x: torch.Tensor, cores: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.project("down", self.hidden(x, cores), cores)


class Refit:
    """One layer's refit: :meth:`update` sees the calibration tokens in batches (``x``: the MoE block's
    inputs, ``target``: its routed output, both ``(tokens, hidden)`` float32), then :meth:`solve` writes
    ``layer.cores`` and returns the relative calibration error of the routed output before and after."""

    def __init__(self, layer: LayerFFN, options: RefitOptions) -> None:
        self.layer, self.options = layer, options

    @classmethod
    def statistics_bytes(cls, layer: LayerFFN, options: RefitOptions) -> int:
        """Memory the layer's statistics take while its calibration pass runs."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, target: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def solve(self) -> tuple[float, float]:  # pragma: no cover - abstract
        raise NotImplementedError


REFITS: dict[str, type[Refit] | None] = {"none": None}
"""name -> refit class (``"none"``: the decomposition's cores unchanged)."""


def register_refit(name: str) -> Callable[[type[Refit]], type[Refit]]:
    """Class decorator: make a :class:`Refit` available as ``refit=name``; a second registration of a
    name is refused (registries here never overwrite silently)."""
    def decorator(cls: type[Refit]) -> type[Refit]:
        if name in REFITS:
            raise ValueError(f"refit {name!r} is already registered")
        REFITS[name] = cls
        return cls
    return decorator


def get_refit(name: str) -> type[Refit] | None:
    if name not in REFITS:
        raise ValueError(f"unknown refit {name!r}; choose one of {sorted(REFITS)}")
    return REFITS[name]


def shared_output(block, x: torch.Tensor) -> torch.Tensor | None:
    """The source block's shared experts on ``x`` as the family combines them (sum of the shared MLPs,
    times ``sigmoid(gate(x))`` where a scalar gate exists, as Qwen2-MoE), or None without shared experts."""
    mlps = [m for _, m in block.shared_experts if not is_shared_gate(m)]
    gates = [m for _, m in block.shared_experts if is_shared_gate(m)]
    if not mlps:
        return None
    out = sum(m(x) for m in mlps)
    for gate in gates:
        out = torch.sigmoid(gate(x)) * out
    return out


class _Stop(Exception):
    """Ends a calibration forward pass once the last needed layer is seen."""


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _hooks(model: nn.Module, source: MoESource, layers: dict[int, LayerFFN], capture: Callable | None,
           stop_at: int | None) -> Iterator[None]:
    """Replace the routed part of each block in ``layers`` by its rebuilt FFN; call ``capture(row, x, target)``
    on every block's input and routed output (before any replacement of that block); stop after ``stop_at``."""
    handles = []
    for row, block in enumerate(source.blocks):
        def hook(module, args, output, row=row, block=block):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1]).float()
            shared = shared_output(block, x)
            if capture is not None:
                routed = _block_output(output) - (shared if shared is not None else 0)
                capture(row, flat, routed.reshape(-1, x.shape[-1]).float())
            if row == stop_at:
                raise _Stop
            if row in layers:
                new = layers[row](flat).reshape(x.shape).to(x.dtype)
                new = new if shared is None else new + shared
                return (new, *output[1:]) if isinstance(output, tuple) else new
            return None
        handles.append(source.blocks[row].block.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _passes(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    device = next(model.parameters()).device
    for start in range(0, len(input_ids), batch_size):
        yield input_ids[start:start + batch_size].to(device)


def refit_decompositions(
    model: nn.Module,
    source: MoESource,
    decompositions: dict[str, Decomposition],
    fused_biases: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    method: str,
    options: RefitOptions,
    *,
    batch_size: int = 8,
    fused: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
) -> tuple[dict[str, Decomposition], dict[str, list[float]]]:
    """Refit every MoE layer's cores of ``decompositions`` (one per projection, rows = ``source.blocks``)
    to the source's routed output on ``input_ids`` ``[N, T]``.

    Returns the new decompositions (per-layer cores, identity layer factor, the same bases) and, per MoE
    layer index, ``[error before, error after]``: the relative calibration error
    ``||y_hat - y||_F / ||y||_F`` of the routed output. ``method="none"`` returns the input unchanged.
    """
    refit_class = get_refit(method)
    if refit_class is None:
        return decompositions, {}
    activation = source.blocks[0].activation
    device = next(model.parameters()).device
    layers = [LayerFFN(decompositions, fused_biases, row, activation).to(device) for row in range(len(source.blocks))]
    errors: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    order = list(range(len(layers)))
    groups = [[row] for row in order] if options.sequential else _groups(refit_class, layers, options)
    bar = tqdm(total=len(layers), desc=f"Refit ({method})", unit="layer", disable=not show_progress)
    try:
        with torch.no_grad():
            for group in groups:
                # sequential: the layers before the group are replaced by their refitted FFNs
                done = {row: layers[row] for row in order if row < group[0]} if options.sequential else {}
                refits = {row: refit_class(layers[row], options) for row in group}

                def capture(row, x, target, refits=refits):
                    if row in refits:
                        refits[row].update(x, target)

                with _hooks(model, source, done, capture, stop_at=group[-1]):
                    for batch in _passes(model, input_ids, batch_size):
                        try:
                            model(input_ids=batch)
                        except _Stop:
                            pass
                for row, refit in refits.items():
                    with torch.enable_grad():
                        before, after = refit.solve()
                    errors[str(source.blocks[row].layer_idx)] = [before, after]
                    bar.update()
                del refits
    finally:
        bar.close()
        model.train(was_training)
    return _with_cores(decompositions, layers, fused or {}), errors


def _groups(refit_class: type[Refit], layers: list[LayerFFN], options: RefitOptions) -> list[list[int]]:
    """Consecutive layers whose statistics fit ``options.max_memory_gb`` together (at least one layer each)."""
    limit = options.max_memory_gb * 1024 ** 3
    groups: list[list[int]] = []
    used = limit + 1
    for row, layer in enumerate(layers):
        size = refit_class.statistics_bytes(layer, options)
        if used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += size
    return groups


def _with_cores(decompositions: dict[str, Decomposition], layers: list[LayerFFN],
                fused: dict[str, torch.Tensor]) -> dict[str, Decomposition]:
    """The decompositions with each layer's refitted cores as the core tensor and an identity layer factor."""
    out = {}
    for proj, dec in decompositions.items():
        cores = torch.stack([layer.cores[proj].detach().float().cpu() for layer in layers])
        eye = torch.eye(len(layers), dtype=cores.dtype)
        refitted = replace(dec, core=cores.contiguous(), layer_factor=eye, ranks=(len(layers), *dec.ranks[1:]))
        if proj in fused:  # the weight-space error of what the gene now holds
            x = fused[proj].double()
            refitted.relative_error = float(torch.linalg.vector_norm(x - refitted.reconstruct().double())
                                            / torch.linalg.vector_norm(x).clamp_min(1e-30))
        out[proj] = refitted
    return out


def relative_error(sq_residual: float, sq_target: float) -> float:
    return math.sqrt(max(sq_residual, 0.0) / max(sq_target, 1e-300))


__all__ = ["LayerFFN", "REFITS", "Refit", "RefitOptions", "get_refit", "refit_decompositions", "register_refit",
           "shared_output", "relative_error"]
