"""Target save and load time, this tree against a baseline tree, side by side.

Each measurement runs in its own process with ``PYTHONPATH`` set to one tree (this checkout, or a baseline
exported with ``git archive <commit> unite_hf model_cards | tar -x -C DIR``); the two trees alternate round
by round, so both see the same machine load. A process grows a UNITE target from a gene of a Mixtral-shaped
source (built from a config, seeded), then times ``save_pretrained`` into one folder and
``UniteForCausalLM.from_pretrained`` of it (checksums verified, as a user's load does).

    .venv/bin/python benchmarks/bench_target_io.py --baseline /tmp/base --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIZES = {  # name -> source config overrides (Mixtral) and the target's rank
    "small": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_local_experts=4,
                  num_attention_heads=4, num_key_value_heads=2, rank=16),
    "medium": dict(vocab_size=32000, hidden_size=512, intermediate_size=512, num_hidden_layers=4, num_local_experts=4,
                   num_attention_heads=8, num_key_value_heads=4, rank=64),
}

WORKER = r'''
import json, os, sys, time, warnings
import torch
torch.set_num_threads(1)
warnings.filterwarnings("ignore")
import transformers
transformers.logging.set_verbosity_error()
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
from unite_hf import UniteForCausalLM, extract_universal_knowledge

size, folder, repeats = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rank = size.pop("rank")
torch.manual_seed(0)
config = transformers.MixtralConfig(num_experts_per_tok=2, max_position_embeddings=64, **size)
source = transformers.MixtralForCausalLM(config).eval()
calibration = torch.randint(0, size["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
gene = extract_universal_knowledge(source, calibration=calibration, show_progress=False)
target = UniteForCausalLM.from_gene(gene, num_hidden_layers=size["num_hidden_layers"], rank=rank)
target.save_pretrained(folder)  # warm-up: imports, first writes
UniteForCausalLM.from_pretrained(folder)
saves, loads = [], []
for _ in range(repeats):
    start = time.perf_counter(); target.save_pretrained(folder); saves.append(time.perf_counter() - start)
    start = time.perf_counter(); UniteForCausalLM.from_pretrained(folder); loads.append(time.perf_counter() - start)
megabytes = sum(p.stat().st_size for p in os.scandir(folder) if p.is_file()) / 1e6
print(json.dumps({"save": saves, "load": loads, "megabytes": megabytes}))
'''


def measure(tree: Path, size: dict, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as work:  # cwd outside both trees: only PYTHONPATH picks unite_hf
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-c", WORKER, json.dumps(size), str(Path(work) / "target"), str(repeats)],
                                cwd=work, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"worker failed on {tree}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a tree holding the baseline's unite_hf/")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed saves and loads per process")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": ROOT}
    for name in args.sizes:
        times = {tree: {"save": [], "load": []} for tree in trees}
        megabytes = 0.0
        for round_ in range(args.rounds):
            for tree in (trees if round_ % 2 == 0 else dict(reversed(trees.items()))):
                found = measure(trees[tree], dict(SIZES[name]), args.repeats)
                megabytes = found["megabytes"]
                for op in ("save", "load"):
                    times[tree][op].append(statistics.median(found[op]))  # one median per process
        print(f"\n{name} target ({megabytes:.1f} MB on disk), {args.rounds} processes per tree, median of "
              f"{args.repeats} per process; median over processes [min-max]:")
        for op in ("save", "load"):
            base, ours = (statistics.median(times[tree][op]) for tree in trees)
            spread = {tree: f"[{min(times[tree][op]):.4f}-{max(times[tree][op]):.4f}]" for tree in trees}
            print(f"  {op}: baseline {base:.4f} s {spread['baseline']}, this tree {ours:.4f} s {spread['this tree']}: "
                  f"{ours / base:.3f}x")


if __name__ == "__main__":
    main()
