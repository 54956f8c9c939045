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
