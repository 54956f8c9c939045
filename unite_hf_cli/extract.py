"""``unite-hf extract``'s options, generated from the methods' config dataclasses (torch-free).

Every setting of a method is a field of its :class:`~unite_hf.methods.config.MethodConfig` subclass
(``unite_hf/methods/<name>/config.py``): its name gives the option, its ``help`` metadata the help text,
its default the default, so a default lives in exactly one place. An option shared by several
methods appears once and takes each method's own default; an option given for a method that does
not have it is an error. ``--config recipe.yaml`` (a gene's ``recipe``, or one written by hand) gives
the settings; options on the command line override it.

The config modules are loaded without importing ``unite_hf`` (whose ``import`` loads torch): each is
executed from its file under its own dotted name, so the classes are the very ones ``unite_hf`` uses
once it is imported (:func:`method_configs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

DEFAULT_METHOD = "unite"


def _load_by_path(name: str, path: Path):
    """Execute ``path`` as module ``name`` without importing its parent packages."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: dataclasses and relative imports look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def method_configs() -> dict[str, type]:
    """``method -> config class`` for every method folder of ``unite_hf/methods/`` (each folder with a
    ``config.py``), plus any config class defined in this process (a method registered from Python)."""
    if "unite_hf" in sys.modules:  # the library is loaded already: import the config modules normally
        base = importlib.import_module("unite_hf.methods.config")
        import unite_hf.methods

        unite_hf.methods.load_methods()
        return dict(sorted(base.CONFIG_CLASSES.items()))
    spec = importlib.util.find_spec("unite_hf")  # finds the package without running its __init__
    methods_dir = Path(next(iter(spec.submodule_search_locations))) / "methods"
    base = _load_by_path("unite_hf.methods.config", methods_dir / "config.py")
    for config_file in sorted(methods_dir.glob("*/config.py")):
        if not config_file.parent.name.startswith("_"):
            _load_by_path(f"unite_hf.methods.{config_file.parent.name}.config", config_file)
    return dict(sorted(base.CONFIG_CLASSES.items()))


def _value_type(field: dataclasses.Field) -> Any:
    """The argparse ``type`` of a field: its annotation's scalar type; a field with a ``parse`` function
    stays a string here and is parsed by the chosen method's own field (:func:`config_from_args`), as
    methods may read one option differently (``--rank 8,8,8``: Tucker ranks, but not a MASA rank)."""
    if field.metadata.get("parse") is not None:
        return str
    annotation = str(field.type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def _parse_given(field: dataclasses.Field, value: Any) -> Any:
    parse = field.metadata.get("parse")
    if parse is None or value is None:
        return value
    return [parse(v) for v in value] if isinstance(value, list) else parse(value)


def _flag(name: str, metadata: dict[str, Any]) -> str:
    return metadata.get("flag") or "--" + name.replace("_", "-")


def _default_text(owners: dict[str, dataclasses.Field]) -> str:
    """``default: X``, or each method's default where they differ; empty where every default is unset."""
    defaults = {method: _shown(field) for method, field in owners.items()}
    if set(defaults.values()) == {"None"}:
        return ""
    if len(set(defaults.values())) == 1:
        return f"default: {next(iter(defaults.values()))}"
    return "default: " + ", ".join(f"{method} {value}" for method, value in defaults.items())


def _shown(field: dataclasses.Field) -> str:
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if isinstance(default, (tuple, list)):
        return " ".join(map(str, default))
    return str(default)


def _options(configs: dict[str, type]) -> dict[str, dict[str, dataclasses.Field]]:
    """``field name -> {method: field}`` over every method's config, in declaration order (the default
    method's first)."""
    options: dict[str, dict[str, dataclasses.Field]] = {}
    for method, config_class in sorted(configs.items(), key=lambda item: item[0] != DEFAULT_METHOD):
        for field in dataclasses.fields(config_class):
            options.setdefault(field.name, {})[method] = field
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every method's settings (from the config classes) and run inputs, grouped by the methods they apply to."""
    configs = method_configs()
    parser.add_argument("--method", choices=list(configs), default=None,
                        help=f"the extraction method, one of unite_hf/methods/ (default: the recipe's, else "
                             f"{DEFAULT_METHOD})")
    parser.add_argument("--config", default=None, metavar="RECIPE",
                        help="a recipe (YAML or JSON: method and settings, e.g. a gene's gene_config.json 'recipe' "
                             "written out, or gene.recipe.to_yaml()); options given here override it")
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}

    def group_for(methods: tuple[str, ...]) -> argparse._ArgumentGroup:
        if methods not in groups:
            title = "settings of every method" if len(methods) == len(configs) else \
                "settings of " + ", ".join(f"--method {m}" for m in methods)
            groups[methods] = parser.add_argument_group(title)
        return groups[methods]

    for name, owners in _options(configs).items():
        first = next(iter(owners.values()))
        cli = dict(first.metadata.get("cli", {}))
        flag = _flag(name, cli)
        cli.pop("flag", None)
        helps = {method: field.metadata["help"] for method, field in owners.items()}
        if len(set(helps.values())) == 1:
            help_text = next(iter(helps.values()))
        else:  # one option, read differently by each method: say how
            help_text = "; ".join(f"{method}: {text}" for method, text in helps.items())
        defaults = _default_text(owners)
        help_text += f" ({defaults})" if defaults else ""
        if str(first.type) == "bool":
            cli.setdefault("action", argparse.BooleanOptionalAction)
        else:
            cli.setdefault("type", _value_type(first))
        group_for(tuple(owners)).add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, **cli)
    for method, config_class in sorted(configs.items(), key=lambda item: item[0] != DEFAULT_METHOD):
        for dest, spec in config_class.cli_inputs.items():
            spec = dict(spec)
            group_for((method,)).add_argument(spec.pop("flag"), dest=dest, default=argparse.SUPPRESS, **spec)


def _setting_flags(configs: dict[str, type]) -> dict[str, str]:
    """``dest -> --flag`` of every generated option (settings and run inputs)."""
    flags = {name: _flag(name, next(iter(owners.values())).metadata.get("cli", {}))
             for name, owners in _options(configs).items()}
    for config_class in configs.values():
        flags.update({dest: spec["flag"] for dest, spec in config_class.cli_inputs.items()})
    return flags


def config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The method config that ``--config`` and the options give, and the run inputs given.

    Raises ``ValueError`` for an option of another method, a recipe of another method than
    ``--method``, a setting out of range, or a recipe setting that was given in Python and not recorded."""
    configs = method_configs()
    from unite_hf.methods.config import load_recipe  # torch-free, loaded by method_configs

    recipe = load_recipe(args.config) if getattr(args, "config", None) else {}
    if "format_version" in recipe:  # a gene's gene_config.json: run the recipe it keeps
        if not recipe.get("recipe"):
            raise ValueError(f"{args.config} is the config of a gene saved before genes kept their recipe; give the "
                             "settings as options (its calibration, fusion, ranks... are in that file)")
        recipe = dict(recipe["recipe"])
    method = getattr(args, "method", None) or recipe.get("method") or DEFAULT_METHOD
    if recipe.get("method") not in (None, method):
        raise ValueError(f"--config {args.config} is a {recipe['method']!r} recipe; it does not run with --method {method}")
    if method not in configs:
        raise ValueError(f"unknown method {method!r}; known: {sorted(configs)}")
    config_class = configs[method]
    own = {f.name for f in dataclasses.fields(config_class)}
    flags = _setting_flags(configs)
    given = {dest: value for dest, value in vars(args).items() if dest in flags}
    foreign = sorted(flags[dest] for dest in given if dest not in own and dest not in config_class.cli_inputs)
    if foreign:
        raise ValueError(f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to --method {method}")
    settings = {dest: _parse_given(_field(config_class, dest), value) for dest, value in given.items() if dest in own}
    data = {**recipe, **settings, "method": method}
    unrecorded = sorted(name for name, value in data.items() if value is None and name in own
                        and _field(config_class, name).default is not None)
    if unrecorded:
        raise ValueError(f"the recipe's {', '.join(unrecorded)} was given in Python and not recorded; pass "
                         f"{', '.join(flags[name] for name in unrecorded)}")
    inputs = {dest: value for dest, value in given.items() if dest in config_class.cli_inputs}
    return config_class.from_dict(data), inputs


def _field(config_class: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(config_class) if f.name == name)
