"""Streaming extraction memory (issue 5, target 2): peak RSS as the number of layers L grows.

For each L, a Mixtral-architecture checkpoint (hidden 512, 8 experts of width 1792, vocab 1000) is
written with ``save_pretrained``; then, each in its own subprocess so that VmHWM is its own:

- streaming:  ``extract_universal_knowledge(<checkpoint folder>, fusion="uniform")`` (experts read one at
              a time from the shards, fused layer by layer, ``decompose_streaming``);
- in-memory:  ``AutoModelForCausalLM.from_pretrained`` then ``extract_universal_knowledge(model, ...)``
              with the same fusion (precomputed uniform importance, no calibration pass).

The streaming peak should stay flat in L (one expert + one layer + the HOOI buffers, which grow only
by ``L * (d_out * r_in + r_out * d_in)``); the in-memory peak grows with every layer's experts.

    .venv/bin/python benchmarks/bench_streaming_rss.py                 # L = 2, 4, 8, 16
    .venv/bin/python benchmarks/bench_streaming_rss.py --layers 2 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, EXPERTS, RANK = 512, 1792, 8, 128


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class _AnonPeak:
    """Peak anonymous RSS, sampled every 20 ms. VmHWM also counts the file-backed pages of the
    memory-mapped safetensors shards, which the kernel can drop at any time; RssAnon is what the
    process itself holds."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_mb("RssAnon"))


def _child(mode: str, path: str, layers: int) -> None:
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT))
    from unite_hf import extract_universal_knowledge
    from unite_hf.importance import ExpertImportance

    sampler = _AnonPeak()
    started = time.perf_counter()
    rank = (layers, RANK, RANK)
    if mode == "streaming":
        gene = extract_universal_knowledge(path, fusion="uniform", rank=rank, show_progress=False)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        uniform = ExpertImportance(moe_layers=list(range(layers)), fisher=torch.ones(layers, EXPERTS, dtype=torch.float64),
                                   frequency=torch.full((layers, EXPERTS), 1 / EXPERTS, dtype=torch.float64),
                                   num_sequences=0)
        gene = extract_universal_knowledge(model, importance=uniform, fusion="uniform", rank=rank, show_progress=False)
    print(json.dumps({"mode": mode, "layers": layers, "peak_mb": round(_status_mb("VmHWM")),
                      "peak_anon_mb": round(sampler.stop()), "seconds": round(time.perf_counter() - started, 1),
                      "rel_error_up": round(gene.config.relative_error["up"], 5)}))


def _write_checkpoint(path: Path, layers: int) -> float:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=EXPERTS, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(path, max_shard_size="200MB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PATH", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            path = Path(tmp) / f"mixtral-L{layers}"
            size = _write_checkpoint(path, layers)
            row = {"layers": layers, "checkpoint_mb": round(size)}
            for mode in ("streaming", "in-memory"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(layers)],
                                     capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                row[f"{mode}_peak_mb"], row[f"{mode}_seconds"] = result["peak_mb"], result["seconds"]
                row[f"{mode}_anon_mb"] = result["peak_anon_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| L | checkpoint MB | streaming: peak anon RSS MB | VmHWM MB | in-memory: peak anon RSS MB | VmHWM MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['checkpoint_mb']} | {r['streaming_anon_mb']} | {r['streaming_peak_mb']} | "
              f"{r['in-memory_anon_mb']} | {r['in-memory_peak_mb']} |")


if __name__ == "__main__":
    main()
