"""The ``unite-hf`` command line, parsed before anything heavy is imported.

``unite-hf --help`` and every sub-command's ``--help`` answer in a fraction of a second: this package
imports only ``argparse`` (it sits beside ``unite_hf``, whose ``import`` registers the Auto classes and
so loads torch and transformers). Only once the arguments parse does :func:`main` hand over to
:func:`unite_hf.cli.main`, which runs the command. The choices below are the names of unite_hf's
registries, kept equal to them by ``tests/test_cli_info.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

TASK_NAMES = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "rte", "sst2",
              "winogrande"]  # unite_hf.training.tasks.TASKS
FORMAT_NAMES = ["classification", "multiple_choice"]  # unite_hf.training.finetune.FORMATS
INIT_NAMES = ["unite", "random", "copy-only", "masa"]  # unite_hf.training.finetune.INITS
PROFILE_NAMES = ["full", "full-native", "quick", "smoke"]  # unite_hf.bench.PROFILES
MOEFY_GROUPINGS = ["balanced_kmeans", "coactivation", "contiguous"]  # tools.moefy.GROUPINGS
MOEFY_ROUTERS = ["fit", "centroid", "uniform"]  # tools.moefy.ROUTERS
BUILTIN_DOMAIN_NAMES = ["arc", "arc_challenge", "arc_easy", "boolq", "openbookqa", "piqa", "rte",
                        "sst2"]  # unite_hf.methods.xpert.analysis.BUILTIN_DOMAINS
ANALYSIS_FILE, HEATMAP_FILE = "expert_analysis.json", "expert_heatmap.png"  # unite_hf.methods.xpert.analysis
EXPERIMENT_NAMES = ["generalization", "data_efficiency", "fusion", "decomposition", "rank", "depth", "downstream",
                    "masa", "xpert", "retention", "lm_probe"]  # unite_hf.bench.EXPERIMENTS
SCRIPT_EXPERIMENT_NAMES = ["retention", "lm_probe"]  # unite_hf.bench.SCRIPT_EXPERIMENTS

# names the method configs own (unite_hf/methods/<name>/config.py), read from there on first use
_CONFIG_CONSTANTS = {
    "DEFAULT_CALIBRATION": ("unite", "DEFAULT_CALIBRATION"), "FUSION_NAMES": ("unite", "FUSION_NAMES"),
    "DECOMPOSITION_NAMES": ("unite", "DECOMPOSITION_NAMES"), "LABEL_MODE_NAMES": ("unite", "LABEL_MODE_NAMES"),
    "COMMONALITY_SCORE_NAMES": ("xpert", "COMMONALITY_SCORE_NAMES"),
    "SELECTION_STRATEGY_NAMES": ("xpert", "SELECTION_STRATEGY_NAMES"), "DEFAULT_DOMAIN_NAMES": ("xpert", "DEFAULT_DOMAINS"),
}


def _config_constant(name: str) -> Any:
    from .extract import method_configs

    method, attribute = _CONFIG_CONSTANTS[name]
    value = getattr(sys.modules[method_configs()[method].__module__], attribute)
    return list(value) if isinstance(value, tuple) else value


def __getattr__(name: str) -> Any:
    """``METHOD_NAMES`` and the choice lists above, from the method configs (loaded without torch)."""
    if name == "METHOD_NAMES":
        from .extract import method_configs

        return sorted(method_configs())
    if name in _CONFIG_CONSTANTS:
        return _config_constant(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _domain(value: str) -> tuple[str, str]:
    """``--domain NAME=CORPUS`` of analyze-experts (the parser XPERT's config gives its own ``--domain``)."""
    parse = sys.modules[_xpert_config().__module__].parse_domain
    try:
        return parse(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _xpert_config() -> type:
    from .extract import method_configs

    return method_configs()["xpert"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where the default is ``None`` or ``False``
    (an unset option or a flag) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def progress_disabled_by_environment() -> bool:
    """``HF_HUB_DISABLE_PROGRESS_BARS`` or ``TQDM_DISABLE`` set to a true value (1, true, yes, on)."""
    import os

    off = {"1", "true", "yes", "on"}
    return any(os.environ.get(name, "").strip().lower() in off for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"))


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--quiet``, ``HF_HUB_DISABLE_PROGRESS_BARS`` or ``TQDM_DISABLE`` say no."""
    return not getattr(args, "quiet", False) and not progress_disabled_by_environment()


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (also off with HF_HUB_DISABLE_PROGRESS_BARS=1 or TQDM_DISABLE=1)")


def add_calibration_arguments(parser: argparse.ArgumentParser, num_sequences: int, seq_len: int) -> None:
    """The calibration corpus and its seeded windows (extraction and moefy)."""
    parser.add_argument("--calibration", default=_config_constant("DEFAULT_CALIBRATION"),
                        help="'wikitext2', a local text file, or a Hub dataset id (default: %(default)s)")
    parser.add_argument("--num-sequences", type=int, default=num_sequences,
                        help="calibration sequences N (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence T (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")


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
    from .extract import add_arguments

    add_arguments(parser)  # every method's settings, generated from its config dataclass
    add_quiet_argument(parser)


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a gene (folder or Hub id) or a saved UNITE target")
    parser.add_argument("--task", required=True, choices=TASK_NAMES, help="the task to fine-tune on")
    parser.add_argument("--data-dir", default=None, help="local task files (default: $UNITE_HF_DATA_DIR)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or path (default: the one saved with the model)")
    parser.add_argument("--format", choices=FORMAT_NAMES, default="classification",
                        help="k-way sequence classification (the paper, default) or multiple choice")
    parser.add_argument("--init", choices=INIT_NAMES, default="unite",
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
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also push the fine-tuned model (with its model card) and tokenizer to this Hub repo")
    add_quiet_argument(parser)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="quick",
                        help="full: ~2 hours on 2 CPU cores; quick: minutes; smoke: seconds (default: %(default)s)")
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENT_NAMES,
                        default=[e for e in EXPERIMENT_NAMES if e not in SCRIPT_EXPERIMENT_NAMES],
                        help="which experiments to run; retention and lm_probe run benchmarks/ scripts of a "
                             "source checkout, only when named")
    parser.add_argument("--out", default="benchmarks", help="where RESULTS.md, results.json and plots go")
    parser.add_argument("--work-dir", default="runs/bench", help="genes and fine-tuned models (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random source instead of SmolLM2 (plumbing only)")
    parser.add_argument("--report-only", action="store_true",
                        help="re-render RESULTS.md and the plots from the stored results.json; runs nothing")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="working folder (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="local data folder (default: $UNITE_HF_DATA_DIR)")
    parser.add_argument("--tiny", action="store_true", help="skip the real model: a tiny random MoE (plumbing only)")


def _moefy_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``unite-hf moefy`` (``tools.moefy.add_arguments`` is this)."""
    parser.add_argument("--model", required=True, help="Hub id or local folder of a dense Llama-family causal LM")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (needs the gguf package)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or folder (default: the model's)")
    parser.add_argument("--out", required=True, help="folder to save the MixtralForCausalLM (and tokenizer) to")
    parser.add_argument("--num-experts", type=int, default=8, help="experts E per layer (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default: %(default)s)")
    parser.add_argument("--grouping", choices=MOEFY_GROUPINGS, default=None,
                        help="neuron grouping (default: coactivation when calibrating, else balanced_kmeans)")
    parser.add_argument("--router", choices=MOEFY_ROUTERS, default="fit",
                        help="fit: fitted on calibration hidden states; centroid; uniform")
    parser.add_argument("--exact", action="store_true",
                        help="top-k = E with a uniform router: the MoE computes exactly the dense model")
    parser.add_argument("--down-scale", type=float, default=None, help="expert down_proj scale (default: top-k)")
    add_calibration_arguments(parser, num_sequences=16, seq_len=256)
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                        help="load dtype (default: %(default)s)")


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``unite-hf analyze-experts`` (``unite_hf.methods.xpert.analysis.add_arguments`` is this)."""
    parser.add_argument("--source", required=True, help="Hub id or local path of a MoE causal LM")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub source (default: main)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer id or path (default: the source's)")
    parser.add_argument("--trust-remote-code", action="store_true", help="for remote-code MoEs (e.g. DeepSeek-MoE-16B)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="load dtype (auto: the checkpoint's own)")
    parser.add_argument("--domain", dest="domains", action="append", type=_domain, metavar="NAME=CORPUS",
                        help="a domain: NAME=<text file | Hub dataset id | wikitext2 | simplebooks | built-in>, or a "
                             f"built-in NAME ({', '.join(BUILTIN_DOMAIN_NAMES)}); repeat for each domain "
                             f"(default: {' '.join(_config_constant('DEFAULT_DOMAIN_NAMES'))})")
    # the routing analysis's settings are XPERT's (extract --method xpert runs the same analysis): one default each
    xpert = _xpert_config()
    defaults = {name: xpert.__dataclass_fields__[name].default for name in ("num_sequences", "seq_len", "seed",
                                                                             "batch_size", "score")}
    parser.add_argument("--num-sequences", type=int, default=defaults["num_sequences"],
                        help="sequences per domain (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=defaults["seq_len"], help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the sequences drawn from each domain")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                        help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--score", choices=_config_constant("COMMONALITY_SCORE_NAMES"), default=defaults["score"],
                        help="commonality score that ranks experts across domains")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--k-common", type=int, default=None, help="common experts per layer (default: top-k)")
    selection.add_argument("--threshold", type=float, default=None, help="keep experts scoring at least this")
    parser.add_argument("--top-m", type=int, default=None, help="m of the top_m_fraction score (default: top-k)")
    parser.add_argument("--out", required=True, help=f"folder to write {ANALYSIS_FILE} and {HEATMAP_FILE} to")


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


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH_OR_ID", help="a gene or a UNITE target: local folder or Hub repo id")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")



# sub-command -> (help text, function adding its arguments); unite_hf.cli holds what each one runs
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "extract": ("extract a gene (UNITE, MASA or XPERT) from a source causal LM",
        _extract_arguments),
    "finetune": ("fine-tune a target grown from a gene on a task; prints the eval accuracy as one JSON line",
        _finetune_arguments),
    "bench": ("reproduce the paper's experiments at our scale; writes benchmarks/RESULTS.md",
        _bench_arguments),
    "demo": ("the main job: SmolLM2 -> moefy -> gene -> 4-layer targets fine-tuned on SST-2, UNITE vs random",
        _demo_arguments),
    "moefy": ("convert a dense Llama-family model into a Mixtral MoE (neurons split into experts, fitted router)",
        _moefy_arguments),
    "analyze-experts": ("XPERT's cross-domain routing analysis of a MoE: JSON report and heat map (inference only)",
        _analyze_arguments),
    "retention": ("how much of the source's function a gene keeps on held-out text: swap gap, per-layer error, perplexity; prints one JSON line",
        _retention_arguments),
    "info": ("what a gene or a UNITE target holds: method, provenance, ranks, errors, spectral energy at the stored ranks, parameters and files (JSON; no model is loaded)",
        _info_arguments),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``unite-hf`` parser. Only the sub-command named in ``argv`` (default: ``sys.argv``) gets its
    arguments, so ``unite-hf --help`` builds none and ``unite-hf X --help`` only X's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("unite_hf")
    except PackageNotFoundError:  # a source checkout that was never installed
        __version__ = "unknown"
    parser = argparse.ArgumentParser(prog="unite-hf", description="Genes from Mixture-of-Experts LLMs (UNITE).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"unite_hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    wanted = next((a for a in (sys.argv[1:] if argv is None else argv) if a in COMMANDS), None)
    for name, (help_text, add_arguments) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == wanted:
            add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse (``--help`` and usage errors end here, fast), then run the command with unite_hf."""
    args = build_parser(argv).parse_args(argv)
    if args.command == "extract":  # settings of the wrong method, or out of range: say so before loading torch
        from .extract import config_from_args

        try:
            config_from_args(args)
        except (ValueError, OSError) as err:
            print(f"unite-hf extract: error: {err}", file=sys.stderr)
            return 2
    from unite_hf.cli import main as run

    return run(argv)
