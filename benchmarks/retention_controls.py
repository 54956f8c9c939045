"""Controls for the retention benchmark: what a refit achieves without the source's knowledge.

- ``random_neurons``: a fusion (registered here, for the benchmark only) whose matrices are random
  Gaussian with the experts' own per-matrix standard deviation, seeded per layer; with ``refit="ridge"``
  (which replaces down) it is the "random features + least-squares readout" control at the same width
  and budget as a concat gene.
- :func:`linear_control`: per MoE layer, the least-squares linear map ``y = A x`` from the block's input to
  its routed output on the calibration windows (``d x d`` parameters per layer).

A gene's knowledge is its margin over the random-neuron control at the same budget.
"""

from __future__ import annotations

import torch

from unite_hf.fusion import FusionOptions, register_block_fusion
from unite_hf.refit.base import shared_output
from unite_hf.sources import get_source


@register_block_fusion("random_neurons", "none", "control: random gate/up neurons, zero down (refit it)",
                       variable_width=True)
def _random_neurons(block, importance, options: FusionOptions):
    expert = block.expert(0)
    width = options.width or block.num_experts * expert.up.shape[0]
    generator = torch.Generator().manual_seed(1000 + block.layer_idx)
    fused = {}
    for proj in block.projection_names():
        std = float(torch.stack([block.expert(i).projection(proj).detach() for i in range(block.num_experts)]).float().std())
        shape = (expert.down.shape[0], width) if proj == "down" else (width, expert.up.shape[1])
        fused[proj] = (torch.randn(shape, generator=generator) * std, None)
    return fused


def linear_control(model, input_ids: torch.Tensor, *, batch_size: int = 8, ridge: float = 1e-4) -> dict:
    """``{layer: fn}`` with ``fn(x) = x @ A^T``, ``A = argmin sum ||y - A x||^2 + lambda ||A||^2`` per MoE layer
    (``y``: the routed output, the block's output less its shared experts), fitted in float64 on
    ``input_ids``; ``lambda`` is ``ridge`` times the mean eigenvalue of ``X^T X``."""
    moe = get_source(model)
    grams, cross = {}, {}

    def hook(block):
        def record(module, args, output):
            x = args[0]
            out = output[0] if isinstance(output, tuple) else output
            shared = shared_output(block, x)
            y = (out if shared is None else out - shared).reshape(-1, x.shape[-1]).double()
            flat = x.reshape(-1, x.shape[-1]).double()
            grams[block.layer_idx] = grams.get(block.layer_idx, 0) + flat.T @ flat
            cross[block.layer_idx] = cross.get(block.layer_idx, 0) + y.T @ flat
        return record

    handles = [block.block.register_forward_hook(hook(block)) for block in moe.blocks]
    try:
        with torch.no_grad():
            for start in range(0, len(input_ids), batch_size):
                model(input_ids=input_ids[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for layer, gram in grams.items():
        lam = ridge * float(torch.linalg.eigvalsh(gram).clamp_min(0).mean())
        a = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), cross[layer].T).T.float()
        maps[layer] = lambda x, a=a: x @ a.T.to(x.dtype)
    return maps
