"""Task readers: nine benchmark tasks as one normalised schema, in two tokenised formats.

Every task, read from local files or from the Hugging Face Hub, becomes a :class:`datasets.Dataset`
of *normalised examples*::

    {"id": str, "context": str, "choices": list[str], "label": int}

- **Multiple-choice tasks** (ARC-Easy, ARC-Challenge, OpenBookQA, PIQA, HellaSwag, Winogrande):
  ``context`` is the question / goal / story start / sentence with its ``_`` blank, ``choices`` are the
  answer texts, ``label`` is the index of the right one.
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
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Value

try:  # datasets >= 4
    from datasets import List as _ListFeature
except ImportError:  # pragma: no cover - datasets 3.x
    from datasets import Sequence as _ListFeature

from ..calibration import DATA_DIR_ENV, find_local_data_dir

logger = logging.getLogger(__name__)

__all__ = [
    "DERIVED_SPLIT_SEED", "DERIVED_VALIDATION_FRACTION", "EXAMPLE_FEATURES", "SPLITS", "TASKS", "TASK_ALIASES",
    "HubSource", "TaskData", "TaskDataCollator", "TaskFormat", "TaskLoadError", "TaskSpec",
    "format_classification_text", "format_multiple_choice_texts", "get_task_spec", "load_task", "normalize_dataset",
    "register_task", "tokenize_task",
]

Split = Literal["train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
TaskFormat = Literal["classification", "multiple_choice"]
Source = Literal["auto", "local", "hub"]

DERIVED_SPLIT_SEED = 0
"""Seed of the train/validation split carved from a validation file when no train file exists locally
(PIQA, BoolQ here). Fixed, independent of ``load_task(seed=...)``: every run and every seed of a
benchmark evaluates on the same held-out examples."""
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


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
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
        local_files: split -> file name in ``local_dir``. Files absent on disk are allowed when
            ``carve_from_validation`` covers the split.
        local_format: ``"ai2_jsonl"``, ``"jsonl"``, ``"piqa"`` (jsonl + ``<stem>-labels.lst``) or ``"tsv"``.
        carve_from_validation: when the train file is missing locally, split the validation file with
            :data:`DERIVED_SPLIT_SEED` into train and validation (and say so in the notes).
        kind: ``"multiple_choice"`` or ``"classification"`` (what the labels mean; both formats work).
    """

    name: str
    pretty_name: str
    num_choices: int
    label_names: tuple[str, ...]
    normalize: Callable[[Mapping[str, Any], int], dict[str, Any]]
    hub: tuple[HubSource, ...]
    local_dir: str | None = None
    local_files: Mapping[str, str] = field(default_factory=dict)
    local_format: str = "jsonl"
    carve_from_validation: bool = False
    kind: Literal["multiple_choice", "classification"] = "multiple_choice"

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_choices:
            raise ValueError(f"{self.name}: {len(self.label_names)} label names for {self.num_choices} choices")
        if not 2 <= self.num_choices <= len(_LETTERS):
            raise ValueError(f"{self.name}: num_choices must be in [2, {len(_LETTERS)}], got {self.num_choices}")

    @property
    def hub_only(self) -> bool:
        return self.local_dir is None


# -- normalisers: one per schema family; each reads the local and the Hub spelling ----------------
def _record_id(record: Mapping[str, Any], index: int, *keys: str) -> str:
    for key in keys:
        value = record.get(key)
        if value is not None and value != "":
            return str(value)
    return str(index)


def _text(value: Any) -> str:
    return str(value).strip()


def _int_label(value: Any, names: Sequence[str] = ()) -> int:
    """A label given as int, bool, digit string or class name; ``None``, ``""`` and ``-1`` -> -1."""
    if value is None or value == "":
        return -1
    if isinstance(value, bool):  # before int: bool is an int subclass
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lower() in ("true", "false"):  # BoolQ's local copy spells its labels as JSON strings
        return int(text.lower() == "true")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read label {value!r} (expected an int or one of {list(names)})") from None


def _normalize_ai2(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """ARC / OpenBookQA.

    Local AI2 jsonl: ``{"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``.
    Hub ``allenai/ai2_arc``: ``{"id", "question": str, "choices": {"text": [...], "label": [...]}, "answerKey"}``.
    Hub ``allenai/openbookqa`` (main): like ARC with ``question_stem`` instead of ``question``.
    Choice labels are ``A``-``E`` or ``1``-``5``; the answer is looked up among them, not assumed to be A-D.
    """
    question = record.get("question")
    if isinstance(question, Mapping):
        stem, choices = question["stem"], question["choices"]
    else:
        stem = record["question_stem"] if record.get("question_stem") is not None else question
        choices = record["choices"]
    if isinstance(choices, Mapping):
        texts, keys = list(choices["text"]), [str(k).strip() for k in choices["label"]]
    else:
        texts, keys = [c["text"] for c in choices], [str(c["label"]).strip() for c in choices]
    answer = str(record.get("answerKey") or "").strip()
    if answer and answer not in keys:
        raise ValueError(f"answerKey {answer!r} is not among the choice labels {keys}")
    return {
        "id": _record_id(record, index, "id"),
        "context": _text(stem),
        "choices": [_text(t) for t in texts],
        "label": keys.index(answer) if answer else -1,
    }


def _normalize_piqa(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """PIQA: ``goal``, ``sol1``, ``sol2``, ``label`` (0/1; local labels come from ``valid-labels.lst``)."""
    return {
        "id": _record_id(record, index, "id"),
        "context": _text(record["goal"]),
        "choices": [_text(record["sol1"]), _text(record["sol2"])],
        "label": _int_label(record.get("label")),
    }


def _normalize_hellaswag(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """HellaSwag (``Rowan/hellaswag``): ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings``, ``label`` ("0"-"3";
    "" on the test split).

    The text is kept as published (no removal of WikiHow's ``[header]``/``[title]`` markers).
    """
    context = record.get("ctx")
    if not context:
        context = f"{record.get('ctx_a') or ''} {record.get('ctx_b') or ''}"
    return {
        "id": _record_id(record, index, "ind", "id"),
        "context": _text(context),
        "choices": [_text(e) for e in record["endings"]],
        "label": _int_label(record.get("label")),
    }


def _normalize_winogrande(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Winogrande: ``sentence`` with a ``_`` blank, ``option1``, ``option2``, ``answer`` "1"/"2" ("" on test).

    The context keeps the ``_``; the choices are the two fillers.
    """
    answer = _int_label(record.get("answer"))
    return {
        "id": _record_id(record, index, "id", "qID"),
        "context": _text(record["sentence"]),
        "choices": [_text(record["option1"]), _text(record["option2"])],
        "label": answer - 1 if answer > 0 else -1,
    }


_RTE_NAMES = ("entailment", "not_entailment")
_BOOLQ_NAMES = ("no", "yes")
_SST2_NAMES = ("negative", "positive")


def _normalize_rte(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """GLUE RTE: ``sentence1``, ``sentence2``, ``label`` (0 entailment / 1 not_entailment, or the name)."""
    return {
        "id": _record_id(record, index, "idx", "index"),
        "context": f"Premise: {_text(record['sentence1'])}\nHypothesis: {_text(record['sentence2'])}",
        "choices": list(_RTE_NAMES),
        "label": _int_label(record.get("label"), _RTE_NAMES),
    }


def _normalize_boolq(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """BoolQ: ``question``, ``passage`` and ``label`` (super_glue: 0/1; local: "true"/"false") or
    ``answer`` (``google/boolq``: bool). Label 0 = false = "no", 1 = true = "yes".

    The passage comes first and the question last, so left truncation of long passages keeps the question.
    """
    question = _text(record["question"])
    if not question.endswith("?"):
        question += "?"
    label = record.get("label", record.get("answer"))
    return {
        "id": _record_id(record, index, "idx"),
        "context": f"Passage: {_text(record['passage'])}\nQuestion: {question}",
        "choices": list(_BOOLQ_NAMES),
        "label": _int_label(label, _BOOLQ_NAMES),
    }


def _normalize_sst2(record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """GLUE SST-2: ``sentence``, ``label`` (0 negative / 1 positive)."""
    return {
        "id": _record_id(record, index, "idx"),
        "context": _text(record["sentence"]),
        "choices": list(_SST2_NAMES),
        "label": _int_label(record.get("label"), _SST2_NAMES),
    }


def _ai2_task(name: str, pretty: str, hub: tuple[HubSource, ...], local_dir: str, files: dict[str, str],
              num_choices: int) -> TaskSpec:
    return TaskSpec(name, pretty, num_choices, tuple(_LETTERS[:num_choices]), _normalize_ai2, hub, local_dir, files,
                    "ai2_jsonl")


TASKS: dict[str, TaskSpec] = {}
"""The task registry: name -> :class:`TaskSpec`. Extend it with :func:`register_task`."""

TASK_ALIASES: dict[str, str] = {
    "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "glue_rte": "rte",
    "glue_sst2": "sst2", "sst_2": "sst2", "super_glue_boolq": "boolq",
}


def register_task(spec: TaskSpec, *, exist_ok: bool = False) -> TaskSpec:
    """Add a task to :data:`TASKS` (raises if the name is taken, unless ``exist_ok``)."""
    if spec.name in TASKS and not exist_ok:
        raise ValueError(f"task {spec.name!r} is already registered")
    TASKS[spec.name] = spec
    return spec


for _spec in (
    # ARC items have 3, 4 or 5 choices: k = 5 so that no item is dropped
    _ai2_task("arc_easy", "ARC-Easy", (HubSource("allenai/ai2_arc", "ARC-Easy"),), "arc_easy",
              {"train": "ARC-Easy-Train.jsonl", "validation": "ARC-Easy-Dev.jsonl", "test": "ARC-Easy-Test.jsonl"}, 5),
    _ai2_task("arc_challenge", "ARC-Challenge", (HubSource("allenai/ai2_arc", "ARC-Challenge"),), "arc_challenge",
              {"train": "ARC-Challenge-Train.jsonl", "validation": "ARC-Challenge-Dev.jsonl",
               "test": "ARC-Challenge-Test.jsonl"}, 5),
    _ai2_task("openbookqa", "OpenBookQA", (HubSource("allenai/openbookqa", "main"),), "openbookqa",
              {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"}, 4),
    TaskSpec("piqa", "PIQA", 2, ("A", "B"), _normalize_piqa, (HubSource("ybisk/piqa"), HubSource("baber/piqa")),
             "piqa", {"train": "train.jsonl", "validation": "valid.jsonl"}, "piqa", carve_from_validation=True),
    TaskSpec("hellaswag", "HellaSwag", 4, ("A", "B", "C", "D"), _normalize_hellaswag, (HubSource("Rowan/hellaswag"),)),
    TaskSpec("winogrande", "Winogrande", 2, ("A", "B"), _normalize_winogrande,
             (HubSource("allenai/winogrande", "winogrande_xl"),)),
    TaskSpec("rte", "GLUE-RTE", 2, _RTE_NAMES, _normalize_rte, (HubSource("nyu-mll/glue", "rte"),), "rte",
             {"train": "train.tsv", "validation": "dev.tsv"}, "tsv", kind="classification"),
    TaskSpec("boolq", "BoolQ", 2, _BOOLQ_NAMES, _normalize_boolq,
             (HubSource("google/boolq"), HubSource("aps/super_glue", "boolq"), HubSource("super_glue", "boolq")),
             "boolq", {"train": "train.jsonl", "validation": "val.jsonl"}, "jsonl", carve_from_validation=True,
             kind="classification"),
    TaskSpec("sst2", "GLUE-SST-2", 2, _SST2_NAMES, _normalize_sst2, (HubSource("nyu-mll/glue", "sst2"),), "sst2",
             {"train": "train.tsv", "validation": "dev.tsv", "test": "test_labeled.tsv"}, "tsv",
             kind="classification"),
):
    register_task(_spec)


def get_task_spec(name: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` for ``name`` (case, ``-`` and ``_`` are ignored; a few aliases like ``obqa``)."""
    if isinstance(name, TaskSpec):
        return name
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = TASK_ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


# --------------------------------------------------------------------------------------------------
# Normalisation (shared by the local and the Hub path)
# --------------------------------------------------------------------------------------------------
def _normalize_record(spec: TaskSpec, record: Mapping[str, Any], index: int) -> dict[str, Any]:
    """``spec.normalize`` plus the checks every example must pass, with the record's id in errors."""
    try:
        example = spec.normalize(record, index)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{spec.pretty_name}: cannot normalise record {index} "
                         f"(id {_record_id(record, index, 'id', 'idx')}): {exc!r}") from exc
    n = len(example["choices"])
    if not 2 <= n <= spec.num_choices:
        raise ValueError(f"{spec.pretty_name}: record {example['id']} has {n} choices, expected 2..{spec.num_choices}")
    if not -1 <= example["label"] < n:
        raise ValueError(f"{spec.pretty_name}: record {example['id']} has label {example['label']} for {n} choices")
    return example


def normalize_dataset(task: str | TaskSpec, dataset: Dataset) -> Dataset:
    """Turn a Hub-schema dataset (what ``datasets.load_dataset(<hub id>)`` returns) into normalised examples.

    This is all the Hub path does after loading, so any ``Dataset`` with the task's Hub columns works,
    e.g. a mirror or a hand-built ``Dataset.from_dict``.
    """
    spec = get_task_spec(task)
    if len(dataset) == 0:
        raise ValueError(f"{spec.pretty_name}: the dataset is empty")
    return dataset.map(_NormalizeFn(spec), with_indices=True, remove_columns=dataset.column_names,
                       features=EXAMPLE_FEATURES, desc=f"normalising {spec.pretty_name}")


@dataclass(frozen=True)
class _NormalizeFn:
    """Picklable ``map`` function (``num_proc`` and the fingerprint hasher need one)."""

    spec: TaskSpec

    def __call__(self, record: Mapping[str, Any], index: int) -> dict[str, Any]:
        return _normalize_record(self.spec, record, index)


def _examples_to_dataset(examples: list[dict[str, Any]]) -> Dataset:
    # Straight to Arrow: Dataset.from_dict encodes row by row, several times slower on SST-2's 67k rows
    columns = {key: [ex[key] for ex in examples] for key in EXAMPLE_FEATURES}
    return Dataset(pa.Table.from_pydict(columns, schema=EXAMPLE_FEATURES.arrow_schema))


def _choice_counts(dataset: Dataset) -> list[int]:
    """Number of choices per row, read in Arrow (iterating a Dataset column row by row is slow)."""
    return pc.list_value_length(dataset.with_format("arrow")["choices"]).to_pylist()


# --------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
    return records


def _read_piqa(path: Path) -> list[dict[str, Any]]:
    """``valid.jsonl`` plus its labels, one per line, in ``valid-labels.lst`` (PIQA's release layout)."""
    records = _read_jsonl(path)
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        raise FileNotFoundError(f"PIQA labels file {labels_path} not found (it must sit next to {path.name})")
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise ValueError(f"{path} has {len(records)} records but {labels_path} has {len(labels)} labels")
    return [{**record, "label": int(label)} for record, label in zip(records, labels)]


def _read_tsv(path: Path) -> list[dict[str, str]]:
    """GLUE tsv: a header row, tab-separated fields, no quoting (RTE text contains bare ``"``), LF or CRLF."""
    lines = path.read_text(encoding="utf-8").splitlines()  # also drops the \r of CRLF files (SST-2 test)
    if not lines:
        return []
    header = lines[0].split("\t")
    records = []
    for line_no, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path}:{line_no}: {len(fields)} fields, header has {len(header)} ({header})")
        records.append(dict(zip(header, fields)))
    return records


_LOCAL_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "ai2_jsonl": _read_jsonl, "jsonl": _read_jsonl, "piqa": _read_piqa, "tsv": _read_tsv,
}


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    return find_local_data_dir(data_dir)  # data_dir, else $UNITE_HF_DATA_DIR, else None: never a cwd guess


def _task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """``data_dir/<local_dir>``, or ``data_dir`` itself when the caller pointed straight at the task folder."""
    nested = data_dir / spec.local_dir
    if nested.is_dir() or not any((data_dir / f).is_file() for f in spec.local_files.values()):
        return nested
    return data_dir


def _missing_local_message(spec: TaskSpec, where: str) -> str:
    hub = " or ".join(str(h) for h in spec.hub)
    return (f"{spec.pretty_name}: {where}. Put the files there, point data_dir (or ${DATA_DIR_ENV}) at a folder "
            f"holding {spec.local_dir}/, or use source='hub' ({hub}).")


@dataclass
class _Loaded:
    dataset: Dataset
    origin: str
    notes: list[str]


def _load_local(spec: TaskSpec, split: str, data_dir: Path | None) -> _Loaded:
    if spec.hub_only:
        raise FileNotFoundError(f"{spec.pretty_name} has no local copy: it is read from the Hub only "
                                f"({', '.join(map(str, spec.hub))}); use source='hub' or 'auto'")
    if data_dir is None:
        raise FileNotFoundError(_missing_local_message(
            spec, f"no local data folder given (neither data_dir nor ${DATA_DIR_ENV})"))
    folder = _task_dir(spec, data_dir)
    reader = _LOCAL_READERS[spec.local_format]

    def read(file_name: str) -> tuple[list[dict[str, Any]], Path]:
        path = folder / file_name
        raw = reader(path)
        if not raw:
            raise ValueError(f"{spec.pretty_name}: {path} holds no records")
        return [_normalize_record(spec, record, i) for i, record in enumerate(raw)], path

    file_name = spec.local_files.get(split)
    val_name = spec.local_files.get("validation")
    train_name = spec.local_files.get("train")
    # No train file but a validation file: carve both train and validation out of it, so they are disjoint
    carve = (spec.carve_from_validation and split in ("train", "validation") and val_name is not None
             and (folder / val_name).is_file() and not (train_name and (folder / train_name).is_file()))
    if carve:
        examples, path = read(val_name)
        train_idx, val_idx = _carve(len(examples), DERIVED_SPLIT_SEED, DERIVED_VALIDATION_FRACTION)
        keep = train_idx if split == "train" else val_idx
        pct = round(100 * DERIVED_VALIDATION_FRACTION)
        note = (f"{spec.pretty_name} has no train split in {folder}: {path.name} ({len(examples)} labelled rows) was "
                f"split with fixed seed {DERIVED_SPLIT_SEED} into train ({len(train_idx)}) and validation "
                f"({len(val_idx)}), {100 - pct}/{pct}; '{split}' is the {len(keep)}-row part. Validation accuracy is "
                f"on this held-out part, not on the official {spec.pretty_name} validation set.")
        return _Loaded(_examples_to_dataset([examples[i] for i in keep]), f"{path}[{split} part]", [note])
    if file_name is not None and (folder / file_name).is_file():
        examples, path = read(file_name)
        return _Loaded(_examples_to_dataset(examples), str(path), [])

    available = [s for s, f in spec.local_files.items() if (folder / f).is_file()]
    if spec.carve_from_validation and "validation" in available and "train" not in available:
        available.insert(0, "train")
    if not available:
        # A carved split comes from the validation file: name that one, not the absent train file
        wanted = val_name if spec.carve_from_validation and split != "test" else file_name
        expected = folder / (wanted or val_name or next(iter(spec.local_files.values())))
        raise FileNotFoundError(_missing_local_message(spec, f"local file {expected} not found"))
    missing = f" (expected {folder / file_name})" if file_name else ""
    raise FileNotFoundError(
        f"{spec.pretty_name} has no local '{split}' split in {folder}{missing}; available: {', '.join(available)}. "
        f"Use one of those, or source='hub' ({', '.join(map(str, spec.hub))}).")


def _carve(n: int, seed: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """Disjoint sorted (train, validation) row indices covering ``range(n)``, from a seeded permutation."""
    order = random.Random(seed).sample(range(n), n)
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def _subsample_indices(n: int, fraction: float, seed: int) -> list[int]:
    """Sorted indices of ``round(fraction * n)`` rows (at least 1). For one seed the subsets are nested:
    the 10% rows are inside the 25% rows, and so on, so a data-efficiency curve only adds data."""
    if fraction >= 1.0:
        return list(range(n))
    order = random.Random(seed).sample(range(n), n)
    return sorted(order[:max(1, round(n * fraction))])


# --------------------------------------------------------------------------------------------------
# Hub
# --------------------------------------------------------------------------------------------------
def _load_hub(spec: TaskSpec, split: str) -> _Loaded:
    """``datasets.load_dataset`` on each of ``spec.hub`` in turn, then :func:`normalize_dataset`."""
    errors = []
    for hub in spec.hub:
        try:
            raw = datasets.load_dataset(hub.path, hub.name, split=split)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next id", all are reported
            errors.append(f"{hub}: {type(exc).__name__}: {exc}")
            continue
        # Say which mirror was used when the first id failed (e.g. a script-based dataset)
        notes = [f"{spec.pretty_name}: read from {hub}; {'; '.join(errors)}"] if errors else []
        return _Loaded(normalize_dataset(spec, raw), f"hub:{hub.path}" + (f"/{hub.name}" if hub.name else "")
                       + f"[{split}]", notes)
    hub_only = (f" {spec.pretty_name} has no local copy: it is Hub-only, so it needs network access to the Hub, "
                "or the dataset already in the datasets cache (then set HF_DATASETS_OFFLINE=1)."
                if spec.hub_only else "")
    raise TaskLoadError(f"{spec.pretty_name}: could not load split '{split}' from the Hub.{hub_only}\n  "
                        + "\n  ".join(errors))


# --------------------------------------------------------------------------------------------------
# load_task
# --------------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """One split of one task: normalised examples plus what a caller must know about them.

    Attributes:
        name: the task's registry name.
        split: the split that was asked for (``"train"``, ``"validation"``, ``"test"``).
        dataset: ``datasets.Dataset`` with columns ``id``, ``context``, ``choices``, ``label``.
        spec: the task's :class:`TaskSpec`.
        source: ``"local"`` or ``"hub"``.
        origin: the file or Hub id the rows came from (``"<file>[train part]"`` for a carved split).
        notes: human-readable facts to print (carved splits, subsampling, varying choice counts,
            unlabelled rows).
    """

    name: str
    split: str
    dataset: Dataset
    spec: TaskSpec
    source: str
    origin: str
    notes: list[str] = field(default_factory=list)

    @property
    def num_choices(self) -> int:
        """k: the classification head's width and the multiple-choice tensor's second dimension."""
        return self.spec.num_choices

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.spec.label_names

    @property
    def id2label(self) -> dict[int, str]:
        """For ``from_pretrained(..., num_labels=task.num_choices, id2label=task.id2label)``."""
        return dict(enumerate(self.spec.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.spec.label_names)}

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (f"TaskData(name={self.name!r}, split={self.split!r}, rows={len(self.dataset)}, "
                f"num_choices={self.num_choices}, source={self.source!r}, origin={self.origin!r})")


def load_task(
    name: str | TaskSpec,
    split: Split = "train",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    train_fraction: float = 1.0,
    source: Source = "auto",
) -> TaskData:
    """Load one split of a task as normalised examples.

    Args:
        name: a key of :data:`TASKS` (``arc_easy``, ``arc_challenge``, ``openbookqa``, ``piqa``,
            ``hellaswag``, ``winogrande``, ``rte``, ``boolq``, ``sst2``) or a :class:`TaskSpec`.
        split: ``"train"``, ``"validation"`` or ``"test"``. Locally, PIQA and BoolQ have no train file:
            their validation file is split with :data:`DERIVED_SPLIT_SEED` (80/20), and ``notes`` says so.
        data_dir: the folder holding ``arc_easy/``, ``piqa/``, ... Default: ``$UNITE_HF_DATA_DIR``, else no
            local folder (see :func:`unite_hf.calibration.find_local_data_dir`; never relative to the cwd). A task folder
            itself (``.../arc_easy``) is accepted too.
        seed: seed of the ``train_fraction`` subsample (the carved split does not depend on it).
        train_fraction: share of the train split to keep, in (0, 1]; a seeded subsample, nested across
            fractions for one seed. Applies to ``split="train"`` only; other splits are always complete.
        source: ``"local"`` (files only), ``"hub"`` (``datasets.load_dataset`` only) or ``"auto"``
            (local files when present, else the Hub).

    Raises:
        ValueError: unknown task, unknown split, ``train_fraction`` outside (0, 1], empty data.
        FileNotFoundError: ``source="local"`` and the files are missing (the message names the path).
        TaskLoadError: the Hub could not be read (and, for ``"auto"``, the local files were missing).
    """
    spec = get_task_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(train_fraction, (int, float)) or not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction!r}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")

    if source == "hub" or (source == "auto" and spec.hub_only):
        loaded, used = _load_hub(spec, split), "hub"
    else:
        local_dir = _resolve_data_dir(data_dir)
        try:
            loaded, used = _load_local(spec, split, local_dir), "local"
        except FileNotFoundError as local_exc:
            if source == "local":
                raise
            try:
                loaded, used = _load_hub(spec, split), "hub"
            except TaskLoadError as hub_exc:
                raise TaskLoadError(f"{local_exc}\nFalling back to the Hub failed too. {hub_exc}") from hub_exc

    dataset, notes = loaded.dataset, list(loaded.notes)
    if len(dataset) == 0:
        raise ValueError(f"{spec.pretty_name}: split '{split}' from {loaded.origin} is empty")

    counts = Counter(_choice_counts(dataset))
    if len(counts) > 1:
        described = ", ".join(f"{n} have {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        notes.append(f"{spec.pretty_name} {split}: items have different numbers of choices ({described}); both "
                     f"formats use k={spec.num_choices} and pad shorter items with empty choices that are never "
                     f"the answer (no item is dropped).")
    unlabelled = sum(1 for label in dataset.with_format("arrow")["label"].to_pylist() if label < 0)
    if unlabelled:
        notes.append(f"{spec.pretty_name} {split}: {unlabelled} of {len(dataset)} rows have no label (label=-1); "
                     f"the Hub's test splits are unlabelled, so they cannot be scored.")

    if split == "train" and train_fraction < 1.0:
        full = len(dataset)
        dataset = dataset.select(_subsample_indices(full, float(train_fraction), seed))
        notes.append(f"train_fraction={train_fraction:g}: using {len(dataset)} of {full} {spec.pretty_name} train "
                     f"examples (seed {seed}).")
    return TaskData(spec.name, split, dataset, spec, used, loaded.origin, notes)


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


def format_multiple_choice_texts(example: Mapping[str, Any], num_choices: int | None = None) -> list[str]:
    """One ``"{context}\\nAnswer: {choice}"`` per choice, padded with empty choices to ``num_choices``."""
    choices = list(example["choices"])
    choices += [""] * max(0, (num_choices or len(choices)) - len(choices))
    return [example["context"] + _choice_suffix(choice) for choice in choices]


def _fit_context(tokenizer: Any, context: str, suffix: str, max_length: int, side: str,
                 ids: list[int]) -> tuple[str, list[int]]:
    """Cut whole tokens off ``context`` (at ``side``) until ``context + suffix`` fits in ``max_length`` tokens.

    Truncation happens on the text, which is then re-tokenised, so the ids always decode to exactly
    ``kept_context + suffix``: the choices and the final ``Answer:`` are never cut, which matters for
    last-token pooling. ``ids`` are those of the uncut text. Returns the kept context and its ids; if
    even an empty context is too long, the ids are cut hard at the right.
    """
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    kept, drop = context, len(ids) - max_length
    while len(ids) > max_length and drop < len(offsets):
        kept = context[offsets[drop][0]:] if side == "left" else context[:offsets[len(offsets) - drop - 1][1]]
        ids = tokenizer(kept + suffix)["input_ids"]
        drop += max(1, len(ids) - max_length)  # a re-tokenised boundary can shift by a token: cut again
    if len(ids) > max_length:
        kept, ids = "", tokenizer(suffix)["input_ids"][:max_length]
    return kept, ids


def _encode_classification(tokenizer: Any, contexts: list[str], suffixes: list[str], max_length: int,
                           side: str) -> list[list[int]]:
    """Batch-tokenise ``context + suffix``; only the rare too-long rows take the slow fitting path."""
    all_ids = tokenizer([c + s for c, s in zip(contexts, suffixes)])["input_ids"]
    return [ids if len(ids) <= max_length else _fit_context(tokenizer, c, s, max_length, side, ids)[1]
            for ids, c, s in zip(all_ids, contexts, suffixes)]


def _encode_multiple_choice(tokenizer: Any, contexts: list[str], suffixes: list[list[str]], max_length: int,
                            side: str) -> list[list[list[int]]]:
    """``[B][k][T_i]`` ids. A too-long item has its context cut once, for its longest choice, so that
    all k sequences of the item share the same context (the choices then differ only in their answer)."""
    k = len(suffixes[0]) if suffixes else 0
    flat = tokenizer([c + s for c, row in zip(contexts, suffixes) for s in row])["input_ids"]
    out = []
    for i, (context, row) in enumerate(zip(contexts, suffixes)):
        ids = flat[i * k:(i + 1) * k]
        longest = max(range(k), key=lambda j: len(ids[j]))
        if len(ids[longest]) > max_length:
            kept, _ = _fit_context(tokenizer, context, row[longest], max_length, side, ids[longest])
            ids = tokenizer([kept + s for s in row])["input_ids"]
            ids = [x if len(x) <= max_length else _fit_context(tokenizer, kept, s, max_length, side, x)[1]
                   for x, s in zip(ids, row)]
        out.append(ids)
    return out


@dataclass(frozen=True)
class _TokenizeFn:
    tokenizer: Any
    format: str
    num_choices: int
    max_length: int
    side: str

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        contexts, choices = batch["context"], batch["choices"]
        if self.format == "classification":
            ids = _encode_classification(self.tokenizer, contexts, [_classification_suffix(c) for c in choices],
                                         self.max_length, self.side)
            return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": batch["label"]}
        # multiple choice: k suffixes per item, short items padded with empty choices
        suffixes = [[_choice_suffix(o) for o in list(options) + [""] * (self.num_choices - len(options))]
                    for options in choices]
        ids = _encode_multiple_choice(self.tokenizer, contexts, suffixes, self.max_length, self.side)
        return {"input_ids": ids, "attention_mask": [[[1] * len(x) for x in row] for row in ids],
                "labels": batch["label"]}


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
) -> Dataset:
    """Tokenise normalised examples for a model head.

    Args:
        task_data: a :class:`TaskData` (or a ``Dataset`` of normalised examples).
        tokenizer: a Hugging Face tokenizer; a fast one for the truncation of long contexts (it uses
            offsets). Special tokens (BOS, ...) are added as the tokenizer does by default.
        format: ``"classification"``: one sequence (:func:`format_classification_text`), ``input_ids``
            ``[T]``; ``"multiple_choice"``: k sequences (:func:`format_multiple_choice_texts`),
            ``input_ids`` ``[k][T_i]``, padded to k with empty choices.
        max_length: most tokens per sequence. Long contexts lose whole tokens at ``truncation_side``
            (default ``"left"``: the end of the context, next to the question and answers, is kept);
            choices and the final ``Answer:`` are kept.
        num_choices: k; default the task's. Items with more choices than k are dropped (logged).
        batch_size, num_proc: passed to ``Dataset.map``.

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

    too_many = [i for i, n in enumerate(_choice_counts(dataset)) if n > num_choices]
    if too_many:
        logger.warning("tokenize_task: dropping %d of %d items with more than %d choices", len(too_many),
                       len(dataset), num_choices)
        dropped = set(too_many)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
        if len(dataset) == 0:
            raise ValueError(f"no item has at most {num_choices} choices")

    fn = _TokenizeFn(tokenizer, format, num_choices, max_length, truncation_side)
    return dataset.map(fn, batched=True, batch_size=batch_size, num_proc=num_proc,
                       remove_columns=dataset.column_names, desc=f"tokenising ({format})")


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
