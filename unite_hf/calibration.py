"""Calibration corpora turned into fixed-length token batches.

Gene extraction runs a Mixture-of-Experts model over a small calibration corpus (the UNITE paper
uses WikiText-2) and records expert activations. This module turns "some text" into a
:class:`CalibrationSet`: ``N`` windows of ``T`` token ids, sampled GPTQ-style at seeded random offsets
from one long token stream.

Accepted inputs for :func:`load_calibration`:

* an alias from :data:`CORPUS_ALIASES` (``"wikitext2"``, ``"simplebooks"``), read from the local data
  folder when one is given (``data_dir=`` or ``$UNITE_HF_DATA_DIR``, see :func:`find_local_data_dir`;
  never a folder relative to the working directory), else from the Hugging Face Hub;
* a path to a local text file (split into documents by :func:`split_text_documents`: at blank
  lines, or one document per line when the file has no blank line) or a ``.json``/``.jsonl``/
  ``.csv``/``.parquet`` file (read with :func:`datasets.load_dataset`, one document per row);
* any other string: a Hub dataset id, loaded with ``datasets.load_dataset(id, config, split=split)``;
* a list of strings, a :class:`datasets.Dataset`, an integer tensor ``[N, T]`` of token ids, or a
  :class:`CalibrationSet` (returned unchanged).

Every document is stripped of surrounding whitespace; empty documents are dropped. Documents are
tokenized without special tokens and joined with the tokenizer's eos token id (when it has one).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "CORPUS_ALIASES",
    "DATA_DIR_ENV",
    "DEFAULT_CALIBRATION",
    "CalibrationLoadError",
    "CalibrationSet",
    "CorpusAlias",
    "find_local_data_dir",
    "load_calibration",
    "documents_sha256",
    "no_data_dir_message",
    "published_calibration",
    "split_text_documents",
]

DEFAULT_CALIBRATION = "wikitext2"
"""The default calibration corpus (an alias in :data:`CORPUS_ALIASES`)."""

DATA_DIR_ENV = "UNITE_HF_DATA_DIR"
"""Environment variable naming the local data folder when no ``data_dir`` argument is given."""

#: Documents tokenized per call of the tokenizer (one progress-bar step).
_TOKENIZE_CHUNK_DOCS = 256
#: Documents longer than this many characters are split further at line breaks before tokenizing.
_MAX_DOC_CHARS = 100_000
#: Suffixes read with ``datasets.load_dataset(<builder>, data_files=...)``.
_DATASET_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: Suffixes that mark a string as a file path (so a missing file is not mistaken for a Hub id).
_PATH_LIKE_SUFFIXES = {".txt", ".text", ".md", *(_DATASET_FILE_BUILDERS)}

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class CalibrationLoadError(RuntimeError):
    """A calibration corpus could not be loaded (Hub unreachable, missing local file, ...)."""


class CorpusAlias(NamedTuple):
    """Where a named calibration corpus lives (a plain tuple with named fields).

    Attributes:
        hub_id: Hugging Face Hub dataset id, or ``None`` if the corpus is only available locally.
        hub_config: dataset configuration name on the Hub (``None`` for the default).
        split: Hub split used by default (informational; :func:`load_calibration` uses its ``split``).
        local_path: path of a plain-text copy relative to a local data directory.
    """

    hub_id: str | None
    hub_config: str | None
    split: str
    local_path: str


CORPUS_ALIASES: dict[str, CorpusAlias] = {
    # The local copy is the raw *test* split (HF rows joined with blank lines); the Hub fallback
    # reads the train split, as the UNITE paper does.
    "wikitext2": CorpusAlias(
        "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "wikitext2/wikitext2_raw_test_hf_joined.txt"
    ),
    # SimpleBooks-92 is not on the Hub as a standard dataset: local copy only.
    "simplebooks": CorpusAlias(None, None, "validation", "simplebooks/simplebooks92_valid.txt"),
}
"""Named corpora: alias -> (hub dataset id, hub config, split, local path under a data dir)."""


@dataclass
class CalibrationSet:
    """Fixed-length token windows for calibration.

    Attributes:
        input_ids: ``LongTensor [N, T]`` of token ids.
        name: provenance, e.g. ``"wikitext2 (local: wikitext2/wikitext2_raw_test_hf_joined.txt)"``,
            ``"Salesforce/wikitext:wikitext-2-raw-v1[train]"``, ``"input_ids tensor"``; text given as
            a list, a local file or a ``Dataset`` is named by what it holds, never by its text or its
            folder: ``"list of 12 strings (12 documents, sha256 <hex>)"``, ``"corpus.txt (local file,
            40 documents, sha256 <hex>)"`` (see :func:`documents_sha256`). Genes publish it.
        seed: the seed the window offsets were drawn with.
    """

    input_ids: torch.LongTensor
    name: str
    seed: int = 0

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be 2D [N, T], got shape {tuple(ids.shape)}")
        if ids.dtype != torch.long:
            raise ValueError(f"input_ids must have dtype torch.long, got {ids.dtype}")

    @property
    def num_sequences(self) -> int:
        """Number of sequences ``N``."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence ``T``."""
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.num_sequences

    def batches(self, batch_size: int) -> Iterator[torch.LongTensor]:
        """Yield ``[b, T]`` slices of :attr:`input_ids` in order; the last batch may be smaller."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for start in range(0, self.num_sequences, batch_size):
            yield self.input_ids[start : start + batch_size]

    def __repr__(self) -> str:
        return (
            f"CalibrationSet(name={self.name!r}, num_sequences={self.num_sequences}, "
            f"seq_len={self.seq_len}, seed={self.seed})"
        )


CalibrationInput = Union[str, os.PathLike, Sequence[str], "datasets.Dataset", torch.Tensor, CalibrationSet]


# --------------------------------------------------------------------------------------------------
# Locating local data
# --------------------------------------------------------------------------------------------------
def find_local_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data folder (offline copies of calibration corpora, task files, tokenizers), if one is given.

    Only explicit locations count: ``data_dir`` when passed, else ``$UNITE_HF_DATA_DIR``. There is no
    guess relative to the working directory or to the package, so a corpus name such as
    ``"wikitext2"`` means the same data wherever Python was started.

    Args:
        data_dir: the folder; must exist.

    Returns:
        The resolved folder, or ``None`` when neither ``data_dir`` nor ``$UNITE_HF_DATA_DIR`` is set (or
        the variable names no folder: a warning says so).

    Raises:
        FileNotFoundError: ``data_dir`` is given but is not a folder.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir {path} is not a directory")
        return path.resolve()
    env = os.environ.get(DATA_DIR_ENV)
    if not env:
        return None
    path = Path(env).expanduser()
    if not path.is_dir():
        warnings.warn(f"${DATA_DIR_ENV}={env} is not a directory; no local data folder is used", stacklevel=2)
        return None
    return path.resolve()


def no_data_dir_message(what: str) -> str:
    """The error text for data that must be read locally when no data folder was given: names both ways."""
    return f"{what}: no local data folder given; pass data_dir=/path/to/data or set ${DATA_DIR_ENV}=/path/to/data"


# --------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _split_long_document(doc: str, max_chars: int = _MAX_DOC_CHARS) -> list[str]:
    """Cut one very long document into pieces of about ``max_chars`` at line breaks.

    Pieces keep their newlines, so they concatenate back to ``doc``; they are tokenized separately
    and joined without a separator (a line break is a token boundary for BPE tokenizers anyway).
    """
    if len(doc) <= max_chars:
        return [doc]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in doc.splitlines(keepends=True):
        if size and size + len(line) > max_chars:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces


def _clean_documents(texts: Any) -> list[str]:
    """Strip each text and drop empty ones; non-strings raise TypeError."""
    docs: list[str] = []
    for i, text in enumerate(texts):
        if text is None:
            continue
        if not isinstance(text, str):
            raise TypeError(f"calibration text #{i} is {type(text).__name__}, expected str")
        text = text.strip()
        if text:
            docs.append(text)
    return docs


def split_text_documents(text: str) -> list[str]:
    """The documents of a plain-text corpus: the one rule every text file (and corpus alias) is read with.

    - If the text has a blank line (a line of whitespace only) *between* two non-blank lines, the
      documents are the blank-line-separated blocks; a block's single line breaks stay inside it.
      WikiText-2's file (one article paragraph or heading per block), SimpleBooks' and the tokenized
      WikiText-2 files are read this way, into the same documents as before this rule existed.
    - Otherwise (no blank line at all, e.g. LAMBADA's one passage per line) every non-blank line is a
      document.

    Why: a corpus gives the same windows however it is passed. The list ``docs`` and a file holding
    ``"\n".join(docs)`` (one per line) or ``"\n\n".join(docs)`` (blank-line separated) give the same
    documents, hence the same eos-separated stream; before, a file of one passage per line became a
    single document with no eos between its passages. Leading/trailing blank lines do not count.
    Documents are stripped; empty ones are dropped.
    """
    text = text.strip()
    if not text:
        return []
    if _BLANK_LINE.search(text):
        return _clean_documents(_BLANK_LINE.split(text))
    return _clean_documents(text.splitlines())


def documents_sha256(documents: list[str]) -> str:
    """The content hash a calibration set records of the documents it was cut from (as read: stripped,
    empty ones dropped): SHA-256 of their JSON array, ``json.dumps(documents, ensure_ascii=False)`` in UTF-8.
    The same documents hash the same however they were given (a list, a text file of them one per line
    or blank-line separated, a ``Dataset``), and documents that differ hash differently."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(documents, ensure_ascii=False).encode("utf-8")).hexdigest()


def _described(what: str, documents: list[str]) -> str:
    return f"{what}{len(documents)} documents, sha256 {documents_sha256(documents)})"


def published_calibration(calibration: Any) -> Any:
    """What a gene's recipe records of a calibration input, with neither the user's text nor their local
    paths: a corpus alias or a Hub dataset id as given; a local file by its name (``corpus.txt``, which
    the recipe replays from the folder holding it); ``None`` for a list of documents, a ``Dataset``, a token
    tensor or a :class:`CalibrationSet` (the recipe cannot replay those, and their text is not published).
    The gene's provenance (the :class:`CalibrationSet` name) describes each by its number of documents
    and :func:`documents_sha256`."""
    if isinstance(calibration, os.PathLike):
        return Path(os.fspath(calibration)).name
    if isinstance(calibration, str):
        if calibration.lower() in CORPUS_ALIASES:
            return calibration
        if Path(calibration).expanduser().is_file() or _looks_like_path(calibration):
            return Path(calibration).name
        return calibration  # a Hub dataset id
    return None


def _read_text_file(path: Path) -> list[str]:
    """Read a plain-text file (universal newlines) and split it with :func:`split_text_documents`."""
    with open(path, encoding="utf-8", errors="replace") as f:  # universal newlines: CRLF -> LF
        text = f.read()
    return split_text_documents(text)


def _dataset_texts(dataset: Any, text_column: str | None, what: str) -> tuple[list[str], str]:
    """Pull the text column out of a ``datasets.Dataset``; returns (texts, column name)."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"{what} is a DatasetDict with splits {list(dataset.keys())}; pass a single split "
            "(e.g. dataset['train'] or split='train')"
        )
    columns = list(dataset.column_names or [])
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"text_column {text_column!r} is not a column of {what}; columns: {columns}")
        column = text_column
    elif "text" in columns:
        column = "text"
    else:
        features = getattr(dataset, "features", None) or {}
        string_columns = [
            c
            for c in columns
            if isinstance(features.get(c), datasets.Value) and features[c].dtype in ("string", "large_string")
        ]
        if len(string_columns) != 1:
            raise ValueError(
                f"cannot tell which column of {what} holds the text (no 'text' column and "
                f"{len(string_columns)} string columns); pass text_column=. Columns: {columns}"
            )
        column = string_columns[0]
    return list(dataset[column]), column


def _load_hub_dataset(hub_id: str, config: str | None, split: str, extra_hint: str = "") -> Any:
    """``datasets.load_dataset(hub_id, config, split=split)`` with failures wrapped."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - re-raised with context below
        spec = _hub_name(hub_id, config, split)
        raise CalibrationLoadError(
            f"could not load calibration dataset {spec!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). The Hub may be unreachable (offline machine, "
            "HF_HUB_OFFLINE=1) or the id/config/split may be wrong; pass a local text file, a list of "
            f"strings or a datasets.Dataset instead.{extra_hint}"
        ) from exc


def _hub_name(hub_id: str, config: str | None, split: str) -> str:
    return f"{hub_id}:{config}[{split}]" if config else f"{hub_id}[{split}]"


def _looks_like_path(s: str) -> bool:
    return (
        s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or Path(s).suffix.lower() in _PATH_LIKE_SUFFIXES
    )


def _documents_from_file(path: Path, text_column: str | None) -> list[str]:
    builder = _DATASET_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        return _read_text_file(path)
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001
        raise CalibrationLoadError(f"could not read {path} as {builder}: {type(exc).__name__}: {exc}") from exc
    texts, _ = _dataset_texts(ds, text_column, str(path))
    return _clean_documents(texts)


def _documents_from_alias(
    alias: str, text_column: str | None, dataset_config: str | None, split: str, data_dir: Path | None = None
) -> tuple[list[str], str]:
    entry = CORPUS_ALIASES[alias]
    if data_dir is not None:
        local = data_dir / entry.local_path
        if local.is_file():
            # the data-dir-relative path: an absolute path of this machine means nothing on the Hub
            return _read_text_file(local), f"{alias} (local: {entry.local_path})"
        looked = str(local)
    else:
        looked = f"<data dir>/{entry.local_path}"
    hint = (
        f" Looked for a local copy at {looked} (the data folder: data_dir=, else ${DATA_DIR_ENV}); "
        f"pass data_dir=/path/to/data or set {DATA_DIR_ENV}=/path/to/data so that {entry.local_path} is found under it."
    )
    if entry.hub_id is None:
        raise CalibrationLoadError(f"calibration corpus {alias!r} is only available locally and was not found.{hint}")
    config = dataset_config if dataset_config is not None else entry.hub_config
    ds = _load_hub_dataset(entry.hub_id, config, split, extra_hint=hint)
    texts, _ = _dataset_texts(ds, text_column, _hub_name(entry.hub_id, config, split))
    return _clean_documents(texts), _hub_name(entry.hub_id, config, split)


# --------------------------------------------------------------------------------------------------
# Tokenizing and sampling
# --------------------------------------------------------------------------------------------------
def _tokenize_documents(docs: list[str], tokenizer: Any, show_progress: bool) -> torch.LongTensor:
    """Tokenize documents (no special tokens) into one stream, eos id between documents."""
    from tqdm.auto import tqdm

    eos_id = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    with tqdm(total=len(docs), desc="Tokenizing calibration corpus", unit="doc", disable=not show_progress) as bar:
        for start in range(0, len(docs), _TOKENIZE_CHUNK_DOCS):
            chunk = docs[start : start + _TOKENIZE_CHUNK_DOCS]
            # Split very long documents so no single string is huge; remember which doc each piece is.
            pieces: list[str] = []
            owners: list[int] = []
            for j, doc in enumerate(chunk):
                for piece in _split_long_document(doc):
                    pieces.append(piece)
                    owners.append(j)
            # verbose=False silences "Token indices sequence length is longer than the specified
            # maximum sequence length": we cut windows ourselves, long documents are expected.
            encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
            prev_owner = -1
            for owner, ids in zip(owners, encoded):
                if owner != prev_owner and (start + owner) > 0 and eos_id is not None:
                    stream.append(int(eos_id))
                prev_owner = owner
                stream.extend(ids)
            bar.update(len(chunk))
    return torch.tensor(stream, dtype=torch.long)


def _sample_windows(stream: torch.LongTensor, num_sequences: int, seq_len: int, seed: int) -> torch.LongTensor:
    """Take ``num_sequences`` windows of ``seq_len`` tokens at seeded random offsets (GPTQ-style)."""
    total = int(stream.numel())
    if total < seq_len + 1:
        raise ValueError(
            f"calibration corpus has {total} tokens, need at least {seq_len + 1} "
            f"(seq_len={seq_len} plus one); use a larger corpus or a smaller seq_len"
        )
    if total < num_sequences * seq_len:
        warnings.warn(
            f"calibration corpus has {total} tokens, fewer than num_sequences * seq_len = "
            f"{num_sequences} * {seq_len} = {num_sequences * seq_len}: the windows will overlap",
            stacklevel=3,
        )
    generator = torch.Generator().manual_seed(seed)
    # Offsets in [0, total - seq_len - 1], as in GPTQ (random.randint(0, L - T - 1)).
    starts = torch.randint(0, total - seq_len, (num_sequences,), generator=generator)
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return stream[index]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _from_tensor(ids: torch.Tensor, tokenizer: Any, seed: int) -> CalibrationSet:
    if ids.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"input_ids tensor must have an integer dtype, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"input_ids tensor must be 2D [N, T], got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids tensor must be non-empty, got shape {tuple(ids.shape)}")
    ids = ids.detach().to(device="cpu", dtype=torch.long)
    if int(ids.min()) < 0:
        raise ValueError(f"input_ids tensor contains negative token ids (min {int(ids.min())})")
    if tokenizer is not None:
        vocab = len(tokenizer)
        if int(ids.max()) >= vocab:
            raise ValueError(f"input_ids tensor contains id {int(ids.max())} >= tokenizer vocabulary size {vocab}")
    return CalibrationSet(input_ids=ids, name="input_ids tensor", seed=seed)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------
def load_calibration(
    calibration: CalibrationInput = DEFAULT_CALIBRATION,
    tokenizer: Any = None,
    *,
    num_sequences: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    show_progress: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
) -> CalibrationSet:
    """Build a :class:`CalibrationSet` of ``num_sequences`` windows of ``seq_len`` tokens.

    Args:
        calibration: what to calibrate on:

            * a :data:`CORPUS_ALIASES` name (default ``"wikitext2"``): the local copy under the data
              folder (``data_dir``, else ``$UNITE_HF_DATA_DIR``) when present (for WikiText-2 that is the raw *test* split;
              ``split`` is then ignored), else the Hub dataset (``dataset_config`` overrides the
              alias's config);
            * a path (``str`` or ``os.PathLike``) to a local file: plain text is split into documents
              at blank lines, or one per line when the file has no blank line
              (:func:`split_text_documents`; the same rule reads the aliases' local copies);
              ``.json``/``.jsonl``/``.csv``/``.parquet`` go through ``datasets.load_dataset`` and
              ``text_column`` (one document per row);
            * any other string: a Hub dataset id, loaded with
              ``datasets.load_dataset(id, dataset_config, split=split)``;
            * a list/tuple of strings (one document each);
            * a ``datasets.Dataset`` (``text_column``, else the ``"text"`` column, else its only
              string column);
            * a 2D integer tensor ``[N, T]`` of token ids, used as is (``num_sequences``,
              ``seq_len`` and ``tokenizer`` are not needed; the shape comes from the tensor);
            * a :class:`CalibrationSet`, returned unchanged.
        tokenizer: a Hugging Face tokenizer; required for every text input.
        num_sequences: number of windows ``N``.
        seq_len: tokens per window ``T``.
        seed: seed of the ``torch.Generator`` that draws the window offsets.
        text_column: column holding the text for datasets and json/csv/parquet files.
        dataset_config: Hub dataset configuration.
        split: Hub dataset split.
        show_progress: show a tqdm bar while tokenizing.
        data_dir: the local data folder for corpus aliases; default ``$UNITE_HF_DATA_DIR``, else none
            (the Hub).

    Documents are stripped of surrounding whitespace, empty ones dropped, tokenized without special
    tokens and joined with ``tokenizer.eos_token_id`` between them (no separator if the tokenizer has
    no eos token). Windows start at offsets drawn uniformly from ``[0, L - T - 1]`` of the ``L``-token
    stream, so the same seed gives the same ids. If ``L < N * T`` the windows necessarily overlap and
    a warning is emitted.

    Raises:
        ValueError: bad ``num_sequences``/``seq_len``, an empty corpus, a corpus with fewer than
            ``seq_len + 1`` tokens, a missing tokenizer, an ambiguous text column, a bad tensor.
        TypeError: an unsupported ``calibration`` type.
        FileNotFoundError: a path-like string or ``PathLike`` that does not exist.
        CalibrationLoadError: the corpus could not be loaded from the Hub or a data file.
    """
    if isinstance(calibration, CalibrationSet):
        return calibration
    _check_positive_int("num_sequences", num_sequences)
    _check_positive_int("seq_len", seq_len)
    if isinstance(calibration, torch.Tensor):
        return _from_tensor(calibration, tokenizer, seed)

    docs, name = _resolve_documents(calibration, tokenizer, text_column, dataset_config, split, data_dir)
    if not docs:
        raise ValueError(f"calibration corpus {name!r} is empty (no non-blank documents)")
    stream = _tokenize_documents(docs, tokenizer, show_progress)
    input_ids = _sample_windows(stream, num_sequences, seq_len, seed)
    return CalibrationSet(input_ids=input_ids, name=name, seed=seed)


def _require_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is None:
        raise ValueError(
            f"a tokenizer is required to turn {what} into token ids "
            "(pass tokenizer=AutoTokenizer.from_pretrained(...)), or pass an input_ids tensor"
        )
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable Hugging Face tokenizer, got {type(tokenizer).__name__}")


def _resolve_documents(
    calibration: Any, tokenizer: Any, text_column: str | None, dataset_config: str | None, split: str,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[str], str]:
    """Turn any text input into (documents, provenance name)."""
    if isinstance(calibration, (str, os.PathLike)):
        is_pathlike = not isinstance(calibration, str)
        s = os.fspath(calibration)
        if not is_pathlike and s.lower() in CORPUS_ALIASES:
            _require_tokenizer(tokenizer, f"calibration corpus {s!r}")
            return _documents_from_alias(s.lower(), text_column, dataset_config, split, find_local_data_dir(data_dir))
        path = Path(s).expanduser()
        if path.is_file():
            _require_tokenizer(tokenizer, f"calibration file {s!r}")
            docs = _documents_from_file(path, text_column)  # named by file name and content: no local folder
            return docs, _described(f"{path.name} (local file, ", docs)
        if path.is_dir():
            raise ValueError(f"calibration path {s!r} is a directory; pass a text or json(l) file")
        if is_pathlike or _looks_like_path(s):
            raise FileNotFoundError(f"calibration file {s!r} does not exist")
        _require_tokenizer(tokenizer, f"Hub dataset {s!r}")
        ds = _load_hub_dataset(s, dataset_config, split)
        texts, _ = _dataset_texts(ds, text_column, _hub_name(s, dataset_config, split))
        return _clean_documents(texts), _hub_name(s, dataset_config, split)

    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise ValueError("calibration list is empty")
        _require_tokenizer(tokenizer, "a list of strings")
        docs = _clean_documents(calibration)
        return docs, _described(f"list of {len(calibration)} strings (", docs)

    import datasets

    if isinstance(calibration, (datasets.Dataset, datasets.DatasetDict)):
        if isinstance(calibration, datasets.Dataset) and len(calibration) == 0:
            raise ValueError("calibration dataset is empty (0 rows)")
        texts, column = _dataset_texts(calibration, text_column, "the calibration dataset")
        _require_tokenizer(tokenizer, "a datasets.Dataset")
        docs = _clean_documents(texts)
        return docs, _described(f"datasets.Dataset[{column}] ({len(calibration)} rows, ", docs)

    raise TypeError(
        f"unsupported calibration input of type {type(calibration).__name__}; expected a corpus alias "
        f"({', '.join(CORPUS_ALIASES)}), a file path, a Hub dataset id, a list of strings, a "
        "datasets.Dataset, an input_ids tensor or a CalibrationSet"
    )


def load_mixed_calibration(
    corpora: Sequence[CalibrationInput],
    tokenizer: Any = None,
    *,
    num_sequences: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    show_progress: bool = True,
    **kwargs: Any,
) -> CalibrationSet:
    """Windows from several corpora in equal shares, shuffled together (seeded): a small stand-in for
    a multi-domain pretraining mix such as RedPajama. ``kwargs`` go to :func:`load_calibration`."""
    if isinstance(corpora, (str, os.PathLike)) or not corpora:
        raise ValueError("corpora must be a non-empty list of calibration inputs")
    _check_positive_int("num_sequences", num_sequences)
    if num_sequences < len(corpora):
        raise ValueError(f"num_sequences={num_sequences} is fewer than the {len(corpora)} corpora to mix")
    shares = [num_sequences // len(corpora) + (i < num_sequences % len(corpora)) for i in range(len(corpora))]
    parts = [load_calibration(corpus, tokenizer, num_sequences=share, seq_len=seq_len, seed=seed + i,
                              show_progress=show_progress, **kwargs)
             for i, (corpus, share) in enumerate(zip(corpora, shares))]
    input_ids = torch.cat([part.input_ids for part in parts])
    order = torch.randperm(input_ids.shape[0], generator=torch.Generator().manual_seed(seed))
    name = "mix(" + ", ".join(part.name for part in parts) + ")"
    return CalibrationSet(input_ids=input_ids[order], name=name, seed=seed)
