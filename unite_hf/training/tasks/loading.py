"""Reading one split of a task: local files (a data folder given explicitly), the Hub, or both."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from ...calibration import DATA_DIR_ENV, find_local_data_dir
from .registry import _choice_counts, _examples_to_dataset, _normalize_record, get_task_spec, normalize_dataset
from .schema import (
    DERIVED_SPLIT_SEED,
    DERIVED_VALIDATION_FRACTION,
    SPLITS,
    Source,
    Split,
    TaskLoadError,
    TaskSpec,
)

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


def _read_winogrande(path: Path) -> list[dict[str, Any]]:
    """A Winogrande release file: ``<name>.jsonl`` (``qID``, ``sentence``, ``option1``, ``option2``, ``answer``)
    and, when present, ``<name>-labels.lst`` (one ``1``/``2`` per line, the release's answer files).

    The labels file must have one label per record and agree with ``answer`` wherever the jsonl has one
    (a disagreement is an error, not a silent pick); it fills ``answer`` where the jsonl has none. Without a
    labels file the jsonl's own ``answer`` is used (``test.jsonl`` has neither: unlabelled).
    """
    records = _read_jsonl(path)
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        return records
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(records):
        raise ValueError(f"{path} has {len(records)} records but {labels_path} has {len(labels)} labels")
    out = []
    for row, (record, label) in enumerate(zip(records, labels), 1):
        answer = str(record.get("answer") or "").strip()
        if answer and answer != label:
            raise ValueError(f"{path}: record {row} (qID {record.get('qID')}) has answer {answer!r} but line {row} of "
                             f"{labels_path.name} says {label!r}")
        out.append({**record, "answer": label})
    return out


_LOCAL_READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "ai2_jsonl": _read_jsonl, "jsonl": _read_jsonl, "piqa": _read_piqa, "tsv": _read_tsv,
    "winogrande": _read_winogrande,
}

_SPLIT_FIELD_VALUES = {"train": ("train",), "validation": ("val", "validation", "dev"), "test": ("test",)}
"""What a record's own ``split`` field (HellaSwag's release files have one) may say for each split."""


def _file_candidates(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _find_file(folder: Path, entry: str | tuple[str, ...] | None) -> Path | None:
    """The first of ``entry``'s candidate names present in ``folder``; a glob candidate must match one file."""
    if not folder.is_dir():
        return None
    for name in _file_candidates(entry):
        if any(ch in name for ch in "*?["):
            matches = sorted(path for path in folder.glob(name) if path.is_file())
            if len(matches) > 1:
                raise ValueError(f"{folder}: {name!r} matches {len(matches)} files "
                                 f"({', '.join(m.name for m in matches)}); keep one, or name it exactly")
            if matches:
                return matches[0]
        elif (folder / name).is_file():
            return folder / name
    return None


def _expected(folder: Path, entry: str | tuple[str, ...] | None) -> str:
    """``folder/<first candidate>`` for messages, plus the other accepted names."""
    names = _file_candidates(entry)
    if not names:
        return str(folder)
    also = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
    return f"{folder / names[0]}{also}"


def _check_split_field(spec: TaskSpec, path: Path, raw: list[dict[str, Any]], role: str) -> str:
    """When the records carry their own ``split`` field, it must match the split the file is read as
    (``hellaswag_val.jsonl`` read as train is an error). Returns a phrase for the notes (or "")."""
    values = Counter(r["split"] for r in raw if isinstance(r, dict) and isinstance(r.get("split"), str))
    if not values:
        return ""
    wrong = {v: n for v, n in values.items() if v.lower() not in _SPLIT_FIELD_VALUES[role]}
    if wrong:
        raise ValueError(f"{spec.pretty_name}: {path} is read as the {role} split, but its rows' 'split' field says "
                         + ", ".join(f"{v!r} ({n} rows)" for v, n in wrong.items()))
    return "; every row's 'split' field says " + " or ".join(repr(v) for v in values)


def _substitute_note(spec: TaskSpec, role: str, path: Path, rows: int, split_field: str) -> list[str]:
    """A note when a split was read from a file other than its first (preferred) name."""
    names = _file_candidates(spec.local_files.get(role))
    if not names or path.name == names[0]:
        return []
    return [f"{spec.pretty_name} {role} split: read from {path.name} ({rows} rows{split_field}), not from "
            f"{names[0]}, the file preferred for it (the release's, which the Hub copy "
            f"{spec.hub[0] if spec.hub else '-'} matches): results are not comparable with runs on that file."]


def _resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    return find_local_data_dir(data_dir)  # data_dir, else $UNITE_HF_DATA_DIR, else None: never a cwd guess


def _task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """``data_dir/<local_dir>``, or ``data_dir`` itself when the caller pointed straight at the task folder."""
    nested = data_dir / spec.local_dir
    if nested.is_dir() or not any(_find_file(data_dir, f) for f in spec.local_files.values()):
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
    """One split from the task's files under ``data_dir``; a split without its own file is carved out of
    the other one when the spec says so (``carve_from_validation`` / ``carve_from_train``)."""
    if spec.hub_only:
        raise FileNotFoundError(f"{spec.pretty_name} has no local copy: it is read from the Hub only "
                                f"({', '.join(map(str, spec.hub))}); use source='hub' or 'auto'")
    if data_dir is None:
        raise FileNotFoundError(_missing_local_message(
            spec, f"no local data folder given (neither data_dir nor ${DATA_DIR_ENV})"))
    folder = _task_dir(spec, data_dir)
    reader = _LOCAL_READERS[spec.local_format]

    def read(path: Path, role: str) -> tuple[list[dict[str, Any]], list[str]]:
        raw = reader(path)
        if not raw:
            raise ValueError(f"{spec.pretty_name}: {path} holds no records")
        split_field = _check_split_field(spec, path, raw, role)
        examples = [_normalize_record(spec, record, i) for i, record in enumerate(raw)]
        return examples, _substitute_note(spec, role, path, len(examples), split_field)

    found = {s: _find_file(folder, entry) for s, entry in spec.local_files.items()}
    train_path, val_path = found.get("train"), found.get("validation")
    # One of train/validation has no file but the other has: carve both out of it, so they are disjoint
    source = None
    if split in ("train", "validation"):
        if spec.carve_from_validation and val_path is not None and train_path is None:
            source = ("validation", val_path, "train")
        elif spec.carve_from_train and train_path is not None and val_path is None:
            source = ("train", train_path, "validation")
    if source is not None:
        role, path, missing = source
        examples, notes = read(path, role)
        train_idx, val_idx = _carve(len(examples), DERIVED_SPLIT_SEED, DERIVED_VALIDATION_FRACTION)
        keep = train_idx if split == "train" else val_idx
        pct = round(100 * DERIVED_VALIDATION_FRACTION)
        note = (f"{spec.pretty_name} has no {missing} split in {folder}: {path.name} ({len(examples)} labelled rows, "
                f"the {role} split) was split with fixed seed {DERIVED_SPLIT_SEED} into train ({len(train_idx)}) and "
                f"validation ({len(val_idx)}), {100 - pct}/{pct}; '{split}' is the {len(keep)}-row part. Validation "
                f"accuracy is on this held-out part, not on the official {spec.pretty_name} validation set.")
        return _Loaded(_examples_to_dataset([examples[i] for i in keep]), f"{path}[{split} part]", [note, *notes])
    path = found.get(split)
    if path is not None:
        examples, notes = read(path, split)
        return _Loaded(_examples_to_dataset(examples), str(path), notes)

    available = [s for s in SPLITS if found.get(s) is not None]
    if spec.carve_from_validation and val_path is not None and train_path is None:
        available.insert(0, "train")
    if spec.carve_from_train and train_path is not None and val_path is None:
        available.insert(1, "validation")
    if not available:
        # A carved split comes from the other file: name that one, not the absent file of this split
        wanted = split
        if split != "test" and spec.carve_from_validation:
            wanted = "validation"
        elif split != "test" and spec.carve_from_train:
            wanted = "train"
        entry = spec.local_files.get(wanted) or spec.local_files.get(split) or next(iter(spec.local_files.values()))
        raise FileNotFoundError(_missing_local_message(spec, f"local file {_expected(folder, entry)} not found"))
    missing = f" (expected {_expected(folder, spec.local_files[split])})" if split in spec.local_files else ""
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
        notes: human-readable facts to print (carved splits, substitute files, a Hub fallback,
            subsampling, varying choice counts, unlabelled rows; :func:`tokenize_task` adds what it cut
            to fit ``max_length``).
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
            HellaSwag here has no validation file: its train file (``hellaswag_train.jsonl``, or a partial
            copy named ``hellaswag_train_first*.jsonl``) is split the same way. Winogrande reads the
            largest ``train_{xl,l,m,s,xs}.jsonl`` present, ``dev.jsonl`` and ``test.jsonl`` (answers checked
            against the release's ``*-labels.lst``). A file other than a split's preferred one is named in
            ``notes``, and so is a given data folder that lacks the task when ``source="auto"`` falls back
            to the Hub.
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
            if local_dir is not None:  # a data folder was given but lacks the task: say so, not a silent switch
                loaded.notes.insert(0, f"{spec.pretty_name} {split}: not read from the data folder {local_dir} "
                                       f"({local_exc}); read from the Hub instead.")

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
