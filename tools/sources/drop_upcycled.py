"""A representative *diverged* upcycled MoE: Drop-Upcycling (Nakamura et al., ICLR 2025) of a dense LM.

Sparse upcycling (:mod:`tools.sources.upcycled`) starts every expert as the same copy of the dense
FFN, and a short continued training leaves them nearly identical (pairwise cosine about 1). Drop-
Upcycling breaks that symmetry with partial re-initialisation, so the experts differ from the start
and still carry the parent's pretrained knowledge:

1. Every FFN of a dense Llama-family causal LM (SmolLM2-135M-Instruct by default) is copied into each
   of ``num_experts`` experts at full width, exactly (no multiplicative noise); attention, norms,
   embeddings and ``lm_head`` are copied; each router starts ``N(0, router_std)`` (as
   :func:`tools.sources.upcycled.upcycle` does).
2. In each expert, a random subset of ``round(drop_ratio * intermediate_size)`` intermediate neurons
   (``drop_ratio=0.5`` as in the paper) is re-initialised: those rows of ``gate_proj`` and
   ``up_proj`` and the matching columns of ``down_proj`` are re-drawn from a normal distribution
   with the mean and standard deviation of the parent's whole matrix of that layer. Each expert has
   its own ``torch.Generator``, seeded from ``(seed, layer, expert)`` (:func:`expert_seed`), which
   draws both its subset and its new values; the other neurons stay the parent's, bit for bit.
3. Continued MoE training with the load-balancing loss through ``transformers.Trainer`` on local
   text (SimpleBooks-92), the same helper as the other builds.

With ``drop_ratio=r`` two experts share the ``(1 - r)^2`` of neurons kept in both, so their mean
pairwise cosine starts near ``(1 - r)^2`` (0.25 at ``r=0.5``; a little more from the matrices'
means). The report has it before and after training, the held-out perplexity before and after and
that of the dense parent on the same windows (``extra["held_out_parent"]``).

**Budget.** The paper trains for hundreds of billions of tokens; the defaults here
(:data:`DROP_UPCYCLED_TRAINING`: 40 steps of 4 windows of 128 tokens, 20k tokens) are sized to about
20 minutes on 2 CPU cores for SmolLM2-135M, measured from 6 steps on the shared 2-core machine
(about 30 s a step at 2 pinned threads, about 3 minutes to load the parent and for the three
held-out passes; 13.6 GB peak memory). That is far fewer steps than the re-drawn neurons need to
recover, and fewer than the upcycled build's 80 (each step costs the same; the upcycled default is
the optimistic one): the trained source keeps diverged experts and the parent's kept neurons, but
its held-out perplexity stays well above its parent's. It is a realistic *expert geometry* for
benchmarks, not a converged Drop-Upcycled model; pass ``max_steps=`` for more.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from tools.moefy import _FFN_PROJS

from .cache import BuildOptions, SourceReport
from .upcycled import build_from_dense, upcycle

#: The model's defaults (``drop_ratio`` as in the paper).
DROP_UPCYCLED_DEFAULTS = dict(num_experts=8, top_k=2, drop_ratio=0.5, router_std=0.02)
#: Training defaults: about 20 minutes on 2 CPU cores for SmolLM2-135M (fewer steps than the recipe would
#: want; see the module docstring).
DROP_UPCYCLED_TRAINING = BuildOptions.training_defaults(max_steps=40, batch_size=4, learning_rate=3e-4,
                                                        num_held_out=32)


def expert_seed(seed: int, layer: int, expert: int) -> int:
    """The seed of one expert's generator: 63 bits of SHA-256 of ``(seed, layer, expert)``.

    Independent of the number of experts and layers and of the order they are drawn in.
    """
    digest = hashlib.sha256(f"drop-upcycling:{seed}:{layer}:{expert}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dropped_neurons(intermediate_size: int, drop_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of the ``round(drop_ratio * intermediate_size)`` neurons one expert re-draws."""
    num = round(drop_ratio * intermediate_size)
    return torch.randperm(intermediate_size, generator=gen)[:num].sort().values


@torch.no_grad()
def drop_upcycle(dense: nn.Module, num_experts: int = 8, top_k: int = 2, *, drop_ratio: float = 0.5,
                 router_std: float = 0.02, aux_loss_coef: float = 0.01, seed: int = 0) -> nn.Module:
    """A ``MixtralForCausalLM`` whose experts are copies of ``dense``'s FFN with ``drop_ratio`` of neurons re-drawn.

    ``dense`` (as for :func:`tools.sources.upcycled.upcycle`) is not modified. Per layer, each matrix's
    mean and standard deviation (``torch.std_mean`` of the parent's ``gate_proj``, ``up_proj``,
    ``down_proj`` weight, in float32) parameterise the normal distribution that expert ``e``'s dropped
    neurons (:func:`dropped_neurons`, drawn by a generator seeded with :func:`expert_seed`) are
    re-drawn from: rows of gate and up, columns of down. ``drop_ratio=0`` is plain upcycling without
    noise (function preserving before training).
    """
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}")
    moe = upcycle(dense, num_experts, top_k, noise=0.0, router_std=router_std, aux_loss_coef=aux_loss_coef,
                  seed=seed)
    inter = dense.config.intermediate_size
    for idx, layer in enumerate(dense.model.layers):
        stats = {proj: torch.std_mean(getattr(layer.mlp, proj).weight.float()) for proj in _FFN_PROJS}
        experts = moe.model.layers[idx].mlp.experts
        dtype = experts.gate_up_proj.dtype
        for expert in range(num_experts):
            gen = torch.Generator().manual_seed(expert_seed(seed, idx, expert))
            rows = dropped_neurons(inter, drop_ratio, gen)
            if rows.numel() == 0:
                continue
            hidden = experts.down_proj.shape[1]
            for offset, proj in ((0, "gate_proj"), (inter, "up_proj")):  # gate first in gate_up_proj
                std, mean = stats[proj]
                experts.gate_up_proj[expert, offset + rows] = (
                    torch.randn(rows.numel(), hidden, generator=gen) * std + mean).to(dtype)
            std, mean = stats["down_proj"]
            experts.down_proj[expert][:, rows] = (torch.randn(hidden, rows.numel(), generator=gen) * std + mean).to(dtype)
    return moe.eval()


def build_drop_upcycled(
    dense: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    num_experts: int = DROP_UPCYCLED_DEFAULTS["num_experts"],
    top_k: int = DROP_UPCYCLED_DEFAULTS["top_k"],
    drop_ratio: float = DROP_UPCYCLED_DEFAULTS["drop_ratio"],
    router_std: float = DROP_UPCYCLED_DEFAULTS["router_std"],
    **options: Any,
) -> nn.Module:
    """Drop-upcycle ``dense`` into a ``MixtralForCausalLM`` and train it on local text, once; later calls load it.

    Args:
        dense: a dense ``LlamaForCausalLM``/``MistralForCausalLM``; ``None`` loads SmolLM2-135M-Instruct
            with :func:`tools.demo.real_dense_source` (only when the source is not cached yet).
        tokenizer: the dense model's tokenizer; required when ``dense`` is given.
        num_experts, top_k: experts per layer and experts per token.
        drop_ratio: fraction of each expert's intermediate neurons re-initialised (see the module docstring).
        router_std: standard deviation of the random router weights.
        options: any field of :class:`~tools.sources.cache.BuildOptions` (``max_steps``, ``seq_len``,
            ``batch_size``, ``learning_rate``, ``aux_loss_coef``, ``seed``, ``num_held_out``,
            ``num_threads``, ``data_dir``, ``text_file``, ``cache_dir``, ``force``, ``show_progress``);
            training defaults :data:`DROP_UPCYCLED_TRAINING` (fewer steps than the recipe would want:
            see the module docstring).

    Returns:
        the ``MixtralForCausalLM`` (eval mode, float32 unless ``dense`` is otherwise), with its
        :class:`~tools.sources.cache.SourceReport` as ``model.source_report``.
    """
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio}")

    def make(dense: nn.Module, opts: BuildOptions, report: SourceReport) -> nn.Module:
        report.extra["dropped_neurons_per_expert"] = round(drop_ratio * dense.config.intermediate_size)
        report.extra["intermediate_size"] = dense.config.intermediate_size
        return drop_upcycle(dense, num_experts, top_k, drop_ratio=drop_ratio, router_std=router_std,
                            aux_loss_coef=opts.aux_loss_coef, seed=opts.seed)

    return build_from_dense("drop_upcycled", dense, tokenizer, {**DROP_UPCYCLED_TRAINING, **options}, make,
                            measure_parent=True, num_experts=num_experts, top_k=top_k, drop_ratio=drop_ratio,
                            router_std=router_std)
