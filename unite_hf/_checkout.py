"""The developer tools beside the library in a source checkout (``tools/``: the demo, the benchmarks),
which are not installed with the ``unite_hf`` package.

``unite-hf demo`` and ``unite-hf bench`` run them from the checkout this ``unite_hf`` was imported from
(an editable install, ``pip install -e .``); elsewhere they fail with :class:`ToolsNotFoundError`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["ToolsNotFoundError", "checkout_root", "deprecated_alias", "load_tool"]


class ToolsNotFoundError(FileNotFoundError):
    """``tools/`` is not there: this ``unite_hf`` is installed, not run from a source checkout."""


def checkout_root() -> Path | None:
    """The repository root when this ``unite_hf`` package sits in a source checkout (beside
    ``pyproject.toml`` naming ``unite_hf`` and the ``tools/`` package), else ``None``."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not (root / "tools" / "__init__.py").is_file() or not pyproject.is_file():
        return None
    return root if 'name = "unite_hf"' in pyproject.read_text(encoding="utf-8") else None


def load_tool(name: str) -> ModuleType:
    """``tools.<name>`` of this checkout (imported once; the ``tools`` package is found by path, so the
    working directory does not matter and ``sys.path`` is left as it is).

    Raises:
        ToolsNotFoundError: no checkout, or another package called ``tools`` is already imported.
    """
    root = checkout_root()
    if root is None:
        raise ToolsNotFoundError(
            f"tools/{name}.py is not installed with unite_hf: it lives in the repository's tools/ folder. "
            "Run it from a source checkout (git clone the repository, then pip install -e .)")
    package = sys.modules.get("tools")
    if package is None:
        spec = importlib.machinery.PathFinder.find_spec("tools", [str(root)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["tools"] = package
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules["tools"]
            raise
    elif str(root / "tools") not in [str(Path(p).resolve()) for p in getattr(package, "__path__", [])]:
        raise ToolsNotFoundError(f"another package called 'tools' is already imported ({package!r}), "
                                 f"not this checkout's {root / 'tools'}")
    return importlib.import_module(f"tools.{name}")


def deprecated_alias(name: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the old module ``unite_hf.<name>``: every attribute comes from
    ``tools.<name>``; importing the alias warns once (FutureWarning, attributed to the importer)."""
    tool = load_tool(name)
    warnings.warn(f"unite_hf.{name} moved to tools/{name}.py (not installed with the library): import "
                  f"tools.{name} from a source checkout, or run `unite-hf {name}`; the alias unite_hf.{name} "
                  "will be removed", FutureWarning, stacklevel=3)
    return (lambda attribute: getattr(tool, attribute)), (lambda: dir(tool))
