"""Safe, atomic safetensors I/O shared by every artifact the library writes.

- Writes go to a temporary file in the destination folder and are renamed into place, so a crash
  never leaves a half-written file under the final name.
- Every artifact records the size and SHA-256 of its tensor files in its JSON config, which is
  written last: a save interrupted between files leaves a config that disagrees with the files, and
  loading refuses it instead of mixing old and new tensors.
- Loading is safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CorruptedFileError(ValueError):
    """A file on disk is truncated, corrupted or does not match its recorded checksum."""


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _default_mode() -> int:
    """What a plain ``open()`` would give: 0o666 less the umask (``mkstemp`` makes 0o600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace(tmp: str, path: Path) -> None:
    try:
        os.chmod(tmp, _default_mode())  # genes and reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first floating tensor that holds NaN or Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to write {what}: tensor {name!r} contains NaN or Inf")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` to ``path`` atomically; return ``{"size", "sha256"}`` of the written file."""
    path = Path(path)
    check_finite(tensors, path.name)
    # safetensors refuses shared or strided storage; contiguous copies of views are what we store
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    handle, tmp = _atomic_target(path)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle_:
            os.fsync(handle_.fileno())  # the rename must not land before the data does
        record = {"size": os.path.getsize(tmp), "sha256": sha256_of(tmp)}
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _replace(tmp, path)
    return record


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    path = Path(path)
    handle, tmp = _atomic_target(path)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _replace(tmp, path)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


def load_safetensors_checked(path: str | os.PathLike, record: dict[str, Any] | None = None,
                             verify_checksum: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking it against ``record`` (size, sha256) when given."""
    path = Path(path)
    if not path.is_file():
        raise CorruptedFileError(f"{path} is missing")
    if record is not None:
        size = path.stat().st_size
        if size != record["size"]:
            raise CorruptedFileError(
                f"{path} is {size} bytes but {record['size']} were written: the file is truncated or was "
                "replaced (an interrupted save or download?)."
            )
        if verify_checksum and sha256_of(path) != record["sha256"]:
            raise CorruptedFileError(f"{path} does not match its recorded SHA-256: the file is corrupted.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptedFileError(f"{path} is not a readable safetensors file: {err}") from err
