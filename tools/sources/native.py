"""A representative *native* MoE: a small Mixtral-style model trained from scratch on local text.

Unlike an upcycled MoE, its experts start from different random initialisations (each expert's
weights are drawn separately from one seeded ``torch.Generator``), so they are unrelated at the
start (pairwise cosine about 0) and whatever they share afterwards comes from training. Trained with
the load-balancing loss through ``transformers.Trainer`` on SimpleBooks-92 with the GPT-2 tokenizer
from the data folder; the last documents of the corpus are held out for the reported loss.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from unite_hf.io import sha256_of

from .cache import BuildOptions, SourceReport, cached_build, resolve_data_dir, tokenizer_fingerprint, train_and_measure

GPT2_TOKENIZER = "tokenizers/gpt2_tokenizer.json"

#: The model's defaults; the training defaults are sized to about 15 minutes on 2 idle CPU cores
#: (measured: see the README section).
NATIVE_DEFAULTS = dict(hidden_size=256, num_layers=4, num_heads=4, num_experts=8, top_k=2, intermediate_size=256)
NATIVE_TRAINING = BuildOptions.training_defaults(max_steps=200, batch_size=16, learning_rate=2e-3, num_held_out=64)


def gpt2_tokenizer(data_dir: str | os.PathLike | None = None):
    """The GPT-2 BPE tokenizer from ``<data_dir>/tokenizers/gpt2_tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    path = resolve_data_dir(data_dir) / GPT2_TOKENIZER
    if not path.is_file():
        raise FileNotFoundError(f"no GPT-2 tokenizer at {path}")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@torch.no_grad()
def init_native(config: Any, seed: int = 0) -> nn.Module:
    """A ``MixtralForCausalLM`` with every weight drawn from a seeded generator (no global RNG).

    Matrices, embeddings, routers and each expert's slices are ``N(0, initializer_range)``, drawn one
    after the other, so experts differ from the start; norms are ones.
    """
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = MixtralForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:  # RMSNorm weights
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * config.initializer_range)
    model.tie_weights()
    return model.eval()


def build_native(
    *,
    hidden_size: int = NATIVE_DEFAULTS["hidden_size"],
    num_layers: int = NATIVE_DEFAULTS["num_layers"],
    num_heads: int = NATIVE_DEFAULTS["num_heads"],
    num_experts: int = NATIVE_DEFAULTS["num_experts"],
    top_k: int = NATIVE_DEFAULTS["top_k"],
    intermediate_size: int = NATIVE_DEFAULTS["intermediate_size"],
    tokenizer: Any = None,
    **options: Any,
) -> nn.Module:
    """Train a small Mixtral from scratch on local text, once; later calls with the same settings load it.

    Args:
        hidden_size, num_layers, num_heads, num_experts, top_k, intermediate_size: the model
            (``intermediate_size`` per expert; tied embeddings; RoPE; as many KV heads as heads).
        tokenizer: default the GPT-2 tokenizer from the data folder (:func:`gpt2_tokenizer`).
        options: any field of :class:`~tools.sources.cache.BuildOptions` (``max_steps``, ``seq_len``,
            ``batch_size``, ``learning_rate``, ``aux_loss_coef``, ``seed``, ``num_held_out``, ``num_threads``
            (pinned for the build: the weights depend on it), ``data_dir``, ``text_file``, ``cache_dir``,
            ``force``, ``show_progress``); training defaults
            :data:`NATIVE_TRAINING`.

    Returns:
        the ``MixtralForCausalLM`` (eval mode, float32) with ``model.source_report``.
    """
    from transformers import MixtralConfig

    opts = BuildOptions(**{**NATIVE_TRAINING, **options})
    text_path = opts.text_path()
    tokenizer = tokenizer if tokenizer is not None else gpt2_tokenizer(opts.data_dir)
    settings = dict(
        tokenizer=tokenizer_fingerprint(tokenizer), text_sha256=sha256_of(text_path), hidden_size=hidden_size,
        num_layers=num_layers, num_heads=num_heads, num_experts=num_experts, top_k=top_k,
        intermediate_size=intermediate_size,
    )

    def build(report: SourceReport):
        eos = tokenizer.eos_token_id
        config = MixtralConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            num_local_experts=num_experts, num_experts_per_tok=top_k, max_position_embeddings=max(512, opts.seq_len),
            tie_word_embeddings=True, router_aux_loss_coef=opts.aux_loss_coef, router_jitter_noise=0.0,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=None, sliding_window=None,
        )
        model = init_native(config, opts.seed)
        train_and_measure(report, model, tokenizer, text_path, opts)
        return model, tokenizer

    return cached_build("native", settings, build, opts)
