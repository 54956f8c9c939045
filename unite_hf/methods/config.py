"""What every method's configuration shares: a validated dataclass, its recipe form, its CLI options.

This module imports nothing but the standard library (``unite_hf_cli`` loads it, and each method's
``config.py``, without importing torch, so that ``unite-hf extract --help`` is instant and its options
are generated from these dataclasses: a default lives in exactly one place, the dataclass field).

A method's config is a :class:`MethodConfig` subclass with a ``method`` name, in the style of peft's
``LoraConfig``:

- every field carries ``metadata={"help": ...}`` (the CLI's help text; optional ``"cli"``: extra
  argparse keyword arguments, and ``"parse"``: a function turning one command-line string into the value);
- ``__post_init__`` checks each value and the fields against each other, raising ``ValueError`` with
  a message that names the field, before any model is loaded;
- :meth:`MethodConfig.to_dict` / :meth:`MethodConfig.from_dict` give the JSON/YAML recipe that a gene
  stores (``gene_config.json`` ``"recipe"``), and that ``unite-hf extract --config recipe.yaml`` runs;
  keys of another method are refused, not ignored.

Defining a subclass with a ``method`` name registers it in :data:`CONFIG_CLASSES` (the CLI reads
that table); :func:`unite_hf.methods.register_method` links it to the method's gene class and
extract function.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar, TypeVar

ConfigT = TypeVar("ConfigT", bound="MethodConfig")

CONFIG_CLASSES: dict[str, type["MethodConfig"]] = {}
"""method name -> its config class, filled as the classes are defined."""

RECIPE_METHOD_KEY = "method"


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           parse: Callable[[str], Any] | None = None, **cli: Any) -> Any:
    """A config field: ``help`` for ``--help``; ``parse`` for a command-line string; any other keyword
    (``nargs``, ``action``, ``metavar``, ``choices``, ``flag``) goes to argparse as it is."""
    metadata = {"help": help, "cli": cli}
    if parse is not None:
        metadata["parse"] = parse
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_rank(value: str) -> int | tuple[int, ...] | dict[str, int]:
    """``"r"`` -> ``r``; ``"a,b,c"`` -> ``(a, b, c)`` (the command-line form of a Tucker rank);
    ``"hidden=256,neuron=512"`` -> per-axis ranks ``{"hidden": 256, "neuron": 512}``."""
    if "=" in value:
        try:
            return {axis.strip(): int(r) for axis, r in (part.split("=", 1) for part in value.split(","))}
        except ValueError:
            raise ValueError(f"per-axis ranks are hidden=R,neuron=R[,layer=R], got {value!r}") from None
    try:
        parts = tuple(int(p) for p in value.split(","))
    except ValueError:
        raise ValueError(f"rank is an int or r_L,r_out,r_in, got {value!r}") from None
    if len(parts) not in (1, 3):
        raise ValueError(f"rank is an int or r_L,r_out,r_in, got {value!r}")
    return parts[0] if len(parts) == 1 else parts


def check_tucker_rank(config: "MethodConfig", name: str = "rank", per_axis: bool = False) -> None:
    """``None``, a positive int, three positive ints (a list from a recipe becomes a tuple), or per-axis
    ranks ``{"hidden": r_h, "neuron": r_n[, "layer": r_L]}``."""
    rank = getattr(config, name)
    if isinstance(rank, dict) and per_axis:
        unknown = sorted(set(rank) - {"layer", "hidden", "neuron"})
        if unknown or not {"hidden", "neuron"} <= set(rank) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank.values()):
            raise ValueError(f"{config.method} config: per-axis {name} takes positive ints for 'hidden' and "
                             f"'neuron' (and optionally 'layer'), got {rank!r}")
        return
    if isinstance(rank, list):
        rank = tuple(rank)
        setattr(config, name, rank)
    ok = rank is None or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1) or (
        isinstance(rank, tuple) and len(rank) == 3
        and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rank))
    if not ok:
        raise ValueError(f"{config.method} config: {name} must be None, a positive int or three positive ints "
                         f"(r_L, r_out, r_in), got {rank!r}")


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's config: validation helpers, the recipe (dict / YAML) round trip."""

    method: ClassVar[str] = ""
    cli_inputs: ClassVar[dict[str, dict[str, Any]]] = {}
    """Command-line options that are inputs of a run, not settings (not part of the recipe):
    ``dest -> argparse keyword arguments`` (``"flag"`` names the option); the method's extract function
    receives each one given as a keyword argument of that name."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method"):  # subclasses of a method's config inherit its name: not registered again
            CONFIG_CLASSES[cls.method] = cls

    # -- checks for __post_init__ ---------------------------------------------------------------------
    def _check_int(self, name: str, minimum: int | None = 1, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise ValueError(f"{self.method} config: {name} must be an int{bound}{' or None' if optional else ''}, "
                             f"got {value!r}")

    def _check_number(self, name: str, minimum: float = 0.0, strictly: bool = False) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float("inf"), float("-inf")) or value < minimum or (strictly and value == minimum):
            raise ValueError(f"{self.method} config: {name} must be a finite number {'>' if strictly else '>='} "
                             f"{minimum}, got {value!r}")

    def _check_choice(self, name: str, choices: list[str] | tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{self.method} config: {name} must be one of {sorted(choices)}, got {value!r}")

    def _check_bool(self, *names: str) -> None:
        for name in names:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{self.method} config: {name} must be true or false, got {getattr(self, name)!r}")

    def _check_str(self, name: str, optional: bool = False) -> None:
        value = getattr(self, name)
        if not (isinstance(value, str) or (optional and value is None)):
            raise ValueError(f"{self.method} config: {name} must be a string{' or None' if optional else ''}, "
                             f"got {value!r}")

    def warn_unread(self, names: tuple[str, ...], why: str, stacklevel: int = 3) -> None:
        """Warn (``UserWarning``) naming the settings among ``names`` that differ from their defaults,
        when this run does not read them (``why``): which settings count can depend on the inputs of a
        run (a precomputed importance or analysis), and that must not be silent. ``None`` counts as unset."""
        import warnings

        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unread = [name for name in names if getattr(self, name) is not None
                  and (not isinstance(getattr(self, name), (str, int, float, bool, tuple))
                       or getattr(self, name) != defaults[name])]
        if unread:
            warnings.warn(f"{', '.join(unread)} {'has' if len(unread) == 1 else 'have'} no effect: {why}", UserWarning,
                          stacklevel=stacklevel + 1)

    # -- recipe --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., field: value, ...}``, JSON/YAML-ready: tuples become lists, paths strings.
        A value given in-process that no file can hold (a token tensor, a Dataset) is recorded as
        ``None``: the gene's config still describes it, but the recipe cannot re-run it."""
        return {RECIPE_METHOD_KEY: self.method,
                **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """Build (and so validate) a config from a recipe dict; a ``method`` key must name this method,
        and a key this method does not have is an error naming it (another method's option, or a typo)."""
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.method} recipe must be a mapping, got {type(data).__name__}")
        data = dict(data)
        method = data.pop(RECIPE_METHOD_KEY, cls.method)
        if method != cls.method:
            raise ValueError(f"this recipe is for method {method!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not an option of method {cls.method!r} (its options: "
                             f"{', '.join(sorted(known))})")
        return cls(**data)

    def to_yaml(self) -> str:
        """The recipe as YAML (``unite-hf extract --config`` reads it back)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def help(cls) -> dict[str, str]:
        """``field -> help text``."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a config value (None for one only the running process can hold)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return None if any(items[k] is None and value[k] is not None for k in value) else items
    return None


def config_from_recipe(data: dict[str, Any]) -> MethodConfig:
    """The config a recipe dict describes, by its ``method`` key (default ``unite``)."""
    method = data.get(RECIPE_METHOD_KEY, "unite") if isinstance(data, dict) else None
    if method not in CONFIG_CLASSES:
        raise ValueError(f"unknown method {method!r} in the recipe; known: {sorted(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[method].from_dict(data)


MAX_NESTING = 100
"""How deep the documents unite_hf reads (gene configs, checksum records, recipes) may nest: far beyond
any it writes, far below what would exhaust Python's recursion (a parser's, or a later deep copy's)."""


def check_nesting(data: Any, what: str, limit: int = MAX_NESTING) -> None:
    """Raise ``ValueError`` when the lists and mappings of ``data`` nest deeper than ``limit`` (walked
    without recursion), or when one of them is reached twice: a YAML alias (``*a``) repeats a list without
    copying it, so a small file can stand for an exponentially large recipe, or a list that holds itself."""
    stack, seen = [(data, 1)], set()
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)) and value:
            if id(value) in seen:
                raise ValueError(f"{what} repeats a list or mapping (a YAML alias, or one that holds itself); "
                                 "write the values out")
            seen.add(id(value))
            if depth > limit:
                raise ValueError(f"{what} nests lists or mappings more than {limit} levels deep; refusing it")
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` for documents from files: one ``ValueError`` line for invalid JSON and for nesting
    deeper than :data:`MAX_NESTING` (which ``json`` reports with a ``RecursionError`` past ~1000 levels)."""
    import json

    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} nests lists or mappings too deeply to read; refusing it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None
    check_nesting(data, what)
    return data


def corpus_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a calibration corpus as a recipe holds one (None when it can, or when it is
    an object only Python can pass, a tensor or a Dataset, which the loader checks): a corpus is a name, a
    path or a Hub id (a string), or a list of text documents (strings)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return None
    if isinstance(value, (list, tuple)):
        bad = next((item for item in value if item is not None and not isinstance(item, str)), None)
        return None if bad is None else f"is a list holding a {type(bad).__name__} ({bad!r:.40}); a list holds text documents (strings)"
    if isinstance(value, (bool, int, float, dict)):
        return f"is a {type(value).__name__} ({value!r:.40})"
    return None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file (YAML, or JSON, which YAML reads too) as a dict; ``{}`` for an empty file. A recipe
    nested deeper than :data:`MAX_NESTING` is refused with ``ValueError`` (YAML's parser recurses)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} nests lists or mappings too deeply to read; refusing it") from None
    check_nesting(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of options, got {type(data).__name__}")
    return data
