"""Safe, atomic I/O shared by every artifact the library writes.

- **Folders are replaced whole.** :func:`write_folder_atomically` stages the new content in a sibling
  folder ``.{name}.tmp-{pid}-{token}`` and swaps it in with one ``renameat2(RENAME_EXCHANGE)`` (Linux;
  elsewhere two renames, with the old folder kept as ``.{name}.old-{pid}-{token}`` until the new one is
  in place and restored by the next write if a crash falls between them). At every instant the path
  holds the complete old content or the complete new one, never a mix, and files of the old content
  that the new one does not have are gone. Writers of one path are serialized by a ``filelock`` kept in
  the user's lock folder (:func:`lock_path`), not beside the folder: a lock file next to a saved folder
  would travel with the parent folder (Trainer uploads ``output_dir``, which holds its checkpoints).
- **Single files** go to a temporary ``.{name}.{pid}.{token}.tmp`` beside them and are renamed into place.
- **Leftovers are cleaned.** Temporary names carry the writer's pid; the next write of the same path
  removes those whose process is gone, never a live writer's. Hub pushes stage their copy the same way
  (:func:`push_staging`), so the next push or save removes what a killed push left in the temp folder.
- **Records name files inside the folder** (:func:`record_path`): no absolute path, ``..`` or link out.
- **Names are checked first** (:func:`check_name_length`): a name too long for the staged sibling is one
  clear error before anything is written, and a failed write's cleanup never masks its error.
- **Checksums.** :func:`file_records` records the size and SHA-256 of every file of a folder; the
  artifact's config (written last, inside the staged folder) holds them, and loading verifies them.
- **Reproducible bytes.** Safetensors headers (tensor entries and metadata) and JSON files are
  written with sorted keys, so the same content always gives the same bytes.
- **Write failures** (disk full, file-size limit) raise :class:`ArtifactWriteError`, an ``OSError``
  with a one-line message; the old content stays in place.
- Loading is safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import struct
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__

T = TypeVar("T")


class CorruptedFileError(ValueError):
    """A file on disk is truncated, corrupted or does not match its recorded checksum."""


class ArtifactWriteError(OSError):
    """Writing an artifact failed (disk full, file-size limit, read-only folder); the old content is intact."""


class TargetFormatError(ValueError):
    """A target's checksum record has a format this version of unite_hf cannot read: a newer one wrote it."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one file."""
    return {"size": os.path.getsize(path), "sha256": sha256_of(path)}


def file_records(directory: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"size", "sha256"}}`` of every file under ``directory`` (sorted), bar ``exclude``."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return {p.relative_to(root).as_posix(): file_record(p) for p in files
            if p.relative_to(root).as_posix() not in exclude}


def verify_file(path: Path, record: Any, verify_checksum: bool = True) -> None:
    """Raise :class:`CorruptedFileError` unless ``path`` exists with the recorded size (and SHA-256)."""
    if not path.is_file():
        raise CorruptedFileError(f"{path} is missing")
    size = path.stat().st_size
    if size != record["size"]:
        raise CorruptedFileError(
            f"{path} is {size} bytes but {record['size']} were written: the file is truncated or was "
            "replaced (an interrupted save or download?)."
        )
    if verify_checksum and sha256_of(path) != record["sha256"]:
        raise CorruptedFileError(f"{path} does not match its recorded SHA-256: the file is corrupted.")


def record_name_problem(name: Any) -> str | None:
    """Why ``name`` is not the name of a file inside a folder (None when it is): a checksum record names a
    relative posix path with no empty, ``.`` or ``..`` part, no backslash and no NUL. Decided from the name
    alone, so a record can never make a load look at another path (``/etc/passwd``, ``../x``)."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if name.startswith("/") or "\\" in name or "\0" in name:
        return "is an absolute path or holds a backslash or NUL"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' part"
    return None


def _allowed_roots(directory: Path) -> list[str]:
    """Where the files of ``directory`` may really lie: inside it, and for a Hub cache snapshot
    (``.../snapshots/<commit>``, whose files link to ``../../blobs/<hash>``) in its repo's ``blobs``."""
    roots = [os.path.realpath(directory)]
    if directory.parent.name == "snapshots":
        roots.append(os.path.realpath(directory.parent.parent / "blobs"))
    return roots


def record_path(directory: str | os.PathLike, name: Any) -> Path:
    """``directory / name`` for a checksum record's ``name``, or :class:`CorruptedFileError` when the name is
    not a file inside the folder (:func:`record_name_problem`) or leads out of it through a symbolic link.
    Checked before the named file is touched (only links inside the folder are read), and the error is the
    same whatever lies at the named path, so a record cannot be used to learn about other files."""
    directory = Path(directory)
    problem = record_name_problem(name)
    if problem is None:
        roots, current = _allowed_roots(directory), directory
        for part in name.split("/"):
            current = current / part
            if current.is_symlink():
                real = os.path.realpath(current)
                if not any(real == root or real.startswith(root + os.sep) for root in roots):
                    problem = "is a symbolic link to a file outside the folder"
                    break
    if problem is not None:
        raise CorruptedFileError(f"{directory}: the checksum record of {str(name)[:200]!r} {problem}; a record names "
                                 "a file inside the folder, so it was refused without reading the path it names")
    return directory / name


# -- temporary names and stale leftovers ---------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _temp_name(name: str, kind: str) -> str:
    """A hidden sibling name carrying the writer's pid, so a live writer's leftovers are never removed."""
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _stale_siblings(parent: Path, name: str) -> Iterator[tuple[Path, str]]:
    """``(path, kind)`` of leftovers of dead writers of ``parent / name``: staged or old folders, temp files."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(tmp|old)-(\d+)-[0-9a-f]+|(\d+)\.[0-9a-f]+\.tmp)$")
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if match:
            pid = int(match.group(2) or match.group(3))
            if not _pid_alive(pid):
                yield entry, match.group(1) or "file"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    """:func:`_remove`, best effort: the cleanup after a failed write must not replace its error with its own
    (on a read-only file system even unlinking a missing name fails, with EROFS; a name too long, with
    ENAMETOOLONG)."""
    try:
        _remove(path)
    except OSError:
        pass


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the leftovers of dead writers of ``path``; restore an old folder a crash left aside.

    Returns what was removed. Called by every write, under the path's lock for folders."""
    path = Path(os.path.abspath(path))
    removed = []
    for entry, kind in sorted(_stale_siblings(path.parent, path.name)):
        if kind == "old" and not path.exists():
            os.rename(entry, path)  # the crash fell between the two renames of the fallback swap
            continue
        _remove(entry)
        removed.append(entry)
    return removed


# -- single files ------------------------------------------------------------------------------------

def _default_mode() -> int:
    """What a plain ``open()`` would give: 0o666 less the umask (``mkstemp`` makes 0o600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename never lands before the data."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # folders cannot be opened for fsync on some systems (Windows): best effort
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def _write_error(what: Path) -> Iterator[None]:
    """Turn a failed write (disk full, file too large, read-only) into one clear ArtifactWriteError."""
    try:
        yield
    except ArtifactWriteError:
        raise
    except (OSError, SafetensorError) as err:
        code = err.errno if isinstance(err, OSError) else None
        if code is None:  # safetensors reports the OS error inside its message: "... (os error 28)"
            found = re.search(r"os error (\d+)", str(err))
            code = int(found.group(1)) if found else None
        reason = os.strerror(code) if code else str(err)
        raise ArtifactWriteError(code or errno.EIO, f"could not write {what}: {reason}") from err


def _atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a pid-named sibling, fsync, and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for entry, kind in _stale_siblings(path.parent, path.name):
        if kind == "file":
            entry.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with _write_error(path):
            write(tmp)
            _fsync_path(tmp)  # the rename must not land before the data does
            os.chmod(tmp, _default_mode())  # genes and reports are meant to be shared
            os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first floating tensor that holds NaN or Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to write {what}: tensor {name!r} contains NaN or Inf")


def _canonical_safetensors_header(path: Path) -> None:
    """Rewrite the header of a safetensors file with sorted keys (same length, so in place).

    safetensors writes its metadata from a hash map, in an order that varies between processes; the
    tensor data and offsets do not depend on it, so sorting the header makes the bytes reproducible."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        if len(canonical) > length:  # cannot happen for a header safetensors wrote; keep its order then
            return
        handle.seek(8)
        handle.write(canonical + b" " * (length - len(canonical)))  # safetensors pads with spaces


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` to ``path`` (canonical header); return ``{"size", "sha256"}``.

    Not atomic by itself: meant for files inside a folder staged by :func:`write_folder_atomically`."""
    path = Path(path)
    check_finite(tensors, path.name)
    # safetensors refuses shared or strided storage; contiguous copies of views are what we store
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with _write_error(path):
        save_file(tensors, path, metadata=metadata)
        _canonical_safetensors_header(path)
        os.chmod(path, _default_mode())  # safetensors creates 0o600 files; genes are meant to be shared
    return file_record(path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` to ``path`` atomically; return ``{"size", "sha256"}`` of the written file."""
    path = Path(path)
    check_finite(tensors, path.name)
    _atomic_file(path, lambda tmp: save_safetensors(tensors, tmp, metadata))
    return file_record(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    _atomic_file(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def json_bytes(data: Any) -> bytes:
    """Canonical JSON: sorted keys, two-space indent, trailing newline (reproducible bytes)."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def atomic_write_json(data: dict[str, Any], path: str | os.PathLike) -> None:
    atomic_write_bytes(json_bytes(data), path)


def load_safetensors_checked(path: str | os.PathLike, record: dict[str, Any] | None = None,
                             verify_checksum: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking it against ``record`` (size, sha256) when given.

    The file is opened once and both checked and read through that one descriptor (on Linux), so a
    save that replaces it in between cannot pair one file's checksum with another file's tensors."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError as err:
        raise CorruptedFileError(f"{path} is missing") from err
    with handle:
        if record is not None:
            size = os.fstat(handle.fileno()).st_size
            if size != record["size"]:
                raise CorruptedFileError(
                    f"{path} is {size} bytes but {record['size']} were written: the file is truncated or was "
                    "replaced (an interrupted save or download?).")
            if verify_checksum:
                digest = hashlib.sha256()
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
                if digest.hexdigest() != record["sha256"]:
                    raise CorruptedFileError(f"{path} does not match its recorded SHA-256: the file is corrupted.")
        same_file = f"/proc/self/fd/{handle.fileno()}"
        try:
            return load_file(same_file if os.path.exists(same_file) else path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CorruptedFileError(f"{path} is not a readable safetensors file: {err}") from err


# -- whole folders ------------------------------------------------------------------------------------

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux / glibc < 2.28 (TypeError: Windows)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot exchange
        return False
    raise OSError(err, f"could not swap {a} into {b}: {os.strerror(err)}")


def _link_tree(source: Path, destination: Path) -> None:
    """Hard-link (copy where links fail) ``source`` into ``destination``: no data copied, the old
    entry untouched until the swap."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True, copy_function=link)
    elif source.is_symlink():
        os.symlink(os.readlink(source), destination)
    else:
        link(str(source), str(destination))


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_path(Path(root) / name)
        _fsync_path(Path(root), directory=True)


def _check_replaceable(path: Path, owned: Callable[[str], bool] | None) -> None:
    if owned is None:
        return
    foreign = sorted(entry.name for entry in path.iterdir() if not owned(entry.name))
    if foreign:
        raise ArtifactWriteError(
            errno.EEXIST, f"refusing to replace {path}: it holds files that are not part of this artifact "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose an empty or new folder")


#: names that mark a folder or a Hub repo as an artifact of some kind: a save or push of another kind
#: refuses it (a target never replaces a gene or an adapter, a gene never replaces a model)
ARTIFACT_MARKERS = {"gene_config.json": "a unite_hf gene", "adapter_config.json": "a peft adapter",
                    "config.json": "a transformers model"}
#: the marks a target save or push refuses (a target's own folder holds config.json)
TARGET_REFUSES = ("gene_config.json", "adapter_config.json")


def _check_no_other_artifact(where: str, names: Iterable[str], refuse: Iterable[str], choose: str) -> None:
    found = sorted(set(names) & set(refuse))
    if found:
        raise ArtifactWriteError(
            errno.EEXIST, f"refusing to replace {where}: it holds {ARTIFACT_MARKERS.get(found[0], 'another artifact')} "
            f"({found[0]}), not this kind of artifact; choose an empty or new {choose}")


#: what the hidden siblings of a write add to the folder's name: ``.{name}.old-{pid}-{8 hex}`` (and
#: ``.{name}.{pid}.{8 hex}.tmp``), with a pid of up to 7 digits (Linux's largest pid_max, 4194304)
_SIBLING_EXTRA = len("..old--") + 7 + 8
_PATH_MAX = 4096  # Linux; the staged folder's files add their own names below it
_INNER_NAME_ROOM = 64


def _name_max(path: Path) -> int:
    """The longest file name (bytes) the file system of ``path``'s nearest existing ancestor takes."""
    for ancestor in path.parents:
        try:
            if ancestor.is_dir():
                return os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):  # a name too long itself; no pathconf (Windows)
            continue
    return 255


def check_name_length(path: str | os.PathLike) -> None:
    """Raise :class:`ArtifactWriteError` (``ENAMETOOLONG``) when a folder write could not create ``path``'s
    hidden siblings (:func:`write_folder_atomically` stages ``.{name}.tmp-{pid}-{token}`` beside it, which is
    22 bytes longer than the name), a folder above it has a name longer than the file system takes, or the
    whole path leaves no room below the system's path limit. Decided from the names, before anything is
    written or even looked up."""
    path = Path(os.path.abspath(path))
    limit = _name_max(path)
    for part in path.parts[1:-1]:
        if len(os.fsencode(part)) > limit:
            raise ArtifactWriteError(errno.ENAMETOOLONG, f"cannot write {str(path)[:120]}...: the folder name "
                                     f"{part[:40]}... is {len(os.fsencode(part))} bytes, more than the {limit} "
                                     "this file system takes")
    size = len(os.fsencode(path.name))
    if size + _SIBLING_EXTRA > limit:
        raise ArtifactWriteError(errno.ENAMETOOLONG, f"cannot write {path.name[:40]}... in {path.parent}: its name "
                                 f"is {size} bytes; a save stages the folder beside it under a name "
                                 f"{_SIBLING_EXTRA} bytes longer, so names of up to {limit - _SIBLING_EXTRA} bytes "
                                 "can be saved on this file system")
    if len(os.fsencode(str(path))) + _SIBLING_EXTRA + _INNER_NAME_ROOM > _PATH_MAX:
        raise ArtifactWriteError(errno.ENAMETOOLONG, f"cannot write {str(path)[:120]}...: the path is "
                                 f"{len(os.fsencode(str(path)))} bytes, too close to the system's limit of {_PATH_MAX}")


def check_writable_folder(path: str | os.PathLike, owned: Callable[[str], bool] | None = None) -> None:
    """Cheap checks before an expensive job that ends by writing the folder ``path``: its name leaves room
    for the staged sibling (:func:`check_name_length`), it is not an existing file, the nearest existing
    folder above it takes a new file (probed by creating and removing one, so read-only mounts and
    permissions are both caught), and an existing folder holds nothing foreign (see
    :func:`write_folder_atomically`). Raises :class:`ArtifactWriteError`."""
    check_name_length(path)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArtifactWriteError(errno.ENOTDIR, f"{path} exists and is not a folder")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArtifactWriteError(errno.ENOTDIR, f"cannot create {path}: {ancestor} is not a folder")
    probe = ancestor / f".unite-write-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with _write_error(path):
        probe.touch(exist_ok=False)
        probe.unlink()
    if path.is_dir():
        _check_replaceable(path, owned)


#: where the locks of folder writes live (one empty file per folder ever written); unset: the user's cache
LOCK_DIR_ENV = "UNITE_HF_LOCK_DIR"


def _user_home() -> Path:
    """The home folder of the process's user from the password database, not ``$HOME``: processes of one
    user that run with another ``$HOME`` (a test harness, ``sudo -E``) still share one lock folder."""
    try:
        import pwd

        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError, AttributeError):  # Windows, or a uid without an entry (containers)
        return Path.home()


def _private_dir(path: Path) -> Path | None:
    """``path`` created (mode 0o700 where new) and usable as a lock folder, else None: it must be a folder
    of ours, not a link, that takes new files."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path):
            return None
        if hasattr(os, "getuid") and info.st_uid != os.getuid():  # someone else's folder (a shared /tmp)
            return None
        return path if os.access(path, os.W_OK | os.X_OK) else None
    except OSError:
        return None


def lock_dir() -> Path:
    """The folder of the locks that serialize writers of one folder path: ``$UNITE_HF_LOCK_DIR``, else
    ``~/.cache/unite_hf/locks`` (the home of the user in the password database), else, where that
    cannot be created (a read-only home), ``{tempdir}/unite_hf-locks-{uid}``. Every process that writes
    one path must see the same folder, so locks are per user and per host (as before: per host)."""
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    found = _private_dir(_user_home() / ".cache" / "unite_hf" / "locks")
    if found is not None:
        return found
    import tempfile

    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    fallback = _private_dir(Path(tempfile.gettempdir()) / f"unite_hf-locks-{user}")
    if fallback is None:
        raise ArtifactWriteError(errno.EACCES, f"no folder for write locks: set {LOCK_DIR_ENV} to a writable folder")
    return fallback


def _pushes_dir(create: bool) -> Path | None:
    """``{tempdir}/unite_hf-pushes-{uid}``: where pushes stage what they upload (private to the user; None
    where it cannot be used, or, with ``create=False``, does not exist)."""
    import tempfile

    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    folder = Path(tempfile.gettempdir()) / f"unite_hf-pushes-{user}"
    if not create and not folder.is_dir():
        return None
    return _private_dir(folder)


def clean_dead_pushes() -> list[Path]:
    """Remove what pushes killed mid-way left in :func:`push_staging`'s folder (their pid is gone; a live
    push's folder stays); best effort. Every push and every folder save calls it."""
    try:
        folder = _pushes_dir(create=False)
        return clean_stale(folder / "push") if folder is not None else []
    except OSError:
        return []


@contextmanager
def push_staging() -> Iterator[str]:
    """A fresh folder to save an artifact into before a Hub push uploads it, removed afterwards: a hidden
    ``.push.tmp-{pid}-{token}`` in ``{tempdir}/unite_hf-pushes-{uid}``, so that a push killed with the copy
    half uploaded (no ``finally`` runs after ``kill -9``) leaves a folder the next push or save removes,
    as a killed save's staging folder is (a ``tempfile.TemporaryDirectory`` would stay in the temp folder
    for good). Where that folder cannot be used (someone else's), a plain temporary folder."""
    import tempfile

    clean_dead_pushes()
    folder = _pushes_dir(create=True)
    if folder is None:
        with tempfile.TemporaryDirectory() as plain:
            yield plain
        return
    staging = folder / _temp_name("push", "tmp")
    staging.mkdir()
    try:
        yield str(staging)
    finally:
        _discard(staging)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of writes of the folder ``path``: in :func:`lock_dir`, named by the SHA-256 of the
    folder's absolute path with its parent's links resolved (so every name of one folder maps to one
    lock), plus the folder's name for whoever lists the lock folder. Nothing is written beside ``path``."""
    path = Path(os.path.abspath(path))
    real = os.path.join(os.path.realpath(path.parent), path.name)
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:32]
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", path.name)[:48]
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{readable}-{digest}.lock"


def _remove_legacy_lock(path: Path) -> None:
    """Remove the empty ``.{name}.lock`` that unite_hf versions before the lock folder left beside a
    folder they saved (a Hub upload of the parent folder would carry it)."""
    legacy = path.parent / f".{path.name}.lock"
    try:
        if legacy.is_file() and not legacy.is_symlink() and legacy.stat().st_size == 0:
            legacy.unlink()
    except OSError:
        pass


def write_folder_atomically(path: str | os.PathLike, write: Callable[[Path], T], *,
                            owned: Callable[[str], bool] | None = None, keep_foreign: bool = False,
                            refuse: tuple[str, ...] = ()) -> T:
    """Replace the folder ``path`` by what ``write(staging_folder)`` puts in a fresh staging folder.

    ``owned(name)`` says which top-level entries of an existing folder belong to the artifact. With
    ``keep_foreign=False`` an existing folder holding any other entry is refused (so a mistyped path
    never replaces someone's folder); with ``keep_foreign=True`` other entries (a tokenizer, Trainer
    checkpoints) are hard-linked into the new folder before the swap. An existing folder holding one of
    the names ``refuse`` (the marks of another artifact, :data:`ARTIFACT_MARKERS`) is refused before
    ``write`` runs, whatever ``keep_foreign`` says. Entries the artifact owns but the
    new write did not produce are gone after the swap. Raises :class:`ArtifactWriteError` (an
    ``OSError``) when the folder cannot be written; the old folder is then untouched.
    """
    from filelock import FileLock

    path = Path(os.path.abspath(path))  # "." and "x/.." name a folder by a name that cannot be renamed
    check_name_length(path)  # before any lookup: a name too long fails them all with a bare OSError
    clean_dead_pushes()  # the copies that pushes killed mid-way left in the temp folder
    if path.is_symlink():
        path = path.resolve()  # replace the folder the link points to, not the link
    if path.exists() and not path.is_dir():
        raise ArtifactWriteError(errno.ENOTDIR, f"{path} exists and is not a folder")
    parent = path.parent
    with _write_error(path):
        parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path(path)))
        lock.acquire()
    try:
        _remove_legacy_lock(path)
        with _write_error(path):  # a read-only file system fails here first where dead writers left something
            clean_stale(path)
        if path.exists():
            _check_no_other_artifact(str(path), (entry.name for entry in path.iterdir()), refuse, "folder")
            _check_replaceable(path, None if keep_foreign else owned)
        staging = parent / _temp_name(path.name, "tmp")
        try:
            with _write_error(path):
                staging.mkdir()
                result = write(staging)
                if keep_foreign and path.is_dir():
                    for entry in sorted(path.iterdir()):
                        if (owned is None or not owned(entry.name)) and not (staging / entry.name).exists():
                            _link_tree(entry, staging / entry.name)
                _fsync_tree(staging)
                inside = _cwd_inside(path)
                _swap_in(staging, path)
                _fsync_path(parent, directory=True)
                if inside is not None:  # the process worked inside the old folder: follow it to the new one
                    os.chdir(path / inside if (path / inside).is_dir() else path)
        except ArtifactWriteError as err:
            _discard(staging)
            # one line that names the destination, not the staging folder
            raise ArtifactWriteError(err.errno, f"could not write {path}: {os.strerror(err.errno)}; its previous "
                                     "content is unchanged") from err
        except BaseException:
            _discard(staging)
            raise
    finally:
        lock.release()
    return result


def _cwd_inside(path: Path) -> Path | None:
    """The current folder relative to ``path`` when it lies inside it (``Path(".")`` for ``path`` itself)."""
    try:
        return Path.cwd().resolve().relative_to(path.resolve())
    except (ValueError, OSError):
        return None


def _swap_in(staging: Path, path: Path) -> None:
    """Put ``staging`` at ``path``; the old folder (if any) ends up at a temporary name, then removed."""
    if not path.exists():
        os.rename(staging, path)
        return
    if _exchange(staging, path):
        _remove(staging)  # now the old content
        return
    old = path.parent / _temp_name(path.name, "old")
    os.rename(path, old)  # a crash here leaves `old`, which the next write's clean_stale restores
    os.rename(staging, path)
    _remove(old)


_STAGING_NAME = re.compile(r"^\.(.+)\.tmp-\d+-[0-9a-f]+$")


def destination_name(folder: str | os.PathLike) -> str:
    """The name of the folder a save ends up in: ``folder``'s own name, or for a staging folder of
    :func:`write_folder_atomically` (``.{name}.tmp-{pid}-{token}``, staged inside another one too) ``name``:
    what a card written into the staging folder is titled with, so that a save's bytes depend on the
    destination's name only."""
    name = os.path.basename(os.path.normpath(os.fspath(folder)))
    while (match := _STAGING_NAME.match(name)) is not None:
        name = match.group(1)
    return name


#: how many times a load of a folder runs while saves keep swapping the folder in under it
LOAD_ATTEMPTS = 5


def folder_identity(directory: str | os.PathLike) -> tuple[int, int, int] | None:
    """(device, inode, ctime) of a folder: a save swaps a new folder in, so this changes with every save
    (the ctime too, so that a new folder that reuses a removed one's inode number is still told apart)."""
    try:
        stat = os.stat(directory)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


@contextmanager
def _saves_held(directories: list[str]) -> Iterator[None]:
    """Hold the write locks of ``directories`` (:func:`lock_path`), so that unite_hf saves of them by this
    user on this host wait meanwhile; a lock that cannot be taken (no lock folder) is skipped."""
    from filelock import FileLock

    held = []
    try:
        for directory in directories:
            try:
                lock = FileLock(str(lock_path(os.path.realpath(directory) if os.path.islink(directory) else directory)))
                lock.acquire()
            except OSError:
                continue
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def load_unchanged(directories: Iterable[str | os.PathLike], load: Callable[[], T],
                   attempts: int = LOAD_ATTEMPTS) -> T:
    """``load()``, run again when a save swapped one of ``directories`` in while it ran (a load that read
    one save's config and another's weights, or failed on a file that went): the result is always one
    save's whole content. The last attempt holds the folders' write locks, so unite_hf saves wait for it
    rather than make it fail too. Raises what ``load`` raised if the folders did not change meanwhile, and
    :class:`CorruptedFileError` if they changed during every one of ``attempts`` loads (writers that do not
    take unite_hf's locks: another user's, another host's)."""
    directories = [os.fspath(directory) for directory in directories]

    def identities() -> list[tuple[int, int, int] | None]:
        return [folder_identity(directory) for directory in directories]

    changing = CorruptedFileError(f"{directories[0]} kept changing while it was loaded ({attempts} attempts): other "
                                  "processes save it over and over; load it when they are done")
    for attempt in range(attempts):
        last = attempt == attempts - 1
        with _saves_held(directories) if last else contextlib.nullcontext():
            before = identities()
            try:
                result = load()
            except Exception as err:  # noqa: BLE001 - any failure, if the folder changed under it
                if identities() == before:
                    raise
                if last:
                    raise changing from err
                continue
            if identities() == before:
                return result
    raise changing


# -- targets (transformers checkpoints saved by unite_hf) ---------------------------------------------

#: the size and SHA-256 of every file a unite_hf target save wrote, verified by ``from_pretrained``
TARGET_CHECKSUMS_NAME = "unite_checksums.json"
# The names transformers loads a checkpoint from (config, weights, shards, their indexes), plus leftovers of
# per-file writes (`.model.safetensors.123.ab12.tmp`): a model save replaces these even where no earlier
# save recorded them, since a stale one (an unsharded model.safetensors beside new shards) would be loaded
# in place of, or mixed with, the new weights.
_CHECKPOINT_NAMES = re.compile(r"^(config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors"
                               r"|pytorch_model(-\d{5}-of-\d{5})?\.bin|(model\.safetensors|pytorch_model\.bin)\.index\.json"
                               r"|" + re.escape(TARGET_CHECKSUMS_NAME) + r"|\..+\.tmp)$")
#: the format of :data:`TARGET_CHECKSUMS_NAME` written and read here; a record of a newer one is refused
TARGET_RECORD_FORMAT = 1
# The files from_pretrained may read from a target folder: config, weights and shards of any variant
# (model.fp16-00001-of-00002.safetensors), their indexes, and the remote code a target save writes. A target's
# record must list each one the folder holds: an unrecorded one would load unverified (transformers prefers an
# unsharded model.safetensors to the shards, and reads a pytorch_model.bin where the safetensors are gone).
_TARGET_LOADED_NAMES = re.compile(r"^(config\.json|generation_config\.json"
                                  r"|(model|pytorch_model|tf_model|flax_model)([.-][\w.-]*)?\.(safetensors|bin|h5|msgpack)"
                                  r"|(model\.safetensors|pytorch_model\.bin)\.index(\.[\w-]+)?\.json"
                                  r"|(configuration|modeling)_unite\.py|model_structure\.py)$")


#: how the files a tokenizer's ``save_pretrained`` writes begin (tokenizer.json, tokenizer_config.json,
#: special_tokens_map.json, vocab.json, merges.txt, added_tokens.json, chat_template.jinja, ...)
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")


def is_tokenizer_file(name: str) -> bool:
    """Whether ``name`` (a path relative to a model folder) is a tokenizer's file."""
    return "/" not in name and name.startswith(TOKENIZER_FILE_PREFIXES)


def _recorded_names(manifest: Path) -> set[str]:
    """The paths a checksum record (``{"files": {path: record}}``) lists; empty where it is absent or unreadable."""
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, dict) else set()


def target_owner(directory: str | os.PathLike, also: Callable[[str], bool] | None = None) -> Callable[[str], bool]:
    """``owned(name)`` for a model save into the folder ``directory``: what the previous save recorded in
    its :data:`TARGET_CHECKSUMS_NAME`, the names transformers loads a checkpoint from, and ``also``.
    Anything else (the user's README, notes, other ``*.safetensors`` or ``modeling_*.py``, a tokenizer saved
    beside the model, Trainer checkpoints, training_args.bin) is not the save's: it is kept. The record is
    read at the first call, i.e. under the folder's write lock."""
    recorded: list[set[str]] = []

    def owned(name: str) -> bool:
        if not recorded:
            recorded.append({path.split("/")[0] for path in _recorded_names(Path(directory) / TARGET_CHECKSUMS_NAME)})
        return name in recorded[0] or bool(_CHECKPOINT_NAMES.match(name)) or (also is not None and also(name))

    return owned


def save_target_folder(save_directory: str | os.PathLike, save: Callable[[Path], T], *, tokenizer: bool = False) -> T:
    """Replace ``save_directory`` atomically with what ``save(staging)`` writes, plus
    :data:`TARGET_CHECKSUMS_NAME` (which records every file the save wrote, a tokenizer included). Files of
    the folder that the save neither writes nor owns (see :func:`target_owner`) are kept; a folder holding a
    gene or a peft adapter (:data:`TARGET_REFUSES`) is refused with :class:`ArtifactWriteError` before
    ``save`` runs. ``tokenizer``: the save writes a tokenizer, so the folder's tokenizer files are its own
    (those a previous save recorded and this one lacks go); otherwise they stay as they are, as
    transformers' save leaves a tokenizer saved beside the model."""
    def write(staging: Path) -> T:
        result = save(staging)
        record_target_checksums(staging)
        return result

    owner = target_owner(save_directory)
    owned = owner if tokenizer else (lambda name: owner(name) and not is_tokenizer_file(name))
    return write_folder_atomically(save_directory, write, owned=owned, keep_foreign=True, refuse=TARGET_REFUSES)


def save_model_folder(path: str | os.PathLike, model: Any, tokenizer: Any = None) -> None:
    """Replace the folder ``path`` atomically with ``model.save_pretrained`` plus the tokenizer, for
    any transformers model (plain Llama targets, moefied sources, UNITE targets), so that at every
    instant ``path`` holds the whole old model or the whole new one. Other files of the folder stay
    (:func:`target_owner`; with a tokenizer, the old tokenizer's files are replaced too); a folder
    holding a gene or a peft adapter is refused before anything is written."""
    tokenizer_files = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")

    def tokenizers(name: str) -> bool:
        return tokenizer is not None and name.startswith(tokenizer_files)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    write_folder_atomically(path, write, owned=target_owner(path, also=tokenizers), keep_foreign=True,
                            refuse=TARGET_REFUSES)


def record_target_checksums(directory: str | os.PathLike) -> None:
    """Write :data:`TARGET_CHECKSUMS_NAME`: the size and SHA-256 of every other file of the folder."""
    records = file_records(directory, exclude=(TARGET_CHECKSUMS_NAME,))
    (Path(directory) / TARGET_CHECKSUMS_NAME).write_bytes(json_bytes({"format_version": TARGET_RECORD_FORMAT,
                                                                      "files": records}))


def target_record_files(directory: str | os.PathLike) -> list[str]:
    """The files a target save wrote in ``directory``: those its :data:`TARGET_CHECKSUMS_NAME` records, and
    that record itself (what ``save_pretrained(push_to_hub=True)`` uploads)."""
    return sorted(_recorded_names(Path(directory) / TARGET_CHECKSUMS_NAME) | {TARGET_CHECKSUMS_NAME})


def verify_target_download(repo_id: str, kwargs: dict[str, Any]) -> bool:
    """Verify the files of a UNITE target that ``from_pretrained`` downloaded from the Hub (those in the local
    snapshot) as :func:`verify_target_folder` verifies a folder; a repo without a
    :data:`TARGET_CHECKSUMS_NAME` is refused (:class:`CorruptedFileError`) as a folder is."""
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in ("revision", "cache_dir", "token", "local_files_only", "subfolder")
           if kwargs.get(key) is not None}
    manifest = cached_file(repo_id, TARGET_CHECKSUMS_NAME, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)
    if manifest is None:
        raise CorruptedFileError(_no_record(f"the Hub repo {repo_id}", "Push it again with unite_hf installed"))
    return verify_target_folder(Path(manifest).parent, present_only=True, repo_id=repo_id)


def _no_record(where: str, again: str) -> str:
    return (f"{where} holds a UNITE target (config.json: model_type \"unite\") without its {TARGET_CHECKSUMS_NAME}: "
            "every unite_hf save and push writes that record, so it was lost (deleted, or the files copied in part) "
            "or the target was saved where unite_hf was not installed, and nothing vouches for its weights. "
            f"{again}, or pass verify=False to from_pretrained to load it unchecked.")


def _is_unite_target(directory: Path) -> bool:
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type") == "unite"
    except (OSError, ValueError, AttributeError):
        return False


def verify_target_folder(directory: str | os.PathLike, present_only: bool = False,
                         repo_id: str | None = None) -> bool:
    """Check a target folder against its :data:`TARGET_CHECKSUMS_NAME` before ``from_pretrained`` reads it:
    every recorded file matches its size and SHA-256 (the card excepted: it may be edited on the Hub), and
    every file ``from_pretrained`` may read (config, weights and shards of any variant, their indexes, the
    target's code: :data:`_TARGET_LOADED_NAMES`) is recorded, so that none loads unverified (an unrecorded
    ``model.safetensors`` beside the shards would load instead of them). Raises :class:`CorruptedFileError`,
    and :class:`TargetFormatError` for a record of a newer unite_hf ("upgrade unite_hf"). A folder without a
    record is refused when its config.json says model_type "unite" (every unite_hf save writes one); False
    for any other folder. ``present_only``: skip recorded files that are absent (a Hub snapshot holds only
    what was downloaded); ``repo_id``: the folder is a snapshot of that Hub repo (the advice is a push)."""
    directory = Path(directory)
    manifest = directory / TARGET_CHECKSUMS_NAME
    if not manifest.is_file():
        if _is_unite_target(directory):
            raise CorruptedFileError(_no_record(str(directory), "Save it again with unite_hf installed"))
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files, version = data["files"], data.get("format_version")
        # the card may be edited on the Hub; a tokenizer is recorded (a save owns and pushes what it wrote) but
        # not checked: from_pretrained does not read it, and Trainer (or any `tokenizer.save_pretrained(folder)`
        # after the model's save) writes its own tokenizer over the target's
        records = {name: record for name, record in files.items() if name != "README.md" and not is_tokenizer_file(name)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:  # RecursionError: nested deep
        raise CorruptedFileError(f"{manifest} is not a valid checksum record: {err!r}") from err
    if type(version) is not int or version < 1:
        raise CorruptedFileError(f"{manifest} is not a valid checksum record: format_version {version!r}")
    if version > TARGET_RECORD_FORMAT:
        raise TargetFormatError(f"{manifest} has format_version {version}, written by a newer unite_hf; this one "
                                f"({__version__}) reads up to {TARGET_RECORD_FORMAT}: upgrade unite_hf to load it")
    malformed = [name for name, record in records.items() if not (isinstance(record, dict) and {"size", "sha256"} <= set(record))]
    if malformed:
        raise CorruptedFileError(f"{manifest}: the records of {malformed} lack a size or a sha256")
    unrecorded = sorted(entry.name for entry in directory.iterdir()
                        if entry.name not in files and _TARGET_LOADED_NAMES.match(entry.name) and entry.is_file())
    if unrecorded:
        if repo_id is not None:
            advice = (f"the Hub repo {repo_id} mixes two pushes: push the target again (a push deletes the weights "
                      "and configs it does not upload)")
        elif all(_CHECKPOINT_NAMES.match(name) for name in unrecorded):
            advice = "they are left from another save or were put there: save the target again (a save replaces them)"
        else:
            advice = "move them out of the folder (a save keeps them: they are not under transformers' checkpoint names)"
        raise CorruptedFileError(f"{directory} holds {unrecorded}, which its {TARGET_CHECKSUMS_NAME} does not record: "
                                 "from_pretrained would read them unverified, in place of or mixed with the saved "
                                 f"target; {advice}.")
    for name, record in records.items():
        path = record_path(directory, name)  # a name outside the folder is refused before it is looked at
        if not (present_only and not path.exists()):
            verify_file(path, record)
    return True


# -- Hub pushes: the repo ends up holding the artifact, not a mix of it and an older one -------------------

#: files of a Hub repo that a push keeps although the artifact lacks them (the repo's LFS rules)
HUB_KEPT = (".gitattributes",)


class HubBase:
    """Where a push lands: the repo, the commit it builds on and the repo's files at that commit."""

    def __init__(self, repo_id: str, commit: str, files: Iterable[str]) -> None:
        self.repo_id, self.commit, self.files = repo_id, commit, tuple(files)


def hub_push_base(api: Any, repo_id: str, *, revision: str | None = None, refuse: Iterable[str] = ()) -> HubBase:
    """The commit a push to ``repo_id`` builds on (``revision``'s head, default the main branch; a pull
    request is opened from it) and the repo's files there. Called before anything is saved: a repo
    holding an artifact of another kind (one of the names ``refuse``, see :data:`ARTIFACT_MARKERS`) is
    refused with :class:`ArtifactWriteError`, since the push would delete it."""
    commit = api.repo_info(repo_id, revision=revision).sha
    files = api.list_repo_files(repo_id, revision=commit)
    _check_no_other_artifact(f"the Hub repo {repo_id}", files, refuse, "repo")
    return HubBase(repo_id, commit, files)


def hub_target_owner(api: Any, base: HubBase, tokenizer: bool = False) -> Callable[[str], bool]:
    """``owned(path)`` of a target push: the files the repo's previous :data:`TARGET_CHECKSUMS_NAME`
    records (the previous push's) and top-level files under transformers' checkpoint names. A target push
    deletes those the new target lacks and keeps every other file of the repo (a tokenizer, Trainer's
    training_args.bin, the user's files), as a target save keeps them in its folder. ``tokenizer``: the push
    uploads a tokenizer, so the recorded tokenizer files of the previous push are its own too (otherwise the
    repo's tokenizer stays, as in :func:`save_target_folder`)."""
    recorded: set[str] = set()
    if TARGET_CHECKSUMS_NAME in base.files:
        try:
            manifest = api.hf_hub_download(repo_id=base.repo_id, filename=TARGET_CHECKSUMS_NAME, revision=base.commit)
            recorded = _recorded_names(Path(manifest))
        except Exception:  # noqa: BLE001 - an unreadable record: the checkpoint names still go
            pass
    return lambda path: ((path in recorded and (tokenizer or not is_tokenizer_file(path)))
                         or ("/" not in path and bool(_CHECKPOINT_NAMES.match(path))))


def hub_commit_artifact(api: Any, base: HubBase, folder: str | os.PathLike, *, files: Iterable[str] | None = None,
                        owned: Callable[[str], bool] | None = None, commit_message: str,
                        commit_description: str | None = None, revision: str | None = None,
                        create_pr: bool = False) -> Any:
    """Upload ``files`` of ``folder`` (default: all of them) and delete, in the same commit, every file of
    the repo at ``base`` that is not among them, is not in :data:`HUB_KEPT` and that the artifact
    ``owned`` (default: every file), so the repo holds the new artifact and nothing of an older one.
    The commit names ``base.commit`` as its parent: if another commit landed on the revision since, the
    Hub refuses this one (HTTP 412) rather than delete files this push never saw; nothing changes then.
    Returns the ``CommitInfo``."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    folder = Path(folder)
    if files is None:
        files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
                 and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    added = sorted(set(files))
    operations: list[Any] = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in added]
    uploaded = set(added)
    operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(base.files)
                   if name not in uploaded and name not in HUB_KEPT and (owned is None or owned(name))]
    return api.create_commit(base.repo_id, operations, commit_message=commit_message,
                             commit_description=commit_description, revision=revision, create_pr=create_pr,
                             parent_commit=base.commit)
