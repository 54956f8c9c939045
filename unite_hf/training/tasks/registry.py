"""The task registry: the nine built-in tasks (one normaliser per schema family), lookup, and the
normalisation shared by the local and the Hub path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from .schema import _LETTERS, EXAMPLE_FEATURES, HubSource, TaskSpec

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
    """HellaSwag, the Hub's ``Rowan/hellaswag`` and the release's ``hellaswag_{train,val,test}.jsonl`` alike:
    ``ctx`` (or ``ctx_a`` + ``ctx_b``), ``endings``, ``label`` (Hub: "0"-"3", "" on test; release: an int,
    absent on test).

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
    """Winogrande, the Hub's ``allenai/winogrande`` and the release's ``*.jsonl`` alike: ``sentence`` with
    one ``_`` blank, ``option1``, ``option2``, ``answer`` "1"/"2" ("" or absent on test; the release's
    ``*-labels.lst`` is read into ``answer`` by the local reader).

    The context keeps the ``_``; the choices are the two fillers (the multiple-choice format puts each in
    place of the blank: :attr:`TaskSpec.blank`). A sentence without exactly one ``_`` is an error, since
    the substitution would be ambiguous.
    """
    blanks = str(record["sentence"]).count("_")
    if blanks != 1:
        raise ValueError(f"the sentence has {blanks} '_' blanks, expected exactly one")
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
    # The release's hellaswag_train.jsonl, or a partial copy of it (the data folder here holds only
    # hellaswag_train_first3368.jsonl, the first 3368 rows: the note says so); no validation file here,
    # so the train file is split with a fixed seed, as PIQA's and BoolQ's validation files are
    TaskSpec("hellaswag", "HellaSwag", 4, ("A", "B", "C", "D"), _normalize_hellaswag, (HubSource("Rowan/hellaswag"),),
             "hellaswag", {"train": ("hellaswag_train.jsonl", "hellaswag_train_first*.jsonl"),
                           "validation": "hellaswag_val.jsonl", "test": "hellaswag_test.jsonl"}, "jsonl",
             carve_from_train=True),
    # The release has five training sizes; the largest present is read (the Hub's winogrande_xl is train_xl)
    TaskSpec("winogrande", "Winogrande", 2, ("A", "B"), _normalize_winogrande,
             (HubSource("allenai/winogrande", "winogrande_xl"),), "winogrande",
             {"train": tuple(f"train_{size}.jsonl" for size in ("xl", "l", "m", "s", "xs")),
              "validation": "dev.jsonl", "test": "test.jsonl"}, "winogrande", blank="_"),
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
