"""Padding a batch of tokenised task rows in either format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------
@dataclass
class TaskDataCollator:
    """Pads a batch of :func:`tokenize_task` rows in either format, on the tokenizer's padding side.

    Classification rows give ``input_ids``/``attention_mask`` ``[B, T]`` (like
    ``transformers.DataCollatorWithPadding``); multiple-choice rows give ``[B, k, T]``, every choice of
    every item padded to the batch's longest sequence. ``attention_mask`` marks real tokens, so
    last-token pooling on it works with ``padding_side="left"`` and ``"right"``. ``labels`` is ``[B]``.
    Columns other than ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels``/``label``
    are ignored.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    _PADDED = ("input_ids", "attention_mask", "token_type_ids")

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("empty batch")
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one, e.g. tokenizer.pad_token = tokenizer.eos_token "
                             "(the attention mask keeps pads out of pooling)")
        labels = [f["labels"] if "labels" in f else f.get("label") for f in features]
        first = features[0]["input_ids"]
        # [k][T] rows (lists, arrays or tensors) are multiple choice; flat [T] rows are classification
        multiple_choice = len(first) > 0 and (isinstance(first[0], (list, tuple)) or getattr(first[0], "ndim", 0) >= 1)

        def pick(feature: Mapping[str, Any]) -> dict[str, Any]:
            return {k: feature[k] for k in self._PADDED if k in feature}

        if multiple_choice:
            k = len(first)
            if any(len(f["input_ids"]) != k for f in features):
                raise ValueError("multiple-choice rows have different numbers of choices; "
                                 "tokenize_task pads them to the same k")
            flat = [{key: f[key][j] for key in self._PADDED if key in f} for f in features for j in range(k)]
            batch = self.tokenizer.pad(flat, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
                                       return_tensors=self.return_tensors)
            batch = {key: value.view(len(features), k, -1) for key, value in batch.items()}
        else:
            batch = dict(self.tokenizer.pad([pick(f) for f in features], padding=True,
                                            pad_to_multiple_of=self.pad_to_multiple_of,
                                            return_tensors=self.return_tensors))
        if all(label is not None for label in labels):
            batch["labels"] = torch.tensor([int(label) for label in labels], dtype=torch.long)
        return batch
