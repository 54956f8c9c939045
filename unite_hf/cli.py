"""The ``unite-hf`` command line: what each sub-command runs, registered in :data:`RUNNERS`.

The parser lives in the torch-free :mod:`unite_hf_cli` (the console script's entry point), so that
``--help`` is instant; :func:`main` parses again there and runs the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable

from unite_hf_cli import COMMANDS, build_parser, progress_enabled  # noqa: F401 - re-exported

RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register what sub-command ``name`` (declared in :data:`unite_hf_cli.COMMANDS`) runs."""
    def decorator(run: Callable[[argparse.Namespace], int]):
        if name not in COMMANDS:
            raise KeyError(f"sub-command {name!r} has no arguments in unite_hf_cli.COMMANDS")
        RUNNERS[name] = run
        return run

    return decorator


def _load_source(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_pretrained(args.source, revision=args.revision, dtype=dtype,
                                                device_map=args.device_map, trust_remote_code=args.trust_remote_code)


def _run_method(spec, config, args: argparse.Namespace, tokenizer, inputs: dict):
    """Run a registered method from the command line: its own ``run_cli`` when it has one, else load
    the source with transformers and call its ``extract``."""
    context = dict(source_id=args.source, source_revision=args.revision, show_progress=progress_enabled(args), **inputs)
    if spec.run_cli is not None:
        return spec.run_cli(config, args, tokenizer, lambda: _load_source(args), **context)
    return spec.extract(config, _load_source(args), tokenizer, **context)


def __getattr__(name: str):
    if name == "EXTRACTORS":  # the hard-coded --method table that the method registry replaced
        import warnings

        from .methods import load_methods

        warnings.warn("unite_hf.cli.EXTRACTORS is deprecated: use unite_hf.methods.get_method(name)", FutureWarning,
                      stacklevel=2)
        return {name: spec.extract for name, spec in load_methods().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@command("extract")
def _run_extract(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer
    from unite_hf_cli.extract import config_from_args

    from .gene import check_gene_destination
    from .methods import get_method

    config, inputs = config_from_args(args)  # every setting checked before anything is loaded
    spec = get_method(config.method)
    check_gene_destination(args.out)  # an unwritable --out fails now, not after the calibration pass
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.source, revision=None if args.tokenizer else args.revision,
                                              trust_remote_code=args.trust_remote_code)
    gene = _run_method(spec, config, args, tokenizer, inputs)
    gene.tokenizer = tokenizer
    gene.save_pretrained(args.out)
    if args.push_to_hub:
        gene.push_to_hub(args.push_to_hub)
    print(json.dumps({"gene": str(args.out), "method": gene.method, "layers": gene.config.moe_layers,
                      "ranks": gene.config.ranks, "relative_error": gene.config.relative_error}))
    return 0


@command("finetune")
def _run_finetune(args: argparse.Namespace) -> int:
    from .training.finetune import finetune

    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its logs; stdout carries only the JSON line
        summary = finetune(
            args.model, args.task, tokenizer=args.tokenizer, data_dir=args.data_dir, output_dir=args.output,
            fmt=args.format, init=args.init, layers=args.layers, rank=args.rank, epochs=args.epochs,
            train_fraction=args.train_fraction, seed=args.seed, learning_rate=args.learning_rate,
            batch_size=args.batch_size, max_length=args.max_length, max_train_examples=args.max_train_examples,
            max_eval_examples=args.max_eval_examples, core_init=args.core_init, width=args.width,
            intermediate_size=args.intermediate_size, scaling=args.scaling, pretrain_tokens=args.pretrain_tokens,
            show_progress=progress_enabled(args), push_to_hub=args.push_to_hub,
        )
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)  # stdout carries only the JSON line
    print(json.dumps(summary))
    return 0


@command("bench")
def _run_bench(args: argparse.Namespace) -> int:
    from ._checkout import load_tool

    run_bench = load_tool("bench").run_bench  # tools/bench.py: in a source checkout, not installed
    command_line = "unite-hf bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "unite-hf bench"
    report = run_bench(args.out, args.profile, work_dir=args.work_dir, experiments=tuple(args.experiments),
                       tiny=args.tiny, command=command_line, report_only=args.report_only)
    print(json.dumps({"report": str(report)}))
    return 0


@command("demo")
def _run_demo(args: argparse.Namespace) -> int:
    from ._checkout import load_tool

    run_demo = load_tool("demo").run_demo  # tools/demo.py: in a source checkout, not installed
    run_demo(args.out, data_dir=args.data_dir, tiny=args.tiny)
    return 0


@command("moefy")
def _run_moefy(args: argparse.Namespace) -> int:
    from ._checkout import load_tool

    return load_tool("moefy").run(args)  # tools/moefy.py: in a source checkout, not installed


@command("analyze-experts")
def _run_analyze(args: argparse.Namespace) -> int:
    from .methods.xpert.analysis import run

    return run(args)


@command("retention")
def _run_retention(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import measure_retention
    from .gene import UniteGene

    gene = UniteGene.from_pretrained(args.gene)
    tokenizer = gene.tokenizer or AutoTokenizer.from_pretrained(args.source, trust_remote_code=args.trust_remote_code)
    source = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32,
                                                  trust_remote_code=args.trust_remote_code)
    report = measure_retention(gene, source, tokenizer=tokenizer, text=args.text, num_windows=args.num_windows,
                               seq_len=args.seq_len, rank=args.rank, layers=args.layers, batch_size=args.batch_size,
                               data_dir=args.data_dir, show_progress=progress_enabled(args))
    report.gene, report.source = args.gene, args.source
    print(report.to_json())
    return 0


@command("info")
def _run_info(args: argparse.Namespace) -> int:
    from .info import describe

    print(json.dumps(describe(args.path, revision=args.revision), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    from safetensors import SafetensorError

    from .calibration import CalibrationLoadError
    from .training.tasks import TaskLoadError

    try:
        return RUNNERS[args.command](args)
    except (ValueError, OSError, SafetensorError, CalibrationLoadError, TaskLoadError) as err:
        # user errors and write failures (disk full: the old gene stays) get one clear line, not a traceback
        print(f"unite-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
