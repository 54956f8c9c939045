"""Task readers: nine benchmark tasks as one normalised schema, in two tokenised formats.

Every task, read from local files or from the Hugging Face Hub, becomes a :class:`datasets.Dataset`
of *normalised examples*::

    {"id": str, "context": str, "choices": list[str], "label": int}

- **Multiple-choice tasks** (ARC-Easy, ARC-Challenge, OpenBookQA, PIQA, HellaSwag, Winogrande):
  ``context`` is the question / goal / story start / sentence with its ``_`` blank, ``choices`` are the
  answer texts, ``label`` is the index of the right one. Winogrande's multiple-choice sequences are the
  sentence with each option in place of the blank (:attr:`TaskSpec.blank`), not ``"Answer: {option}"``.
- **Text-classification tasks** (GLUE-RTE, BoolQ, SST-2): ``context`` holds the whole input text
  (``"Premise: ...\\nHypothesis: ..."``, ``"Passage: ...\\nQuestion: ...?"``, the sentence) and
  ``choices`` are the class names (``entailment/not_entailment``, ``no/yes``, ``negative/positive``),
  so ``label`` is the class id and both model formats below apply unchanged.
- ``label`` is ``-1`` for unlabelled records (the Hub's test splits of GLUE, PIQA, HellaSwag and
  Winogrande); :class:`TaskData.notes` says so.

The registry :data:`TASKS` declares each task as data (:class:`TaskSpec`): Hub ids, local files,
label names and one ``normalize(record, index)`` function that reads *both* the local file schema and
the Hub schema. The Hub path is a thin ``datasets.load_dataset`` call followed by
:func:`normalize_dataset`, the same function tests feed with hand-built Hub-schema datasets.

Two tokenised formats (:func:`tokenize_task`):

- ``"classification"`` (the paper's A.2.5 format, for ``AutoModelForSequenceClassification`` with a
  k-way head): one sequence per example, context then every choice enumerated, ending in
  ``"Answer:"`` so that last-token pooling sees the whole question::

      {context}
      A. {choice 0}
      B. {choice 1}
      Answer:

- ``"multiple_choice"`` (for ``AutoModelForMultipleChoice``): k sequences per example,
  ``"{context}\\nAnswer: {choice}"``; ``input_ids`` is ``[k][T_i]`` and the collator pads to ``[B, k, T]``.

``k`` is the task's :attr:`TaskSpec.num_choices`, the most choices any item has (ARC: 5, since a few
ARC items have 5). Items with fewer choices are *kept*: in the classification format only their real
choices are enumerated and the extra logits are simply never the answer; in the multiple-choice format
they get empty placeholder choices (``"{context}\\nAnswer:"``) that are never the answer. No item of
an official split is dropped, so accuracies are on the full split. Passing a smaller ``num_choices``
to :func:`tokenize_task` drops the items with more choices (logged).

Example::

    from unite_hf.training.tasks import load_task, tokenize_task, TaskDataCollator

    train = load_task("arc_easy", "train", train_fraction=0.25, seed=1)
    dev = load_task("arc_easy", "validation")
    for note in train.notes:
        print(note)
    train_tok = tokenize_task(train, tokenizer, format="multiple_choice", max_length=256)
    collator = TaskDataCollator(tokenizer)      # pads [B, T] or [B, k, T], left or right

Layout of this package: :mod:`.schema` (the example schema, :class:`TaskSpec`, errors), :mod:`.registry`
(the built-in tasks, lookup and normalisation), :mod:`.loading` (local files, the Hub, :func:`load_task`),
:mod:`.formats` (the two tokenised formats) and :mod:`.collator`. Every name importable from
``unite_hf.training.tasks`` before the split still is.
"""

from __future__ import annotations

from .collator import TaskDataCollator
from .formats import format_classification_text, format_multiple_choice_texts, tokenize_task
from .loading import TaskData, load_task
from .registry import TASK_ALIASES, TASKS, get_task_spec, normalize_dataset, register_task
from .schema import (
    DERIVED_SPLIT_SEED,
    DERIVED_VALIDATION_FRACTION,
    EXAMPLE_FEATURES,
    SPLITS,
    HubSource,
    Source,  # noqa: F401  (a type, re-exported)
    Split,  # noqa: F401  (a type, re-exported)
    TaskFormat,
    TaskLoadError,
    TaskSpec,
)

__all__ = [
    "DERIVED_SPLIT_SEED", "DERIVED_VALIDATION_FRACTION", "EXAMPLE_FEATURES", "SPLITS", "TASKS", "TASK_ALIASES",
    "HubSource", "TaskData", "TaskDataCollator", "TaskFormat", "TaskLoadError", "TaskSpec",
    "format_classification_text", "format_multiple_choice_texts", "get_task_spec", "load_task", "normalize_dataset",
    "register_task", "tokenize_task",
]
