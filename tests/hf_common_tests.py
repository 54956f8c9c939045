"""transformers' own common model and config tests, fetched from the transformers source distribution.

transformers does not install its test suite. Its PyPI source distribution (sdist) carries
``tests/test_modeling_common.py`` (``ModelTesterMixin``) and ``tests/test_configuration_common.py``
(``ConfigTester``), but not three modules they import relatively. :func:`common_tests_package` fetches the
sdist of the *installed* transformers version once (``pip download``, the ordinary client), unpacks just
those two files into a small importable package under the user cache, writes a stand-in for each missing
module (each stand-in says why it is what it is), and puts the package on ``sys.path``. Later runs reuse
the cached package; it is built in a temporary folder and renamed into place, so a run interrupted or
racing another never leaves a half-built package behind.

Not a test module itself (its name does not start with ``test_``): ``test_transformers_common.py`` uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
"""The import name of the unpacked tests (not ``tests``: that name is too common to claim on sys.path)."""

COPIED = ("test_modeling_common.py", "test_configuration_common.py")

# The three modules the two files import relatively that the sdist does not carry: path -> source.
STAND_INS = {
    "exporters/test_export.py": '''"""Stand-in for transformers' ``tests/exporters/test_export.py``, absent from the sdist.

``ModelTesterMixin`` derives from ``ExportTesterMixin``, whose tests export models with ``torch.export``.
Those tests live only in that module, which the sdist does not ship, so they are NOT run here: this
empty mixin only lets ``test_modeling_common`` import. Every test ModelTesterMixin defines itself runs.
"""


class ExportTesterMixin:
    """Empty: the torch.export tests are not in the sdist, so none is run."""
''',
    "generation/test_utils.py": '''"""Stand-in for transformers' ``tests/generation/test_utils.py``, absent from the sdist.

``test_modeling_common`` imports ``GenerationTesterMixin`` only to check that a model able to
``generate`` has its tester inherit it. The generate tests themselves live only in that module, which
the sdist does not ship, so they are NOT run here (the test module says so and skips that inheritance
check rather than passing it vacuously with this empty class).
"""


class GenerationTesterMixin:
    """Empty: the generate tests are not in the sdist, so none is run."""
''',
    "utils/test_configuration_utils.py": '''"""Stand-in for transformers' ``tests/utils/test_configuration_utils.py``, absent from the sdist.

``ConfigTester`` reads ``config_common_kwargs`` (every common ``PreTrainedConfig`` argument, set to a
non-default value) in exactly one place, ``check_config_arguments_init``, and that method returns
before reading it for a composite config (one with ``sub_configs``). ``UniteConfig`` is composite (its
``text_config``), so the value is never read for it: an empty dict is honest here, and the test module
asserts that ``UniteConfig.sub_configs`` is non-empty so this stays true. A non-composite config would
need the real dict.
"""

config_common_kwargs = {}
''',
}


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/unite_hf/transformers-tests`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "unite_hf" / "transformers-tests"


def _download_sdist(version: str, dest: Path, timeout: float) -> Path:
    """``pip download`` the transformers ``version`` sdist into ``dest``; its path. Raises RuntimeError."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
               f"transformers=={version}", "-d", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"pip download of the transformers {version} sdist failed: {error}") from error
    archives = sorted(dest.glob("transformers-*.tar.gz"))
    if result.returncode != 0 or not archives:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download of the transformers {version} sdist failed (exit {result.returncode}): {tail[0]}")
    return archives[0]


def _build_package(archive: Path, package: Path) -> None:
    """Unpack the two common test files from ``archive`` into ``package`` and write the stand-ins."""
    package.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix(): m for m in tar.getmembers() if m.isfile()}
        for name in COPIED:
            member = members.get(f"tests/{name}")
            if member is None:
                raise RuntimeError(f"{archive.name} has no tests/{name}")
            (package / name).write_bytes(tar.extractfile(member).read())
    (package / "__init__.py").write_text('"""transformers\' common tests, unpacked from its sdist by unite_hf\'s tests."""\n')
    for relative, source in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(source)


def common_tests_package(timeout: float = 300) -> Path:
    """The cached package of transformers' common tests for the installed version, fetched and built on
    first use, and its parent folder on ``sys.path`` (import it as :data:`PACKAGE`). Raises RuntimeError
    when the sdist cannot be fetched or lacks the files."""
    version = transformers.__version__
    root = cache_root() / version
    package = root / PACKAGE
    if not (package / COPIED[0]).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root.parent))
        try:
            archive = _download_sdist(version, work / "sdist", timeout)
            _build_package(archive, work / "build" / PACKAGE)
            shutil.rmtree(work / "sdist")
            try:
                os.rename(work / "build", root)  # atomic; fails if another run got there first
            except OSError:
                if not (package / COPIED[0]).is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return package
