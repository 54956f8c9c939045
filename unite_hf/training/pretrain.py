"""Short continued pretraining (causal LM) of a target on local text, before task fine-tuning.

MASA and XPERT's small-width targets keep random embeddings and attention; the papers pretrain them
further (MASA: 2B to 10B tokens) before SFT. This is the same step at a budget a CPU can afford; the
budget used is always reported with the results.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_PRETRAIN_CORPORA: tuple[str, ...] = ("simplebooks", "wikitext2")


class _TokenWindows(torch.utils.data.Dataset):
    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "labels": ids.clone()}


def continued_pretraining(
    model: nn.Module,
    tokenizer: Any,
    *,
    tokens: int,
    corpora: Any = DEFAULT_PRETRAIN_CORPORA,
    seq_len: int = 128,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    seed: int = 0,
    output_dir: str | os.PathLike = "runs/pretrain",
    show_progress: bool = True,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train a causal LM for ``tokens`` tokens of ``corpora`` (mixed in equal shares) with ``Trainer``;
    returns the budget and the training loss at the start and the end. ``data_dir``: the local folder
    of corpus aliases (default ``$UNITE_HF_DATA_DIR``)."""
    from transformers import Trainer, TrainingArguments

    from ..calibration import load_mixed_calibration

    if tokens < seq_len:
        raise ValueError(f"tokens={tokens} is less than one sequence of {seq_len}")
    corpora = [corpora] if isinstance(corpora, (str, os.PathLike)) else list(corpora)
    windows = load_mixed_calibration(corpora, tokenizer, num_sequences=max(len(corpora), math.ceil(tokens / seq_len)),
                                     seq_len=seq_len, seed=seed, show_progress=show_progress, data_dir=data_dir)
    args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=1, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, save_strategy="no", logging_steps=1, report_to=[], seed=seed,
        data_seed=seed, disable_tqdm=not show_progress, warmup_steps=0.06, lr_scheduler_type="cosine",
        weight_decay=0.01, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=_TokenWindows(windows.input_ids))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if not losses or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"continued pretraining produced non-finite losses: {losses[-5:]}")
    window = max(1, len(losses) // 10)
    return {"tokens": int(windows.input_ids.numel()), "corpus": windows.name, "steps": len(losses),
            "loss_start": round(sum(losses[:window]) / window, 4), "loss_end": round(sum(losses[-window:]) / window, 4),
            "output_dir": str(Path(output_dir))}
