"""Does retention turn into better targets? A short causal-LM probe.

4-layer ``UniteForCausalLM`` targets train as causal LMs (``transformers.Trainer``) on WikiText-2 windows
for a fixed number of steps, over several seeds; held-out loss (SimpleBooks-92 valid, last 20%) is
measured at steps 0, 50, 100 and 200. Four initialisations share one source and one Fisher pass:

- ``kept+inherited``: the function-keeping gene (default concat fusion + tucker_hidden) with its cores;
- ``paper (random cores)``: the paper's gene (fisher + tucker) with random cores, as the paper grows targets;
- ``copy-only``: copied embeddings, attention and norms, random FFNs;
- ``random``: everything random.

    python benchmarks/bench_lm_probe.py                 # moefied SmolLM2, 3 seeds, 200 steps
    python benchmarks/bench_lm_probe.py --source upcycled --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INITS = ("kept+inherited", "paper (random cores)", "copy-only", "random")


def build_target(init: str, genes: dict, layers: int, rank: int, seed: int):
    from unite_hf import UniteForCausalLM
    from unite_hf.training.finetune import _reinit_ffns

    torch.manual_seed(seed)  # the family backbone's own init reads the global generator
    if init == "kept+inherited":
        return UniteForCausalLM.from_gene(genes["kept"], num_hidden_layers=layers, rank=rank, core_init="tucker")
    target = UniteForCausalLM.from_gene(genes["paper"], num_hidden_layers=layers, rank=rank, core_init="random")
    if init == "copy-only":
        _reinit_ffns(target, seed)
    elif init == "random":
        torch.manual_seed(seed)
        target = UniteForCausalLM(target.config)
    return target


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_and_probe(model, train: torch.Tensor, held_out: torch.Tensor, *, steps: int, eval_every: int, seed: int,
                    batch_size: int, learning_rate: float, work_dir: str) -> dict[int, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    curve: dict[int, float] = {}

    class Record(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            curve[state.global_step] = metrics["eval_loss"]

    args = TrainingArguments(work_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                             per_device_eval_batch_size=batch_size, learning_rate=learning_rate,
                             lr_scheduler_type="constant", eval_strategy="steps", eval_steps=eval_every,
                             save_strategy="no", logging_strategy="no", report_to=[], seed=seed, data_seed=seed,
                             disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(train), eval_dataset=_Windows(held_out),
                      callbacks=[Record()])
    trainer.evaluate()  # step 0
    trainer.train()
    return curve


def summarise(runs: list[dict]) -> dict:
    table: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for step, loss in run["curve"].items():
            table.setdefault(run["init"], {}).setdefault(int(step), []).append(loss)
    out = {}
    for init, steps in table.items():
        out[init] = {step: {"mean": sum(v) / len(v),
                            "se": (torch.tensor(v).std().item() / math.sqrt(len(v))) if len(v) > 1 else float("nan"),
                            "n": len(v)} for step, v in sorted(steps.items())}
    return out


def render(summary: dict, separation: dict) -> str:
    steps = sorted({s for per in summary.values() for s in per})
    lines = ["| init | " + " | ".join(f"loss @ {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for init, per in summary.items():
        lines.append(f"| {init} | " + " | ".join(f"{per[s]['mean']:.3f} ± {per[s]['se']:.3f}" for s in steps) + " |")
    lines.append("")
    lines.append(f"kept+inherited vs copy-only at step {separation['step']}: difference {separation['difference']:.3f} "
                 f"nats, {separation['z']:.1f} standard errors ({'**separated**' if abs(separation['z']) > 3 else '**NOT separated**'} "
                 "by more than 3).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default="moefied", choices=["moefied", "upcycled", "native"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--layers", type=int, default=4, help="target depth")
    parser.add_argument("--rank", type=int, default=128, help="target rank (genes are extracted at this rank)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--train-windows", type=int, default=1024, help="WikiText-2 training windows")
    parser.add_argument("--held-out-windows", type=int, default=16)
    parser.add_argument("--fisher-sequences", type=int, default=16)
    parser.add_argument("--json", nargs="+", default=["benchmarks/lm_probe.json"],
                        help="where the results go (with --report-only: several files, one section each)")
    parser.add_argument("--markdown", default="benchmarks/LM_PROBE.md", help="the tables, included in RESULTS.md")
    parser.add_argument("--work-dir", default="runs/lm_probe")
    parser.add_argument("--tiny", action="store_true", help="tiny random source (plumbing only)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        text = write_markdown([json.loads(Path(path).read_text()) for path in args.json], args.markdown)
        print(text)
        return 0
    if len(args.json) != 1:
        parser.error("--json takes one file unless --report-only")

    from bench_retention import load_source

    from unite_hf import compute_expert_importance, extract_universal_knowledge, get_source
    from unite_hf.calibration import load_calibration
    from unite_hf.evaluation import held_out_windows

    started = time.perf_counter()
    model, tokenizer, label = load_source(args.source, args.tiny)
    model = model.float().eval()
    moe = get_source(model)
    width = moe.num_experts * moe.blocks[0].expert(0).down.shape[1] // 2
    calib = load_calibration("wikitext2", tokenizer, num_sequences=args.fisher_sequences, seq_len=args.seq_len, seed=0,
                             show_progress=False)
    importance = compute_expert_importance(model, calib, batch_size=4, seed=0, show_progress=False)
    common = dict(importance=importance, rank=args.rank, show_progress=False)
    genes = {"paper": extract_universal_knowledge(model, tokenizer, **common),
             "kept": extract_universal_knowledge(model, tokenizer, fusion="concat", decomposition="tucker_hidden",
                                                 fused_width=width, **common)}
    del model
    train = load_calibration("wikitext2", tokenizer, num_sequences=args.train_windows, seq_len=args.seq_len, seed=1,
                             show_progress=False).input_ids
    held_out, held_label = held_out_windows(tokenizer, num_windows=args.held_out_windows, seq_len=args.seq_len)
    runs = []
    for seed in args.seeds:
        for init in INITS:
            target = build_target(init, genes, args.layers, args.rank, seed)
            curve = train_and_probe(target, train, held_out, steps=args.steps, eval_every=args.eval_every, seed=seed,
                                    batch_size=args.batch_size, learning_rate=args.learning_rate,
                                    work_dir=f"{args.work_dir}/{init.split()[0]}-{seed}")
            runs.append({"init": init, "seed": seed, "curve": curve})
            print(f"[{args.source}] seed {seed} {init}: " + ", ".join(f"{s}: {v:.3f}" for s, v in sorted(curve.items())),
                  flush=True)
    summary = summarise(runs)
    step = min(args.eval_every, args.steps)
    best, copy = summary["kept+inherited"][step], summary["copy-only"][step]
    difference = best["mean"] - copy["mean"]
    z = difference / math.sqrt(best["se"] ** 2 + copy["se"] ** 2) if len(args.seeds) > 1 else float("nan")
    separation = {"step": step, "difference": difference, "z": z}
    result = {"command": "python benchmarks/bench_lm_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "source": label, "held_out": held_label, "runs": runs, "summary": summary, "separation": separation,
              "minutes": round((time.perf_counter() - started) / 60, 1)}
    Path(args.json[0]).write_text(json.dumps(result, indent=1, sort_keys=True))
    print(render(summary, separation))
    return 0


def write_markdown(results: list[dict], path: str) -> str:
    """LM_PROBE.md: one table per source (JSON turns the step keys into strings: back to ints)."""
    lines = ["# LM probe: does retention turn into better targets?", "",
             "4-layer `UniteForCausalLM` targets trained as causal LMs (`transformers.Trainer`, constant lr) on "
             "WikiText-2 windows; held-out loss (nats/token) on SimpleBooks-92 valid (last 20%), mean ± standard "
             "error over seeds. Inits: `kept+inherited` = concat fusion + tucker_hidden gene, `core_init=\"tucker\"`; "
             "`paper (random cores)` = fisher + tucker gene, random cores; `copy-only` = copied embeddings, "
             "attention and norms, random FFNs; `random` = everything random.", ""]
    for result in results:
        summary = {init: {int(step): v for step, v in per.items()} for init, per in result["summary"].items()}
        lines += [f"## {result['source']}", "", f"Reproduce: `{result['command']}` ({result['minutes']} minutes on "
                  "2 shared cores).", "", render(summary, result["separation"]), ""]
    text = "\n".join(lines)
    Path(path).write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
