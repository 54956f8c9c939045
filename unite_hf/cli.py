"""The ``unite-hf`` command line: one sub-command per job, registered in :data:`COMMANDS`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Callable

from .calibration import DEFAULT_CALIBRATION
from .decomposition import DECOMPOSITIONS
from .fusion import FUSIONS
from .importance import LABEL_MODES

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where the default is ``None`` or ``False``
    (an unset option or a flag) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--quiet``, ``HF_HUB_DISABLE_PROGRESS_BARS`` or ``TQDM_DISABLE`` say no."""
    import os

    off = {"1", "true", "yes", "on"}
    env = any(os.environ.get(name, "").strip().lower() in off for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"))
    return not getattr(args, "quiet", False) and not env


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (also off with HF_HUB_DISABLE_PROGRESS_BARS=1 or TQDM_DISABLE=1)")


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def decorator(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help_text, add_arguments, run)
        return run

    return decorator


def _rank(value: str) -> int | tuple[int, int, int]:
    parts = [int(p) for p in value.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return tuple(parts)  # type: ignore[return-value]
    raise argparse.ArgumentTypeError("rank is an int or r_L,r_out,r_in")


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that extracts a gene."""
    parser.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                        help="'wikitext2', a local text file, or a Hub dataset id (default: %(default)s)")
    parser.add_argument("--num-sequences", type=int, default=128, help="calibration sequences N (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence T (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per Fisher pass (default: %(default)s)")
    parser.add_argument("--rank", type=_rank, default=None,
                        help="Tucker rank: r, or r_L,r_out,r_in (default: 512, clipped to the dimensions)")
    parser.add_argument("--fusion", choices=sorted(FUSIONS), default="fisher",
                        help="how each layer's experts become one FFN (fisher: the paper's Eq. 3)")
    parser.add_argument("--decomposition", choices=sorted(DECOMPOSITIONS), default="tucker",
                        help="how the fused FFNs of all layers are factorized")
    parser.add_argument("--fisher-labels", choices=LABEL_MODES, default="empirical",
                        help="observed next tokens, or labels sampled from the model (true Fisher)")
    parser.add_argument("--n-iter-max", type=int, default=25, help="HOOI/ALS iterations (default: %(default)s)")
    parser.add_argument("--dataset-config", default=None, help="config name of a Hub calibration dataset")
    parser.add_argument("--text-column", default=None, help="text column of a calibration dataset (default: auto)")
    parser.add_argument("--split", default="train", help="split of a Hub calibration dataset (default: %(default)s)")
    parser.add_argument("--train-mode", action="store_true",
                        help="calibrate in train mode (dropout off), for remote-code MoEs whose eval path disables autograd")


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="Hub id or local path of a MoE causal LM")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub source (default: main)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or path (default: the source's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="load dtype (default: the checkpoint's own)")
    parser.add_argument("--device-map", default=None, help='e.g. "auto" to spread a large source over GPUs and CPU')
    parser.add_argument("--trust-remote-code", action="store_true", help="for remote-code MoEs (e.g. DeepSeek-MoE-16B)")
    parser.add_argument("--out", required=True, help="folder to write the gene to")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also push the gene to this Hub repo")
    parser.add_argument("--importance", default=None, metavar="GENE",
                        help="reuse the Fisher and routing frequency of this gene (no calibration pass); with a local "
                             "--source folder the experts are then streamed from its safetensors shards")
    parser.add_argument("--spill-dir", default=None, help="scratch folder for streamed per-layer fused experts")
    parser.add_argument("--fused-width", type=int, default=None,
                        help="--fusion concat: neurons kept (1..E*I, default E*I); other fusions keep the expert width")
    parser.add_argument("--activation-aware", action="store_true",
                        help="weight each projection by its calibration inputs' second moment before decomposing")
    parser.add_argument("--method", choices=sorted(EXTRACTORS), default="unite",
                        help="unite (Fisher fusion + Tucker), masa (gene matrices) or xpert (common experts + Tucker)")
    add_extraction_arguments(parser)
    masa = parser.add_argument_group("MASA (--method masa)")
    masa.add_argument("--corpora", nargs="+", default=None,
                      help="alignment corpora, mixed in equal shares (default: wikitext2 simplebooks)")
    masa.add_argument("--tokens", type=int, default=262_144, help="alignment budget in tokens (default: %(default)s)")
    masa.add_argument("--spectral-weight", type=float, default=0.1, help="λ of the log-spectral term; 0 turns it off")
    masa.add_argument("--selection", default="auto", choices=["auto", "dense", "frequent", "shared"],
                      help="which FFN weights get gene matrices (default: dense FFNs, else shared, else most routed experts)")
    masa.add_argument("--num-experts", type=int, default=1, help="experts per layer for --selection frequent")
    masa.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate of the alignment")
    from .analysis import COMMONALITY_SCORES, SELECTION_STRATEGIES, domain_argument

    xpert = parser.add_argument_group("XPERT (--method xpert)")
    xpert.add_argument("--domain", dest="domains", action="append", type=domain_argument, metavar="NAME=CORPUS",
                       help="a domain for the routing analysis (repeat; default: the built-in five, see analyze-experts)")
    xpert.add_argument("--k-common", type=int, default=None, help="experts per layer to consolidate (default: top-k)")
    xpert.add_argument("--strategy", choices=sorted(SELECTION_STRATEGIES), default="common",
                       help="common (XPERT) or the controls random / least")
    xpert.add_argument("--score", choices=sorted(COMMONALITY_SCORES), default="min_frequency",
                       help="commonality score that ranks experts across domains")
    xpert.add_argument("--analysis", default=None, metavar="DIR", help="reuse a saved analyze-experts folder")
    add_quiet_argument(parser)


def extraction_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        calibration=args.calibration, num_sequences=args.num_sequences, seq_len=args.seq_len, seed=args.seed,
        batch_size=args.batch_size, rank=args.rank, fusion=args.fusion, decomposition=args.decomposition,
        fisher_labels=args.fisher_labels, n_iter_max=args.n_iter_max, dataset_config=args.dataset_config,
        text_column=args.text_column, split=args.split, train_mode=args.train_mode,
    )


def _load_source(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    return AutoModelForCausalLM.from_pretrained(args.source, revision=args.revision, dtype=dtype,
                                                device_map=args.device_map, trust_remote_code=args.trust_remote_code)


def _extract_unite(args: argparse.Namespace, tokenizer):
    from pathlib import Path

    from .gene import UniteGene
    from .methods.unite import extract_universal_knowledge

    importance = None
    if args.importance:
        donor = UniteGene.from_pretrained(args.importance)
        if donor.method != "unite":  # an XPERT gene's "importance" is a commonality score, not a Fisher
            raise ValueError(f"--importance needs a UNITE gene (it reuses the Fisher); {args.importance} is {donor.method}")
        importance = donor.expert_importance()
    streamable = args.fused_width is None and not args.activation_aware
    if streamable and Path(args.source).is_dir() and (importance is not None or args.fusion == "uniform"):
        # nothing to calibrate: stream the experts from the checkpoint's shards, one layer at a time
        return extract_universal_knowledge(args.source, importance=importance, spill_dir=args.spill_dir,
                                           trust_remote_code=args.trust_remote_code, source_id=args.source,
                                           source_revision=args.revision, show_progress=progress_enabled(args),
                                           **extraction_kwargs(args))
    return extract_universal_knowledge(_load_source(args), tokenizer, importance=importance, source_id=args.source,
                                       source_revision=args.revision, fused_width=args.fused_width,
                                       activation_aware=args.activation_aware, show_progress=progress_enabled(args),
                                       **extraction_kwargs(args))


def _extract_masa(args: argparse.Namespace, tokenizer):
    from .methods.masa import DEFAULT_CORPORA, extract_masa_gene

    if isinstance(args.rank, tuple):
        raise ValueError("--rank for MASA is one int r (the gene matrices are r x r)")
    return extract_masa_gene(
        _load_source(args), tokenizer, args.corpora or DEFAULT_CORPORA, rank=64 if args.rank is None else args.rank,
        selection=args.selection,
        num_experts=args.num_experts, spectral_weight=args.spectral_weight, tokens=args.tokens, seq_len=args.seq_len,
        batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed, source_id=args.source,
        source_revision=args.revision, show_progress=progress_enabled(args))


def _extract_xpert(args: argparse.Namespace, tokenizer):
    from .analysis import DEFAULT_DOMAINS, ExpertAnalysis
    from .methods.xpert import extract_xpert_gene

    analysis = ExpertAnalysis.load(args.analysis) if args.analysis else None
    return extract_xpert_gene(
        _load_source(args), tokenizer, dict(args.domains) if args.domains else DEFAULT_DOMAINS, analysis=analysis,
        k=args.k_common, strategy=args.strategy, rank=args.rank, n_iter_max=args.n_iter_max, num_sequences=args.num_sequences,
        seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size, score=args.score, source_id=args.source,
        source_revision=args.revision, show_progress=progress_enabled(args))


# --method -> extractor(args, tokenizer) -> gene
EXTRACTORS: dict[str, Callable] = {"unite": _extract_unite, "masa": _extract_masa, "xpert": _extract_xpert}


@command("extract", "extract a gene (UNITE, MASA or XPERT) from a source causal LM", _extract_arguments)
def _run_extract(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.source, revision=None if args.tokenizer else args.revision,
                                              trust_remote_code=args.trust_remote_code)
    gene = EXTRACTORS[args.method](args, tokenizer)
    gene.tokenizer = tokenizer
    gene.save_pretrained(args.out)
    if args.push_to_hub:
        gene.push_to_hub(args.push_to_hub)
    print(json.dumps({"gene": str(args.out), "method": gene.method, "layers": gene.config.moe_layers,
                      "ranks": gene.config.ranks, "relative_error": gene.config.relative_error}))
    return 0


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from .training.finetune import FORMATS, INITS
    from .training.tasks import TASKS

    parser.add_argument("--model", required=True, help="a gene (folder or Hub id) or a saved UNITE target")
    parser.add_argument("--task", required=True, choices=sorted(TASKS), help="the task to fine-tune on")
    parser.add_argument("--data-dir", default=None, help="local task files (default: $UNITE_HF_DATA_DIR)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or path (default: the one saved with the model)")
    parser.add_argument("--format", choices=FORMATS, default="classification",
                        help="k-way sequence classification (the paper, default) or multiple choice")
    parser.add_argument("--init", choices=INITS, default="unite",
                        help="unite (the gene), random, copy-only, or masa (gene matrices into a Llama target)")
    parser.add_argument("--width", type=int, default=None,
                        help="hidden size of a plain Llama target grown from gene matrices (MASA or XPERT genes)")
    parser.add_argument("--intermediate-size", type=int, default=None, help="FFN width of a Llama target")
    parser.add_argument("--scaling", choices=["adaptive", "coupled", "truncate"], default=None,
                        help="how gene matrices reach the Llama target's shapes (default: the gene's; MASA adaptive, "
                             "XPERT coupled)")
    parser.add_argument("--pretrain-tokens", type=int, default=0,
                        help="continued pretraining of a Llama target on local text before the task (default: none)")
    parser.add_argument("--layers", type=int, default=None, help="target depth (default: the source's)")
    parser.add_argument("--rank", type=int, default=None, help="target rank (default: the gene's)")
    parser.add_argument("--core-init", choices=["random", "tucker"], default="random",
                        help="random cores (the paper) or each source layer's Tucker core")
    parser.add_argument("--epochs", type=float, default=3, help="training epochs")
    parser.add_argument("--train-fraction", type=float, default=1.0, help="share of the train split used")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and split")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (linear decay)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (truncated)")
    parser.add_argument("--max-train-examples", type=int, default=None, help="cap on training examples")
    parser.add_argument("--max-eval-examples", type=int, default=None, help="cap on evaluation examples")
    parser.add_argument("--output", required=True, help="folder for the fine-tuned model and result.json")


@command("finetune", "fine-tune a target grown from a gene on a task; prints the eval accuracy as one JSON line",
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also push the fine-tuned model (with its model card) and tokenizer to this Hub repo")
    add_quiet_argument(parser)
         _finetune_arguments)
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
        )
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)  # stdout carries only the JSON line
            show_progress=progress_enabled(args), push_to_hub=args.push_to_hub,
    print(json.dumps(summary))
    return 0


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from .bench import EXPERIMENTS, PROFILES

    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="full: ~2 hours on 2 CPU cores; quick: minutes; smoke: seconds (default: %(default)s)")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                        help="which experiments to run (default: all)")
    parser.add_argument("--out", default="benchmarks", help="where RESULTS.md, results.json and plots go")
    parser.add_argument("--work-dir", default="runs/bench", help="genes and fine-tuned models (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random source instead of SmolLM2 (plumbing only)")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render RESULTS.md and the plots from the stored results.json; runs nothing")


@command("bench", "reproduce the paper's experiments at our scale; writes benchmarks/RESULTS.md", _bench_arguments)
def _run_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    command_line = "unite-hf bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "unite-hf bench"
    report = run_bench(args.out, args.profile, work_dir=args.work_dir, experiments=tuple(args.experiments),
                       tiny=args.tiny, command=command_line, report_only=args.report_only)
    print(json.dumps({"report": str(report)}))
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="working folder (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="local data folder (default: $UNITE_HF_DATA_DIR)")
    parser.add_argument("--tiny", action="store_true", help="skip the real model: a tiny random MoE (plumbing only)")


@command("demo", "the main job: SmolLM2 -> moefy -> gene -> 4-layer targets fine-tuned on SST-2, UNITE vs random",
         _demo_arguments)
def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, data_dir=args.data_dir, tiny=args.tiny)
    return 0


def _moefy_arguments(parser: argparse.ArgumentParser) -> None:
    from .moefy import add_arguments

    add_arguments(parser)


@command("moefy", "convert a dense Llama-family model into a Mixtral MoE (neurons split into experts, fitted router)",
         _moefy_arguments)
def _run_moefy(args: argparse.Namespace) -> int:
    from .moefy import run

    return run(args)


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    from .analysis import add_arguments

    add_arguments(parser)


@command("analyze-experts", "XPERT's cross-domain routing analysis of a MoE: JSON report and heat map (inference only)",
         _analyze_arguments)
def _run_analyze(args: argparse.Namespace) -> int:
    from .analysis import run

    return run(args)


def _retention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gene", required=True, help="a UNITE or XPERT gene (folder or Hub id)")
    parser.add_argument("--source", required=True, help="the MoE the gene was extracted from (folder or Hub id)")
    parser.add_argument("--rank", type=_target_rank, default=None,
                        help="target ranks: r or r_out,r_in, at most the gene's (default: the gene's)")
    parser.add_argument("--text", default=None,
                        help="held-out text file (default: the last 20%% of SimpleBooks-92 valid in the data dir)")
    parser.add_argument("--num-windows", type=int, default=8, help="held-out windows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: %(default)s)")
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="MoE layers for the swap gap (default: 3 spread over depth)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="local data folder (default: $UNITE_HF_DATA_DIR)")
    parser.add_argument("--trust-remote-code", action="store_true", help="for sources with remote code")
    add_quiet_argument(parser)


def _target_rank(value: str) -> int | tuple[int, int]:
    parts = [int(p) for p in value.split(",")]
    if len(parts) in (1, 2):
        return parts[0] if len(parts) == 1 else (parts[0], parts[1])
    raise argparse.ArgumentTypeError("rank is an int or r_out,r_in")


@command("retention", "how much of the source's function a gene keeps on held-out text: swap gap, per-layer error, "
         "perplexity; prints one JSON line", _retention_arguments)
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH_OR_ID", help="a gene or a UNITE target: local folder or Hub repo id")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")


@command("info", "what a gene or a UNITE target holds: method, provenance, ranks, errors, spectral energy at the "
         "stored ranks, parameters and files (JSON; no model is loaded)", _info_arguments)
def _run_info(args: argparse.Namespace) -> int:
    from .info import describe

    print(json.dumps(describe(args.path, revision=args.revision), indent=2))
    return 0


    parser = argparse.ArgumentParser(prog="unite-hf", description="Genes from Mixture-of-Experts LLMs (UNITE).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"unite_hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .calibration import CalibrationLoadError
    from .training.tasks import TaskLoadError

    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, OSError, CalibrationLoadError, TaskLoadError) as err:
        # user errors get one clear line, not a traceback
        print(f"unite-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
