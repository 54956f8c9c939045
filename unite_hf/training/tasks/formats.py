"""The two tokenised formats: classification (choices enumerated) and multiple choice (k sequences)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from datasets import Dataset

from .loading import TaskData
from .registry import _choice_counts
from .schema import _ANSWER_PROMPT, _LETTERS, TaskFormat

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Tokenisation: the two formats
# --------------------------------------------------------------------------------------------------
def _classification_suffix(choices: Sequence[str]) -> str:
    return "".join(f"\n{_LETTERS[i]}. {choice}" for i, choice in enumerate(choices)) + f"\n{_ANSWER_PROMPT}"


def _choice_suffix(choice: str) -> str:
    # An empty (padding) choice ends on "Answer:" without a dangling space
    return f"\n{_ANSWER_PROMPT} {choice}" if choice else f"\n{_ANSWER_PROMPT}"


def format_classification_text(example: Mapping[str, Any]) -> str:
    """The paper's single sequence: context, the choices enumerated ``A.``, ``B.``, ..., then ``Answer:``."""
    return example["context"] + _classification_suffix(example["choices"])


def format_multiple_choice_texts(example: Mapping[str, Any], num_choices: int | None = None, *,
                                 blank: str | None = None) -> list[str]:
    """One ``"{context}\\nAnswer: {choice}"`` per choice, padded with empty choices to ``num_choices``.

    With ``blank`` (Winogrande's ``_``, :attr:`TaskSpec.blank`), each text is instead the context with the
    choice in place of the blank, ``"{before}{choice}{after}"``: the standard Winogrande substitution.
    Padding choices leave the blank as it is.
    """
    choices = list(example["choices"])
    choices += [""] * max(0, (num_choices or len(choices)) - len(choices))
    if blank is not None:
        before, after = _split_at_blank(example["context"], blank)
        return [before + _blank_suffix(choice, after, blank) for choice in choices]
    return [example["context"] + _choice_suffix(choice) for choice in choices]


def _split_at_blank(context: str, blank: str) -> tuple[str, str]:
    if blank not in context:
        raise ValueError(f"context {context[:80]!r} has no blank {blank!r} for the choices to fill")
    before, after = context.split(blank, 1)
    return before, after


def _blank_suffix(choice: str, after: str, blank: str) -> str:
    return (choice or blank) + after


class _Fit(NamedTuple):
    """One sequence fitted into ``max_length`` by :func:`_fit_context`."""

    ids: list[int]
    kept: str  # the context that was kept
    cut: int  # tokens of the context's own tokenisation that were removed
    whole: bool  # the whole (non-empty) context was removed
    over: int  # the answer part alone is longer than max_length: its length (the sequence's), else 0


def _fit_context(tokenizer: Any, context: str, suffix: str, max_length: int, side: str, ids: list[int]) -> _Fit:
    """Cut whole tokens off ``context`` (at ``side``) until ``context + suffix`` fits in ``max_length`` tokens.

    Truncation happens on the text, which is then re-tokenised, so the ids always decode to exactly
    ``kept_context + suffix``. ``suffix`` is the answer part (the enumerated choices and the final
    ``Answer:``; ``"\\nAnswer: {choice}"``; or a Winogrande option and the rest of its sentence) and is
    never cut: last-token pooling reads its end, and a cut inside it would score a different question.
    ``ids`` are those of the uncut text. If even an empty context leaves ``suffix`` too long, the
    sequence is ``suffix`` alone, longer than ``max_length`` (``over`` says by how much;
    :func:`tokenize_task` counts such items in the notes).
    """
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    kept, drop = context, len(ids) - max_length
    while len(ids) > max_length and drop < len(offsets):
        kept = context[offsets[drop][0]:] if side == "left" else context[:offsets[len(offsets) - drop - 1][1]]
        ids = tokenizer(kept + suffix)["input_ids"]
        drop += max(1, len(ids) - max_length)  # a re-tokenised boundary can shift by a token: cut again
    if len(ids) > max_length:
        kept, ids = "", tokenizer(suffix)["input_ids"]
    left = len(tokenizer(kept, add_special_tokens=False)["input_ids"]) if kept else 0
    return _Fit(ids, kept, len(offsets) - left, bool(offsets) and not kept.strip(),
                len(ids) if len(ids) > max_length else 0)


# Per item, beside the ids: tokens cut from its context, whether all of it, its length when its answer part
# alone exceeds max_length (0 otherwise), and its uncut length. Read, then dropped, by tokenize_task.
_STATS = ("_cut", "_whole", "_over", "_full")


def _encode_classification(tokenizer: Any, contexts: list[str], suffixes: list[str], max_length: int,
                           side: str) -> tuple[list[list[int]], dict[str, list[int]]]:
    """Batch-tokenise ``context + suffix``; only the rare too-long rows take the slow fitting path."""
    all_ids = tokenizer([c + s for c, s in zip(contexts, suffixes)])["input_ids"]
    out, stats = [], {key: [] for key in _STATS}
    for ids, context, suffix in zip(all_ids, contexts, suffixes):
        fit = _Fit(ids, context, 0, False, 0) if len(ids) <= max_length else _fit_context(
            tokenizer, context, suffix, max_length, side, ids)
        out.append(fit.ids)
        for key, value in zip(_STATS, (fit.cut, int(fit.whole), fit.over, len(ids))):
            stats[key].append(value)
    return out, stats


def _encode_multiple_choice(tokenizer: Any, contexts: list[str], suffixes: list[list[str]], max_length: int,
                            side: str) -> tuple[list[list[list[int]]], dict[str, list[int]]]:
    """``[B][k][T_i]`` ids. A too-long item has its context cut once, for its longest choice, so that
    all k sequences of the item share the same context (the choices then differ only in their answer)."""
    k = len(suffixes[0]) if suffixes else 0
    flat = tokenizer([c + s for c, row in zip(contexts, suffixes) for s in row])["input_ids"]
    out, stats = [], {key: [] for key in _STATS}
    for i, (context, row) in enumerate(zip(contexts, suffixes)):
        ids = flat[i * k:(i + 1) * k]
        full = max(map(len, ids))
        cut, whole, over = 0, False, 0
        longest = max(range(k), key=lambda j: len(ids[j]))
        if len(ids[longest]) > max_length:
            fit = _fit_context(tokenizer, context, row[longest], max_length, side, ids[longest])
            ids = tokenizer([fit.kept + s for s in row])["input_ids"]
            fits = [_fit_context(tokenizer, fit.kept, s, max_length, side, x) if len(x) > max_length else None
                    for x, s in zip(ids, row)]
            ids = [x if f is None else f.ids for x, f in zip(ids, fits)]
            again = [f for f in fits if f is not None]
            cut = fit.cut + max((f.cut for f in again), default=0)
            whole = fit.whole or any(f.whole for f in again)
            over = max([fit.over, *(f.over for f in again)])
        out.append(ids)
        for key, value in zip(_STATS, (cut, int(whole), over, full)):
            stats[key].append(value)
    return out, stats


@dataclass(frozen=True)
class _TokenizeFn:
    tokenizer: Any
    format: str
    num_choices: int
    max_length: int
    side: str
    blank: str | None = None

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        contexts, choices = batch["context"], batch["choices"]
        if self.format == "classification":
            ids, stats = _encode_classification(self.tokenizer, contexts, [_classification_suffix(c) for c in choices],
                                                self.max_length, self.side)
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": batch["label"],
                    **stats}
        # multiple choice: k suffixes per item, short items padded with empty choices
        padded = [list(options) + [""] * (self.num_choices - len(options)) for options in choices]
        if self.blank is not None:
            # "{before}{choice}{after}": the text before the blank is the cuttable context, and the choice
            # with the rest of the sentence is the answer part, kept whole
            parts = [_split_at_blank(c, self.blank) for c in contexts]
            contexts = [before for before, _ in parts]
            suffixes = [[_blank_suffix(o, after, self.blank) for o in row] for row, (_, after) in zip(padded, parts)]
        else:
            suffixes = [[_choice_suffix(o) for o in row] for row in padded]
        ids, stats = _encode_multiple_choice(self.tokenizer, contexts, suffixes, self.max_length, self.side)
        return {"input_ids": ids, "attention_mask": [[[1] * len(x) for x in row] for row in ids],
                "labels": batch["label"], **stats}


def tokenize_task(
    task_data: TaskData | Dataset,
    tokenizer: Any,
    format: TaskFormat = "classification",
    max_length: int = 256,
    *,
    num_choices: int | None = None,
    truncation_side: Literal["left", "right"] = "left",
    batch_size: int = 1000,
    num_proc: int | None = None,
    blank: str | None = None,
) -> Dataset:
    """Tokenise normalised examples for a model head.

    Args:
        task_data: a :class:`TaskData` (or a ``Dataset`` of normalised examples).
        tokenizer: a Hugging Face tokenizer; a fast one for the truncation of long contexts (it uses
            offsets). Special tokens (BOS, ...) are added as the tokenizer does by default.
        format: ``"classification"``: one sequence (:func:`format_classification_text`), ``input_ids``
            ``[T]``; ``"multiple_choice"``: k sequences (:func:`format_multiple_choice_texts`),
            ``input_ids`` ``[k][T_i]``, padded to k with empty choices. For a task with a
            :attr:`TaskSpec.blank` (Winogrande) the k sequences are the sentence with each choice in
            place of the blank. Scored as lm-eval-harness's *partial* Winogrande scoring is laid out: the
            text after the blank is the same continuation in every sequence and the multiple-choice
            head reads its last token (last-token pooling), so the k scores differ only by what fills
            the blank before it. (lm-eval sums the continuation's log-likelihood; here a trained head
            scores the pooled state.)
        max_length: most tokens per sequence. Long contexts lose whole tokens at ``truncation_side``
            (default ``"left"``: the end of the context, next to the question and answers, is kept).
            The answer part (the enumerated choices and the final ``Answer:``; ``Answer:`` and the
            choice; a Winogrande option and the rest of its sentence) is never cut: an item whose answer
            part alone is longer than ``max_length`` becomes that answer part alone, longer than
            ``max_length``. What was cut, and any such item, is logged and, for a :class:`TaskData`,
            added to its ``notes`` (which ``finetune`` writes into its result): how many items, how many
            context tokens they lost, and the ``max_length`` that would avoid it.
        num_choices: k; default the task's. Items with more choices than k are dropped (logged, and
            noted like cuts).
        batch_size, num_proc: passed to ``Dataset.map``.
        blank: the blank marker for the substitution above; default the task's :attr:`TaskSpec.blank`
            when ``task_data`` is a :class:`TaskData` (a bare ``Dataset`` carries no spec: pass
            ``blank="_"`` for normalised Winogrande examples).

    Returns:
        A ``Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (no padding: use
        :class:`TaskDataCollator`).
    """
    if format not in ("classification", "multiple_choice"):
        raise ValueError(f"format must be 'classification' or 'multiple_choice', got {format!r}")
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
    if max_length < 8:
        raise ValueError(f"max_length={max_length} is too small to hold a prompt")
    dataset = task_data.dataset if isinstance(task_data, TaskData) else task_data
    if len(dataset) == 0:
        raise ValueError("cannot tokenise an empty dataset")
    if num_choices is None:
        num_choices = task_data.num_choices if isinstance(task_data, TaskData) else max(_choice_counts(dataset))
    if not 2 <= num_choices <= len(_LETTERS):
        raise ValueError(f"num_choices must be in [2, {len(_LETTERS)}], got {num_choices}")

    what = f"{task_data.spec.pretty_name} {task_data.split}" if isinstance(task_data, TaskData) else "tokenize_task"
    notes: list[str] = []
    too_many = [i for i, n in enumerate(_choice_counts(dataset)) if n > num_choices]
    if too_many:
        notes.append(f"{what}: {len(too_many)} of {len(dataset)} items have more than num_choices={num_choices} "
                     f"choices and were dropped.")
        dropped = set(too_many)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
        if len(dataset) == 0:
            raise ValueError(f"no item has at most {num_choices} choices")

    if blank is None and isinstance(task_data, TaskData):
        blank = task_data.spec.blank
    fn = _TokenizeFn(tokenizer, format, num_choices, max_length, truncation_side, blank)
    tokenized = dataset.map(fn, batched=True, batch_size=batch_size, num_proc=num_proc,
                            remove_columns=dataset.column_names, desc=f"tokenising ({format})")
    table = tokenized.with_format("arrow")
    cut, whole, over, full = (table[key].to_pylist() for key in _STATS)
    tokenized = tokenized.remove_columns(list(_STATS))
    n_cut = [c for c in cut if c]
    if n_cut:
        lost_all, low, high = sum(whole), min(n_cut), max(n_cut)
        span = f"{low} token{'s' if low > 1 else ''}" if low == high else f"{low}-{high} tokens"
        notes.append(
            f"{what} ({format}, max_length={max_length}): {len(n_cut)} of {len(cut)} items were cut to fit, their "
            f"context losing {span} (mean {sum(n_cut) / len(n_cut):.1f}, {sum(n_cut)} in all) at the "
            f"{truncation_side}" + (f"; {lost_all} of them lost their whole context" if lost_all else "")
            + f". The answer part is never cut; max_length={max(full)} would keep every item whole.")
    n_over = [n for n in over if n]
    if n_over:
        answer_part = ("the enumerated choices and the final 'Answer:'" if format == "classification" else
                       "an option and the rest of the sentence after the blank" if blank is not None else
                       "'Answer:' and a choice")
        alternative = ", or format='multiple_choice' (one choice per sequence)" if format == "classification" else ""
        notes.append(
            f"{what} ({format}, max_length={max_length}): for {len(n_over)} of {len(over)} items the answer part "
            f"({answer_part}) alone is longer than max_length, up to {max(n_over)} tokens. It is never cut, so "
            f"these items are their answer part alone, without any context, and longer than max_length. Use "
            f"max_length >= {max(n_over)} to keep them within it{alternative}.")
    for note in notes:
        logger.warning(note)
        if isinstance(task_data, TaskData) and note not in task_data.notes:
            task_data.notes.append(note)
    return tokenized
