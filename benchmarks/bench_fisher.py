"""Fisher benchmark (issue 5, target 1): the batched exact per-sequence Fisher against

- plain:       an ordinary forward + backward over the same batches (all parameters require grad,
               default experts implementation): the cost floor of any gradient-based importance;
- brute_batch: the D2-MoE style reference at batch 16: one batched forward, then one backward per
               sequence (retain_graph), reading each expert's parameter gradients after each;
- brute_seq:   one forward + backward per sequence at batch 1 (what tests/test_importance.py does).

Each method runs in its own subprocess so that its peak RSS (VmHWM) is its own; the reported memory
is the peak minus the RSS after the model is built. The brute_batch run also computes ours on the same
sequences and reports the largest relative difference of the Fisher (exactness).

    .venv/bin/python benchmarks/bench_fisher.py                    # hidden 1024, 8 experts, I 2816, 2 layers, 16 x 256
    .venv/bin/python benchmarks/bench_fisher.py --layers 4 --batches 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build(args):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=8, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (args.batch * args.batches, args.seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids


def run_method(args) -> dict:
    from unite_hf import compute_expert_importance, get_source

    torch.set_num_threads(args.threads)
    model, ids = build(args)
    source = get_source(model)
    base_kb = _status_kb("VmRSS")
    out: dict = {"method": args.method}
    t0 = time.perf_counter()
    if args.method == "ours":
        compute_expert_importance(model, ids, batch_size=args.batch, show_progress=False)
        n = ids.shape[0]
    elif args.method == "plain":
        for p in model.parameters():
            p.requires_grad_(True)
        for start in range(0, ids.shape[0], args.batch):
            batch = ids[start:start + args.batch]
            logits = model(input_ids=batch, use_cache=False).logits
            torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch[:, 1:, None]).sum().backward()
        n = ids.shape[0]
    elif args.method == "brute_batch":
        ids = ids[:args.batch]
        params = [p for b in source.blocks for p in b.expert_parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        fisher = torch.zeros(len(source.blocks), source.num_experts, dtype=torch.float64)
        logits = model(input_ids=ids, use_cache=False).logits
        log_lik = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
        for n_ in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            log_lik[n_].backward(retain_graph=n_ < ids.shape[0] - 1)
            for row, block in enumerate(source.blocks):
                for e in range(source.num_experts):
                    fisher[row, e] += sum(p.grad[e].double().square().sum() for p in block.expert_parameters()
                                          if p.grad is not None)
        fisher /= ids.shape[0]
        n = ids.shape[0]
        out["seconds"] = time.perf_counter() - t0
        out["peak_extra_mb"] = (_status_kb("VmHWM") - base_kb) / 1024
        model.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        ours = compute_expert_importance(model, ids, batch_size=args.batch, show_progress=False).fisher
        out["max_rel_diff_vs_ours"] = float(((ours - fisher).abs() / fisher.abs().clamp_min(1e-300)).max())
    elif args.method == "brute_seq":
        ids = ids[:args.batch]
        params = [p for b in source.blocks for p in b.expert_parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for n_ in range(ids.shape[0]):
            model.zero_grad(set_to_none=True)
            seq = ids[n_:n_ + 1]
            logits = model(input_ids=seq, use_cache=False).logits
            torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, seq[:, 1:, None]).sum().backward()
        n = ids.shape[0]
    else:
        raise ValueError(args.method)
    out.setdefault("seconds", time.perf_counter() - t0)
    out.setdefault("peak_extra_mb", (_status_kb("VmHWM") - base_kb) / 1024)
    out["sequences"] = n
    out["seq_per_s"] = n / out["seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default=None, choices=["ours", "plain", "brute_batch", "brute_seq"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args)))
        return
    results = {}
    passthrough = [a for a in sys.argv[1:]]
    for method in ("ours", "plain", "brute_seq", "brute_batch"):
        proc = subprocess.run([sys.executable, __file__, "--method", method, *passthrough], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(proc.stderr)
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(results[method]), flush=True)
    ours = results["ours"]["seq_per_s"]
    summary = {
        "shape": {"hidden": args.hidden, "intermediate": args.intermediate, "experts": args.experts,
                  "layers": args.layers, "seq_len": args.seq_len, "batch": args.batch, "threads": args.threads},
        "ours_time_over_plain": results["plain"]["seq_per_s"] / ours,
        "speedup_vs_brute_batch": ours / results["brute_batch"]["seq_per_s"],
        "speedup_vs_brute_seq": ours / results["brute_seq"]["seq_per_s"],
        "peak_mb": {m: round(r["peak_extra_mb"]) for m, r in results.items()},
        "max_rel_diff_vs_brute": results["brute_batch"]["max_rel_diff_vs_ours"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
