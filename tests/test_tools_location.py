"""The demo and the benchmarks live in tools/ (not installed): the CLI finds them in a source checkout,
the old import paths forward to them with a FutureWarning, and elsewhere the error says what to do."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
from setuptools import find_packages

import unite_hf
from unite_hf import _checkout
from unite_hf._checkout import ToolsNotFoundError, checkout_root, load_tool

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_tools_come_from_this_checkout_and_are_not_installed():
    assert checkout_root() == REPO_ROOT
    for name in ("bench", "demo", "moefy"):
        tool = load_tool(name)
        assert Path(tool.__file__).resolve() == REPO_ROOT / "tools" / f"{name}.py"
    # the installed packages (pyproject: include = ["unite_hf*"]) hold no tools
    assert not any(p == "tools" or p.startswith("tools.") for p in find_packages(str(REPO_ROOT), include=["unite_hf*"]))
    assert "def run_demo" not in (Path(unite_hf.__file__).parent / "demo.py").read_text()


@pytest.mark.parametrize(("name", "attribute"), [("demo", "run_demo"), ("bench", "run_bench"), ("moefy", "moefy")])
def test_old_import_paths_forward_with_a_future_warning(monkeypatch, name, attribute):
    monkeypatch.delitem(sys.modules, f"unite_hf.{name}", raising=False)
    with pytest.warns(FutureWarning, match=f"unite_hf.{name} moved to tools/{name}.py"):
        alias = importlib.import_module(f"unite_hf.{name}")
    assert getattr(alias, attribute) is getattr(load_tool(name), attribute)


def test_from_unite_hf_import_moefy_still_works(monkeypatch):
    """moefy was public API of the package (``from unite_hf import moefy, MoefyError``): from a checkout it
    still answers, with a FutureWarning, whether or not the old module path was imported first."""
    tool = load_tool("moefy")
    for name in ("moefy", "MoefyError"):
        monkeypatch.delitem(unite_hf.__dict__, name, raising=False)
    monkeypatch.delitem(sys.modules, "unite_hf.moefy", raising=False)
    with pytest.warns(FutureWarning, match="unite_hf.moefy moved to tools/moefy.py"):
        from unite_hf import moefy
    assert moefy is tool.moefy
    with pytest.warns(FutureWarning, match="unite_hf.MoefyError moved"):
        from unite_hf import MoefyError
    assert MoefyError is tool.MoefyError
    with pytest.warns(FutureWarning, match="unite_hf.moefy moved"):
        alias = importlib.import_module("unite_hf.moefy")  # binds unite_hf.moefy to the alias module
    with pytest.raises(tool.MoefyError):  # the alias module calls moefy itself
        alias(object(), num_experts=2)


def test_outside_a_checkout_the_error_says_where_the_tools_are(monkeypatch):
    monkeypatch.setattr(_checkout, "checkout_root", lambda: None)
    with pytest.raises(ToolsNotFoundError, match=r"tools/demo.py is not installed.*source checkout"):
        load_tool("demo")
    assert issubclass(ToolsNotFoundError, OSError)  # the CLI reports OSErrors in one line, exit 2
    other = types.ModuleType("tools")
    other.__path__ = ["/somewhere/else/tools"]
    monkeypatch.setattr(_checkout, "checkout_root", lambda: REPO_ROOT)
    monkeypatch.setitem(sys.modules, "tools", other)
    with pytest.raises(ToolsNotFoundError, match="another package called 'tools'"):
        load_tool("demo")
