"""Helpers for fine-tuning UNITE targets with ``transformers.Trainer`` (and peft).

- :func:`load_accuracy_metric` loads the accuracy metric shipped in this package by path:
  ``evaluate.load("accuracy")`` fetches its script from the Hub, which an offline machine cannot.
- :func:`compute_accuracy` (classification, multiple choice) and :func:`compute_token_accuracy`
  (causal LM, with :func:`argmax_logits` as ``preprocess_logits_for_metrics``) plug into
  ``Trainer(compute_metrics=...)``.
- :func:`set_trainable` chooses what fine-tuning updates: ``"all"`` (the paper), ``"cores"`` (only
  the cores ``G_l`` and the task head: the hypothesis class of paper Theorem A.1, with the gene's
  bases and every copied weight frozen) or ``"heads"`` (a linear probe).
- :func:`attention_projection_names` lists the attention ``nn.Linear`` names of a target's family,
  for ``peft.LoraConfig(target_modules=...)``: they differ by family (``q_proj``/``v_proj`` for
  Mixtral, Qwen and OLMoE; ``q_b_proj``/``kv_b_proj`` and friends for DeepSeek-V3's MLA).

Example::

    from transformers import Trainer, TrainingArguments
    from unite_hf.training import compute_accuracy, set_trainable

    set_trainable(model, "cores")
    args = TrainingArguments("out", eval_strategy="epoch", gradient_checkpointing=True, report_to="none")
    Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
            compute_metrics=compute_accuracy).train()
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..modeling_unite import UniteFactorizedLinear, UnitePreTrainedModel

ACCURACY_METRIC_PATH: str = str(Path(__file__).resolve().parent / "metrics" / "accuracy")
"""Folder of the shipped ``evaluate`` accuracy module; ``evaluate.load(ACCURACY_METRIC_PATH)`` works offline."""

TrainableMode = Literal["all", "cores", "heads"]
TRAINABLE_MODES: tuple[str, ...] = ("all", "cores", "heads")

# Hugging Face's label for positions the loss ignores (padding, prompt tokens)
IGNORE_INDEX = -100


# -- metrics ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def load_accuracy_metric():
    """The shipped accuracy metric (an ``evaluate.Metric``), loaded by path, without the Hub.

    Cached: ``evaluate.load`` copies and imports the module, which is worth doing once per process.
    ``compute(predictions=..., references=...)`` keeps no state between calls, so sharing is safe.
    ``keep_in_memory``: without it every instance writes an Arrow cache file under a shared file lock,
    and a compute that raises leaves the lock held, stalling the next instance for seconds.
    """
    import evaluate

    return evaluate.load(ACCURACY_METRIC_PATH, keep_in_memory=True)


def _predictions_array(predictions) -> np.ndarray:
    # a model output with extra tensors reaches compute_metrics as a tuple whose first item is the logits
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    return np.asarray(predictions)


def compute_accuracy(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for sequence classification and multiple choice.

    Takes a ``transformers.EvalPrediction`` (or a ``(logits, labels)`` pair): logits ``(N, C)`` are
    argmaxed over the last axis, predictions already given as ids ``(N,)`` are used as they are.
    Returns ``{"accuracy": ...}`` from the shipped metric.
    """
    predictions, labels = eval_pred[0], eval_pred[1]
    predictions = _predictions_array(predictions)
    labels = np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    return load_accuracy_metric().compute(predictions=predictions.reshape(-1), references=labels.reshape(-1))


def correct_per_example(predictions, labels) -> list[int]:
    """1 where the argmaxed prediction equals the label, else 0, in evaluation order (the per-example
    outcomes that paired bootstrap intervals between two models on one eval set resample)."""
    predictions, labels = _predictions_array(predictions), np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    return (predictions.reshape(-1) == labels.reshape(-1)).astype(int).tolist()


def argmax_logits(logits, labels: torch.Tensor) -> torch.Tensor:
    """``preprocess_logits_for_metrics`` for causal LMs: keep next-token ids, not ``(B, T, V)`` logits,
    so that evaluation does not gather vocabulary-sized arrays."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(-1)


def compute_token_accuracy(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for causal LMs: next-token accuracy over positions whose label is not -100.

    Predictions are logits ``(B, T, V)`` or ids ``(B, T)`` (see :func:`argmax_logits`); the prediction
    at position t is scored against the label at t + 1, as the causal LM loss shifts them.
    """
    predictions, labels = eval_pred[0], eval_pred[1]
    predictions = _predictions_array(predictions)
    labels = np.asarray(labels)
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(-1)
    predictions, labels = predictions[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return load_accuracy_metric().compute(predictions=predictions[keep], references=labels[keep])


# -- what to train --------------------------------------------------------------------------------

def _unite_model(model: nn.Module) -> UnitePreTrainedModel:
    if not isinstance(model, UnitePreTrainedModel):
        raise TypeError(f"expected a UNITE target (UnitePreTrainedModel), got {type(model).__name__}; for a peft "
                        "model, choose what trains through its config (target_modules, modules_to_save).")
    return model


def core_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The cores ``G_l`` of every UNITE FFN, by parameter name."""
    cores = {id(m.core) for m in model.modules() if isinstance(m, UniteFactorizedLinear)}
    return {name: p for name, p in model.named_parameters() if id(p) in cores}


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head's parameters (``score`` or ``lm_head``), by name: everything outside the backbone.

    A head tied to the input embeddings is the embedding matrix; it is left out, so that freezing
    "everything but the head" keeps the copied embeddings frozen.
    """
    model = _unite_model(model)
    if not isinstance(getattr(model, model.base_model_prefix, None), nn.Module):
        return {}  # a bare UniteModel: all backbone, no head
    prefix = model.base_model_prefix + "."
    backbone = {id(p) for name, p in model.named_parameters() if name.startswith(prefix)}
    return {name: p for name, p in model.named_parameters()
            if not name.startswith(prefix) and id(p) not in backbone}


def set_trainable(model: nn.Module, mode: TrainableMode = "all") -> int:
    """Choose which parameters fine-tuning updates; returns the number of trainable parameters.

    - ``"all"``: every parameter (the paper fine-tunes everything).
    - ``"cores"``: only the cores ``G_l`` and the task head. The gene's bases, embeddings, attention,
      norms, shared experts and FFN biases are frozen: the hypothesis class of paper Theorem A.1.
    - ``"heads"``: only the task head (a linear probe on the grown backbone).

    ``transformers.Trainer`` builds its optimizer from the parameters with ``requires_grad``, so
    frozen parameters stay bit-identical. Call this before creating the Trainer.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; choose one of {', '.join(map(repr, TRAINABLE_MODES))} "
                         "('all': everything, 'cores': cores G_l + task head, 'heads': task head only)")
    model = _unite_model(model)
    if mode == "all":
        keep = {id(p) for p in model.parameters()}
    else:
        head = head_parameters(model)
        if not head:
            raise ValueError(f"{type(model).__name__} has no task head of its own; mode {mode!r} needs one "
                             "(use UniteForSequenceClassification, UniteForMultipleChoice or UniteForCausalLM).")
        keep = {id(p) for p in head.values()}
        if mode == "cores":
            cores = core_parameters(model)
            if not cores:
                raise ValueError("the model has no UNITE FFN cores to train (no FFN layers)")
            keep |= {id(p) for p in cores.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return count_trainable_parameters(model)


# -- resuming --------------------------------------------------------------------------------------

_CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` folder of ``output_dir`` with the highest ``N`` that Trainer finished saving, or
    None. ``Trainer._save_checkpoint`` creates the folder, saves the model (a UNITE target stages its files
    beside it and swaps them in), then the optimizer, scheduler and RNG states, and writes
    ``trainer_state.json`` last: a checkpoint is complete when that file holds a JSON object. A process
    killed during a save leaves the newest folder empty or partial, and ``get_last_checkpoint``, which
    ``resume_from_checkpoint=True`` uses, picks it anyway ("Can't find a valid checkpoint")."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(((int(m.group(1)), entry) for entry in folder.iterdir()
                    if (m := _CHECKPOINT_FOLDER.match(entry.name)) and entry.is_dir()), reverse=True)
    for _, checkpoint in steps:
        try:
            state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(state, dict):
            return str(checkpoint)
    return None


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def attention_projection_names(model: nn.Module) -> list[str]:
    """Names (last component) of the ``nn.Linear`` layers inside the attention modules, sorted.

    Pass them (or a subset, e.g. the query and value projections) to
    ``peft.LoraConfig(target_modules=...)``. The UNITE FFNs are not ``nn.Linear`` and never appear.
    """
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and any("attn" in p or "attention" in p for p in parts[:-1]):
            names.add(parts[-1])
    return sorted(names)


__all__ = [
    "ACCURACY_METRIC_PATH", "IGNORE_INDEX", "TRAINABLE_MODES", "argmax_logits", "attention_projection_names",
    "compute_accuracy", "compute_token_accuracy", "core_parameters", "count_trainable_parameters",
    "head_parameters", "last_complete_checkpoint", "load_accuracy_metric", "set_trainable",
]
