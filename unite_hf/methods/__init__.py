"""Extraction methods as plugins: one folder per method, each registering itself with one call.

A method's folder ``unite_hf/methods/<name>/`` holds

- ``config.py``: its :class:`~unite_hf.methods.config.MethodConfig` subclass (torch-free; the CLI
  generates ``unite-hf extract`` options from it and a gene stores it as its recipe);
- its gene class (a :class:`~unite_hf.gene.Gene` subclass registered with ``register_gene``);
- its extract function, and in ``__init__.py`` one :func:`register_method` call.

:func:`load_methods` imports every method folder (so a fourth method is one new folder, nothing edited
elsewhere); :func:`get_method` returns a method's :class:`MethodSpec`. ``CONTRIBUTING.md`` ("Adding a
method") walks through it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from . import config  # noqa: F401  (bound here also when unite_hf_cli loaded it first, by path)
from .config import CONFIG_CLASSES, MethodConfig

__all__ = ["CONFIG_CLASSES", "METHODS", "MethodConfig", "MethodSpec", "get_method", "load_methods", "register_method",
           "unregister_method"]


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of a method.

    ``extract(config, model, tokenizer=None, *, source_id=None, source_revision=None, show_progress=True,
    **inputs) -> Gene`` runs the method from its config; ``cli_inputs`` are the command-line options that
    are inputs of a run rather than settings (``--importance GENE``, ``--analysis DIR``): ``dest -> argparse
    keyword arguments`` (with ``"flag"``), declared on the config class as ``cli_inputs``. ``run_cli``
    (optional) replaces the default CLI run (load the source with transformers, then ``extract``)."""

    name: str
    config_class: type[MethodConfig]
    gene_class: type
    extract: Callable[..., Any]
    run_cli: Callable[..., Any] | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(config_class: type[MethodConfig], gene_class: type, extract: Callable[..., Any], *,
                    run_cli: Callable[..., Any] | None = None) -> MethodSpec:
    """Register a method under ``config_class.method``: its config, gene class and extract function."""
    name = config_class.method
    if not name:
        raise ValueError(f"{config_class.__name__} needs a class attribute `method` naming the method")
    if getattr(gene_class, "method", name) != name:
        raise ValueError(f"{gene_class.__name__} is registered for method {gene_class.method!r}, not {name!r}")
    CONFIG_CLASSES[name] = config_class
    spec = METHODS[name] = MethodSpec(name, config_class, gene_class, extract, run_cli)
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (and its gene class) from the registries; for tests that register a toy method."""
    from ..gene import GENE_TYPES

    METHODS.pop(name, None)
    CONFIG_CLASSES.pop(name, None)
    GENE_TYPES.pop(name, None)


def load_methods() -> dict[str, MethodSpec]:
    """Import every method folder of this package (each registers itself), then return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return METHODS


def get_method(name: str) -> MethodSpec:
    """The registered method ``name`` (method folders are imported on first use)."""
    if name not in METHODS:
        load_methods()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]
