"""The normalised example schema, the task declaration (:class:`TaskSpec`) and the task errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import Features, Value

try:  # datasets >= 4
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - datasets 3.x
    from datasets import Sequence as _ListFeature

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
TaskFormat = Literal["classification", "multiple_choice"]
Source = Literal["auto", "local", "hub"]

DERIVED_SPLIT_SEED = 0
"""Seed of the train/validation split carved from one file when the other split has no file locally:
the validation file when there is no train file (PIQA, BoolQ here), the train file when there is no
validation file (HellaSwag here). Fixed, independent of ``load_task(seed=...)``: every run and every
seed of a benchmark evaluates on the same held-out examples."""
DERIVED_VALIDATION_FRACTION = 0.2
"""Share of the carved file that becomes the validation split (the rest is train)."""

EXAMPLE_FEATURES = Features({
    "id": Value("string"),
    "context": Value("string"),
    "choices": _ListFeature(Value("string")),
    "label": Value("int64"),
})
"""Schema of every normalised dataset, local or Hub, so both paths give identical features."""

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER_PROMPT = "Answer:"


class TaskLoadError(RuntimeError):
    """A task could be read neither from local files nor from the Hub (the message says why, for both)."""


@dataclass(frozen=True)
class HubSource:
    """One Hub dataset holding a task: ``datasets.load_dataset(path, name, split=...)``."""

    path: str
    name: str | None = None

    def __str__(self) -> str:
        return self.path if self.name is None else f"{self.path} ({self.name})"


@dataclass(frozen=True)
class TaskSpec:
    """A task declared as data.

    Attributes:
        name: registry key (``"arc_easy"``).
        pretty_name: for messages (``"ARC-Easy"``).
        num_choices: k, the most choices any item has: the width of the classification head and of
            the multiple-choice tensor.
        label_names: one name per label id (letters for multiple-choice tasks, class names otherwise),
            for ``config.id2label``.
        normalize: ``(raw_record, row_index) -> {"id", "context", "choices", "label"}``; reads the local
            file schema and the Hub schema alike.
        hub: Hub datasets to try, in order (the first that loads wins).
        local_dir: folder under the data dir; ``None`` for Hub-only tasks.
        local_files: split -> file name in ``local_dir``, or a tuple of candidate names tried in order
            (the first present wins; a name other than the first is said in the notes). A candidate may
            be a glob pattern (``"hellaswag_train_first*.jsonl"``) that must match at most one file.
            Files absent on disk are allowed when ``carve_from_validation`` / ``carve_from_train``
            covers the split.
        local_format: ``"ai2_jsonl"``, ``"jsonl"``, ``"piqa"`` (jsonl + ``<stem>-labels.lst``),
            ``"winogrande"`` (jsonl with ``answer``, checked against ``<stem>-labels.lst`` when present)
            or ``"tsv"``.
        carve_from_validation: when the train file is missing locally, split the validation file with
            :data:`DERIVED_SPLIT_SEED` into train and validation (and say so in the notes).
        kind: ``"multiple_choice"`` or ``"classification"`` (what the labels mean; both formats work).
        carve_from_train: when the validation file is missing locally, split the train file with
            :data:`DERIVED_SPLIT_SEED` into train and validation (and say so in the notes).
        blank: a marker in ``context`` that each choice fills (Winogrande's ``_``). The multiple-choice
            format then builds each sequence by putting the choice in place of the blank instead of
            appending ``"\nAnswer: {choice}"`` (see :func:`~unite_hf.training.tasks.format_multiple_choice_texts`);
            the classification format is unchanged (the sentence with its blank, the choices enumerated).
    """

    name: str
    pretty_name: str
    num_choices: int
    label_names: tuple[str, ...]
    normalize: Callable[[Mapping[str, Any], int], dict[str, Any]]
    hub: tuple[HubSource, ...]
    local_dir: str | None = None
    local_files: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    local_format: str = "jsonl"
    carve_from_validation: bool = False
    kind: Literal["multiple_choice", "classification"] = "multiple_choice"
    carve_from_train: bool = False
    blank: str | None = None

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_choices:
            raise ValueError(f"{self.name}: {len(self.label_names)} label names for {self.num_choices} choices")
        if not 2 <= self.num_choices <= len(_LETTERS):
            raise ValueError(f"{self.name}: num_choices must be in [2, {len(_LETTERS)}], got {self.num_choices}")
        for split, names in self.local_files.items():
            if not names or not all(isinstance(n, str) and n for n in ((names,) if isinstance(names, str) else names)):
                raise ValueError(f"{self.name}: local_files[{split!r}] must be a file name or a tuple of them, "
                                 f"got {names!r}")
        if self.blank is not None and not self.blank:
            raise ValueError(f"{self.name}: blank must be a non-empty marker or None")

    @property
    def hub_only(self) -> bool:
        return self.local_dir is None
