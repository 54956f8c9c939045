"""Second moments of what each MoE layer's fused FFN receives, for activation-aware bases.

One inference pass over the calibration windows with forward pre-hooks on every MoE block collects
``E[x x^T]`` of the block's input hidden states (what gate and up see) and keeps a sample of those
inputs, from which the moment of down's input, ``h = act(gate x) * up x`` under the *fused*
weights, is computed once fusion is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .fusion import FusedBlock, fused_intermediate
from .sources import MoESource


@dataclass
class BlockInputs:
    """``moment``: ``E[x x^T]`` (hidden, hidden) float64 over all calibration tokens; ``sample``: up to
    ``max_tokens`` of those inputs (tokens, hidden), float32."""

    moment: torch.Tensor
    sample: torch.Tensor


def collect_block_inputs(model: nn.Module, source: MoESource, input_ids: torch.Tensor, *, batch_size: int = 8,
                         max_tokens: int = 4096, show_progress: bool = True) -> dict[int, BlockInputs]:
    """Input statistics of every MoE block over ``input_ids`` ``[N, T]`` (inference only)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    samples: dict[int, list[torch.Tensor]] = {}

    def hook(layer: int):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            moment = x.double().T @ x.double()
            sums[layer] = moment if layer not in sums else sums[layer] + moment
            counts[layer] = counts.get(layer, 0) + x.shape[0]
            kept = sum(len(t) for t in samples.setdefault(layer, []))
            if kept < max_tokens:
                samples[layer].append(x[: max_tokens - kept].cpu())
        return record

    handles = [model.get_submodule(block.name).register_forward_pre_hook(hook(block.layer_idx)) for block in source.blocks]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(input_ids), batch_size), desc="Input moments", unit="batch",
                              disable=not show_progress):
                model(input_ids=input_ids[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {layer: BlockInputs((sums[layer] / counts[layer]).cpu(), torch.cat(samples[layer])) for layer in sums}


def fused_hidden_moment(inputs: BlockInputs, fused: FusedBlock, activation) -> torch.Tensor:
    """``E[h h^T]`` of down's input ``h = act(gate x) * up x`` (or ``act(up x)``) under the fused weights."""
    h = fused_intermediate(fused, activation, inputs.sample)
    h = h.double()
    return h.T @ h / len(h)
