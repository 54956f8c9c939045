"""XPERT's coupled scaling: a layer's common experts, side by side, brought to a Llama FFN's size whole.

An XPERT gene matrix (:meth:`~unite_hf.methods.xpert.XpertGene.gene_matrix`) is real experts side by
side: gate and up rows and down columns are neurons, gate and up columns and down rows hidden channels.
Scaling each matrix on its own would give target neuron ``i`` gate row, up row and down column from three
different source neurons. Coupled scaling picks one set of intermediate neurons (gate and up rows, down
columns) and one set of hidden channels (gate and up columns, down rows) per layer, ranked by the summed
norms of the three matrices (kept or duplicated as :func:`unite_hf.llama_targets.ranked_indices` does),
so neuron ``i`` of the target is one real neuron of the source.

Registered as the scaling ``"coupled"`` of :func:`unite_hf.llama_targets.masa_init`, the default of
XPERT genes.
"""

from __future__ import annotations

import torch

from ...llama_targets import ranked_indices, register_scaling

__all__ = ["coupled_scale"]


@register_scaling("coupled")
def coupled_scale(matrices: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """``{gate, up: (I, H), down: (H, I)}`` -> the same at ``shapes``, with one neuron and one channel choice."""
    gate, up, down = (matrices[p].double() for p in ("gate", "up", "down"))
    if gate.shape != up.shape or down.shape != gate.T.shape:
        raise ValueError(f"coupled scaling needs gate/up (I, H) and down (H, I), got {gate.shape}, {up.shape}, {down.shape}")
    inter, hidden = shapes["gate"]
    neurons = ranked_indices(gate.norm(dim=1) + up.norm(dim=1) + down.norm(dim=0), inter)
    channels = ranked_indices(gate.norm(dim=0) + up.norm(dim=0) + down.norm(dim=1), hidden)
    return {proj: matrices[proj].double()[neurons if proj != "down" else channels][:, channels if proj != "down" else neurons]
            .to(matrices[proj].dtype) for proj in matrices}
