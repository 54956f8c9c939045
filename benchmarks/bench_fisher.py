"""Fisher benchmark (issues 5 and 15): the batched exact per-sequence Fisher against

- plain:       an ordinary forward + backward over the same batches (all parameters require grad,
               default experts implementation): the cost floor of any gradient-based importance;
- brute_batch: the D2-MoE style reference: one batched forward, then one backward per sequence
               (retain_graph), reading each expert's parameter gradients after each (first batch only);
- brute_seq:   one forward + backward per sequence at batch 1 (what tests/test_importance.py does);
- ours_before: ours with the per-sequence kernels as they were before issue 15 (float64 token
               Grams, index_put padding) and the expert-by-expert probe, frozen in this file, so
               before and after run side by side;
- ours_per_expert: today's kernels behind the expert-by-expert probe (frozen here): one probed linear
               map per routed expert and projection, a host sync each;
- ours_grouped_mm, ours_padded: today's grouped probe with the grouped-GEMM or the zero-padded
               float32-output kernel instead of the fused Triton one (importance.GROUPED_KERNEL; bf16
               and fp16 on GPUs; elsewhere identical to ours).

Each method runs in its own subprocess, so that its peak memory is its own: peak RSS (VmHWM) minus
the RSS after the model is built on cpu, ``torch.cuda.max_memory_allocated`` minus the memory after
the model is built on cuda. The brute_batch run also computes ours on the same sequences and reports
the largest relative difference of the Fisher (exactness). ``--repeats R`` runs the methods R times,
interleaved, and reports the median and the range of every time and ratio.

``--kernels`` times the per-sequence squared-norm kernels alone (before, after, float32 and float64
Grams, the direct product; FLOPs counted) at the issue's projection shapes and measures the rounding
error of each on adversarial activations against a float64 reference.

    .venv/bin/python benchmarks/bench_fisher.py                    # hidden 1024, 8 experts, I 2816, 2 layers, 16 x 256
    .venv/bin/python benchmarks/bench_fisher.py --layers 4 --batches 2
    .venv/bin/python benchmarks/bench_fisher.py --device cuda --shape mixtral-like
    .venv/bin/python benchmarks/bench_fisher.py --device cpu --shape small           # seconds: the smoke test
    .venv/bin/python benchmarks/bench_fisher.py --kernels --shape mixtral-like --device cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# shape -> defaults; any of these flags given on the command line wins
SHAPES: dict[str, dict] = {
    # PERF.md section 1 (the CPU figures of issue 5)
    "default": dict(hidden=1024, intermediate=2816, experts=8, layers=2, vocab=32000, seq_len=256, batch=16,
                    batches=1, dtype="float32"),
    # issue 15: the H100 measurement
    "mixtral-like": dict(hidden=2048, intermediate=5632, experts=8, layers=8, vocab=32000, seq_len=1024, batch=8,
                         batches=4, dtype="bfloat16"),
    # seconds on a CPU: the smoke test
    "small": dict(hidden=64, intermediate=96, experts=4, layers=2, vocab=256, seq_len=48, batch=4, batches=2,
                  dtype="float32"),
}
METHODS = ("ours", "ours_before", "ours_per_expert", "ours_grouped_mm", "ours_padded", "plain", "brute_seq",
           "brute_batch")


# -- the per-sequence kernels as they were before issue 15 (frozen; benchmark only) ----------------------

_BEFORE_GRAM_LIMIT = 4096


def _before_sum_per_sequence_sq_norms(x: torch.Tensor, grad: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    if seq_ids.numel() > 1 and bool((seq_ids[1:] < seq_ids[:-1]).any()):
        order = torch.argsort(seq_ids, stable=True)
        x, grad, seq_ids = x[order], grad[order], seq_ids[order]
    groups, counts = torch.unique_consecutive(seq_ids, return_counts=True)
    longest = int(counts.max())
    d_in, d_out = x.shape[1], grad.shape[1]
    if longest <= _BEFORE_GRAM_LIMIT and longest * (d_in + d_out) <= d_in * d_out:
        starts = torch.cumsum(counts, 0) - counts
        group = torch.repeat_interleave(torch.arange(groups.numel(), device=x.device), counts)
        pos = torch.arange(x.shape[0], device=x.device) - starts[group]
        xp = x.new_zeros(groups.numel(), longest, d_in, dtype=torch.float64)
        gp = x.new_zeros(groups.numel(), longest, d_out, dtype=torch.float64)
        xp[group, pos] = x.double()
        gp[group, pos] = grad.double()
        return ((xp @ xp.mT) * (gp @ gp.mT)).sum()
    return sum((g.T @ xs).double().square().sum()
               for xs, g in zip(x.split(counts.tolist()), grad.split(counts.tolist())))


def _before_sum_per_sequence_bias_sq_norms(grad: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(int(seq_ids.max()) + 1, grad.shape[1], dtype=torch.float64, device=grad.device)
    return sums.index_add_(0, seq_ids, grad.double()).square().sum()


def _before_sink_call(self, expert, x, grad, seq_ids, has_bias) -> None:
    self.calls += 1
    x, grad = x.float(), grad.float()
    sq_norm = _before_sum_per_sequence_sq_norms(x, grad, seq_ids)
    if has_bias:
        sq_norm = sq_norm + _before_sum_per_sequence_bias_sq_norms(grad, seq_ids)
    self.fisher[expert] += sq_norm


@contextlib.contextmanager
def kernels_before() -> object:
    """``compute_expert_importance`` with the pre-issue-15 kernels and probe (no diagonal Fisher)."""
    from unite_hf import importance

    current = importance._GradientSink.__call__
    importance._GradientSink.__call__ = _before_sink_call
    try:
        with probe_per_expert():
            yield
    finally:
        importance._GradientSink.__call__ = current


def _per_expert_probed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """The fused-experts probe as it was before the grouped one (frozen; benchmark only): the eager
    expert-by-expert loop, two probed linear maps per routed expert, a host sync per expert."""
    from unite_hf.compat import apply_gate

    probe = self._unite_probe
    block = probe.block
    probe.route(top_k_index, top_k_weights)
    seq_ids = probe.token_sequences(hidden_states)
    first_param = block.first_parameter
    valid = top_k_index < block.num_experts
    final = torch.zeros_like(hidden_states)
    for expert in torch.unique(top_k_index[valid]).tolist():
        token_idx, slot = torch.where(top_k_index == expert)
        x = hidden_states[token_idx]
        weights = block.expert(expert)
        first_weight = first_param[expert].T if block.is_transposed else first_param[expert]
        first_bias = block._first_bias[expert] if block.has_bias else None
        h = probe.linear("first", expert, x, first_weight, first_bias, seq_ids[token_idx])
        h = apply_gate(self, h) if block.has_gate else self.act_fn(h)
        out = probe.linear("down", expert, h, weights.down, weights.down_bias, seq_ids[token_idx])
        final.index_add_(0, token_idx, (out * top_k_weights[token_idx, slot, None]).to(final.dtype))
    return final


@contextlib.contextmanager
def probe_per_expert() -> object:
    """``compute_expert_importance`` with the expert-by-expert probe of :func:`_per_expert_probed_forward`."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from unite_hf.sources.fused import PROBE_IMPLEMENTATION, probed_experts_forward

    ALL_EXPERTS_FUNCTIONS.register(PROBE_IMPLEMENTATION, _per_expert_probed_forward)
    try:
        yield
    finally:
        ALL_EXPERTS_FUNCTIONS.register(PROBE_IMPLEMENTATION, probed_experts_forward)


@contextlib.contextmanager
def grouped_kernel(name: str) -> object:
    """``compute_expert_importance`` with the grouped probe's bf16 GPU kernel ``name`` (importance.GROUPED_KERNEL)."""
    from unite_hf import importance

    current, importance.GROUPED_KERNEL = importance.GROUPED_KERNEL, name
    try:
        yield
    finally:
        importance.GROUPED_KERNEL = current


# method -> how it changes ``ours`` (None: ours as it is)
VARIANTS = {"ours_before": kernels_before, "ours_per_expert": probe_per_expert,
            "ours_padded": lambda: grouped_kernel("padded_bmm"), "ours_grouped_mm": lambda: grouped_kernel("grouped_mm")}


@contextlib.contextmanager
def count_gram_stacks(counts: dict[str, int]) -> object:
    """Count the token groups that the Gram form computes, per dtype (float64: float32 fallbacks)."""
    from unite_hf import importance

    gram = importance._gram_sq_norms

    def counted(x, grad):
        key = str(x.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + x.shape[0]
        return gram(x, grad)

    importance._gram_sq_norms = counted
    try:
        yield
    finally:
        importance._gram_sq_norms = gram


# -- whole-model methods -----------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Meter:
    """Wall time (synchronised on cuda) and peak memory above the moment of creation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_kb("VmRSS") * 1024
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        self.cpu = time.process_time() - self.cpu_start  # all threads: on a busy machine steadier than wall time
        return time.perf_counter() - self.start

    def peak_extra_mb(self) -> float:
        peak = torch.cuda.max_memory_allocated() if self.cuda else _status_kb("VmHWM") * 1024
        return (peak - self.base) / 2**20


def build(args):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=8, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # initialised where it runs: seconds, not a minute, for 2B parameters on a GPU
        model = transformers.MixtralForCausalLM(config).eval().to(dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.batch * args.batches, args.seq_len), generator=torch.Generator().manual_seed(1))
    return model, ids


def _log_likelihood(model, batch: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    logits = model(input_ids=batch, use_cache=False).logits
    log_lik = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    return log_lik.sum(-1) if per_sequence else log_lik.sum()


def _expert_params_only(model, source) -> list[torch.Tensor]:
    params = [p for b in source.blocks for p in b.expert_parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def _run_ours(model, ids, args) -> None:
    from unite_hf import compute_expert_importance

    compute_expert_importance(model, ids, batch_size=args.batch, show_progress=False)


def _run_plain(model, ids, args) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    for start in range(0, ids.shape[0], args.batch):
        _log_likelihood(model, ids[start:start + args.batch].to(args.device)).backward()


def _run_brute_seq(model, ids, args) -> None:
    from unite_hf import get_source

    _expert_params_only(model, get_source(model))
    for n in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        _log_likelihood(model, ids[n:n + 1].to(args.device)).backward()


def _brute_batch_fisher(model, ids, args) -> torch.Tensor:
    from unite_hf import get_source

    source = get_source(model)
    _expert_params_only(model, source)
    fisher = torch.zeros(len(source.blocks), source.num_experts, dtype=torch.float64, device=args.device)
    log_lik = _log_likelihood(model, ids.to(args.device), per_sequence=True)
    for n in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        log_lik[n].backward(retain_graph=n < ids.shape[0] - 1)
        for row, block in enumerate(source.blocks):
            for e in range(source.num_experts):
                fisher[row, e] += sum(p.grad[e].double().square().sum() for p in block.expert_parameters()
                                      if p.grad is not None)
    return fisher.cpu() / ids.shape[0]


RUNNERS = {"ours": _run_ours, "plain": _run_plain, "brute_seq": _run_brute_seq}


def run_method(args) -> dict:
    from unite_hf import compute_expert_importance

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, ids = build(args)
    if args.method == "brute_seq" or args.method == "brute_batch":
        ids = ids[:args.batch]  # one batch: these references are slow
    out: dict = {"method": args.method, "device": args.device, "dtype": args.dtype,
                 # the experts forward of "plain" (transformers' default: grouped_mm where it can dispatch)
                 "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    variant = VARIANTS.get(args.method, contextlib.nullcontext)
    run = _run_ours if args.method in VARIANTS else RUNNERS.get(args.method)
    for _ in range(args.warmup):  # first-call costs: cuBLAS handles, allocator growth, kernel selection
        with variant():
            (run or _brute_batch_fisher)(model, ids[:args.batch], args)
        model.zero_grad(set_to_none=True)
    meter = Meter(device)
    if args.method == "brute_batch":
        fisher = _brute_batch_fisher(model, ids, args)
        out["seconds"], out["peak_extra_mb"], out["cpu_seconds"] = meter.seconds(), meter.peak_extra_mb(), meter.cpu
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
        ours = compute_expert_importance(model, ids, batch_size=args.batch, show_progress=False).fisher
        out["max_rel_diff_vs_ours"] = float(((ours - fisher).abs() / fisher.abs().clamp_min(1e-300)).max())
    else:
        stacks: dict[str, int] = {}
        with variant(), count_gram_stacks(stacks):
            run(model, ids, args)
        out["seconds"], out["peak_extra_mb"], out["cpu_seconds"] = meter.seconds(), meter.peak_extra_mb(), meter.cpu
        if stacks:  # token groups through the Gram form: in float32, and redone in float64
            out["gram_groups"] = stacks
    out["sequences"] = ids.shape[0]
    out["seq_per_s"] = ids.shape[0] / out["seconds"]
    return out


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def compare(args, passthrough: list[str]) -> dict:
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:  # interleaved: a load change hits every method alike
            if args.in_process:
                runs[method].append(run_method(argparse.Namespace(**{**vars(args), "method": method})))
            else:
                proc = subprocess.run([sys.executable, __file__, "--method", method, *passthrough],
                                      capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(proc.stderr)
                runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[method][-1]), flush=True)
    summary: dict = {
        "shape": {k: getattr(args, k) for k in ("shape", "hidden", "intermediate", "experts", "layers", "vocab",
                                                 "seq_len", "batch", "batches", "dtype", "device", "threads")},
        "repeats": args.repeats,
        "seconds": {m: _spread([r["seconds"] for r in rs]) for m, rs in runs.items()},
        "cpu_seconds": {m: _spread([r["cpu_seconds"] for r in rs]) for m, rs in runs.items()},
        "peak_mb": {m: round(max(r["peak_extra_mb"] for r in rs)) for m, rs in runs.items()},
    }

    def ratio(name: str, num: str, den: str) -> None:  # time per sequence of num over den, per repeat
        if num in runs and den in runs:
            summary[name] = _spread([b["seq_per_s"] / a["seq_per_s"] for a, b in zip(runs[num], runs[den])])
            summary[name + "_cpu"] = _spread([a["cpu_seconds"] / a["sequences"] / (b["cpu_seconds"] / b["sequences"])
                                              for a, b in zip(runs[num], runs[den])])

    ratio("ours_time_over_plain", "ours", "plain")
    ratio("ours_before_time_over_plain", "ours_before", "plain")
    ratio("ours_time_over_ours_before", "ours", "ours_before")
    ratio("ours_per_expert_time_over_plain", "ours_per_expert", "plain")
    ratio("ours_padded_time_over_plain", "ours_padded", "plain")
    ratio("ours_grouped_mm_time_over_plain", "ours_grouped_mm", "plain")
    ratio("ours_time_over_ours_per_expert", "ours", "ours_per_expert")
    ratio("brute_batch_time_over_ours", "brute_batch", "ours")
    ratio("brute_seq_time_over_ours", "brute_seq", "ours")
    if "brute_batch" in runs:
        summary["max_rel_diff_vs_brute"] = max(r["max_rel_diff_vs_ours"] for r in runs["brute_batch"])
    return summary


# -- kernels alone -----------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fns: dict, device: torch.device, repeats: int) -> dict:
    """Wall and CPU milliseconds of each function, the repeats interleaved so that load changes hit all."""
    for fn in fns.values():
        fn()
    times: dict = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            _synchronize(device)
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(time.process_time() - cpu_start)
    return {name: {"median_ms": round(1e3 * statistics.median(wall), 2), "min_ms": round(1e3 * min(wall), 2),
                   "max_ms": round(1e3 * max(wall), 2), "cpu_median_ms": round(1e3 * statistics.median(cpu), 2)}
            for name, (wall, cpu) in times.items()}


def _padded_gram(x: torch.Tensor, g: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The uncentred Gram form in ``dtype``: sum (x_s.x_t)(g_s.g_t), the sum accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for xs, gs in zip(x.split(counts), g.split(counts)):
        xs, gs = xs.to(dtype), gs.to(dtype)
        total += ((xs @ xs.T) * (gs @ gs.T)).sum(dtype=torch.float64)
    return total


def _direct(x: torch.Tensor, g: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The gradient itself per group, float32 like autograd's weight gradient; float64 sum of squares."""
    return sum((gs.T @ xs).square().sum(1).double().sum() for xs, gs in zip(x.split(counts), g.split(counts)))


def _reference(x: torch.Tensor, g: torch.Tensor, counts: list[int]) -> float:
    return float(sum((gs.double().T @ xs.double()).square().sum() for xs, gs in zip(x.split(counts), g.split(counts))))


def _routed_count(tokens: int, share: float, generator: torch.Generator) -> int:
    """Tokens of one sequence that one expert receives: binomial, random routing at ``share``."""
    return max(1, int(torch.binomial(torch.tensor(float(tokens)), torch.tensor(share), generator=generator)))


def _activations(kind: str, t: int, d_in: int, d_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation/gradient pairs with the structures that make float32 Gram sums cancel."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    g = randn(t, d_out) * 1e-3
    if kind == "gaussian":
        return randn(t, d_in), g
    if kind == "llm_outliers":  # RMS-normalised hidden states: a few massive channels shared by every token
        x = randn(t, d_in) * torch.logspace(0, -1, d_in).sqrt() + 0.3 * randn(d_in)
        x[:, :4] += torch.tensor([80.0, -60.0, 40.0, 120.0])
        return x / x.square().mean(1, keepdim=True).sqrt(), g + 2e-4 * randn(d_out)
    if kind == "swiglu":  # what the down projection sees
        return torch.nn.functional.silu(randn(t, d_in) + 0.5) * randn(t, d_in), g
    if kind.startswith("offset"):  # a large common offset, gradients summing to zero over the sequence
        return randn(t, d_in) + float(kind[6:]) * randn(d_in), g - g.mean(0)
    if kind == "heavy_tails":  # Student-t with 3 outlier channels 1000x
        x = torch.distributions.StudentT(2.0).sample((t, d_in))
        x[:, :3] *= 1000
        return x, g
    if kind == "lowrank_orthogonal":  # x_t = a_t v, g_t = b_t w with a.b = 0: G^T X cancels (float64 fallback)
        a, b = randn(t), randn(t)
        b = b - (a @ b) / (a @ a) * a
        return a[:, None] * randn(d_in) + 1e-3 * randn(t, d_in), b[:, None] * randn(d_out) + 1e-3 * randn(t, d_out)
    raise ValueError(kind)


KINDS = ("gaussian", "llm_outliers", "swiglu", "offset100", "offset1000", "offset10000", "heavy_tails",
         "lowrank_orthogonal")


def kernels(args) -> dict:
    """Time and accuracy of the per-sequence squared-norm kernels at the model's projection shapes."""
    from unite_hf import importance

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    h, i = args.hidden, args.intermediate
    # (name, d_in, d_out): the shapes and the fused gate_up projection the probe actually sees
    projections = [("up", h, i), ("down", i, h), ("gate_up", h, 2 * i)]
    share = 2 / args.experts  # top-2 routing, tokens spread evenly
    layouts = [("routed", [args.seq_len] * args.batch, share), ("one_sequence", [args.seq_len], 1.0),
               ("half_sequence", [args.seq_len // 2], 1.0)]
    rows = []
    with importance._ieee_float32_matmul():
        for proj, d_in, d_out in projections:
            for layout, tokens, layout_share in layouts:
                counts = [_routed_count(t, layout_share, gen) for t in tokens]
                n = sum(counts)
                x = torch.randn(n, d_in, generator=gen).to(device)
                g = (1e-3 * torch.randn(n, d_out, generator=gen)).to(device)
                seq_ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
                gram_flops = sum(2 * c * c * (d_in + d_out) + c * c for c in counts)
                direct_flops = sum(2 * c * d_in * d_out + d_in * d_out for c in counts)
                row = {"projection": proj, "d_in": d_in, "d_out": d_out, "layout": layout, "tokens_per_group": counts,
                       "gram_gflop": round(gram_flops / 1e9, 6), "direct_gflop": round(direct_flops / 1e9, 6),
                       "chosen": "gram" if all(c * (d_in + d_out) < d_in * d_out for c in counts) else "direct"}
                xb, gb = x.bfloat16(), g.bfloat16()  # what a bf16 model's probe sees
                variants = {
                    "before": lambda: _before_sum_per_sequence_sq_norms(x, g, seq_ids),
                    "direct_bf16_inputs": lambda: importance._direct_sq_norms_low_precision(xb, gb, seq_ids),
                    "after": lambda: importance._sum_per_sequence_sq_norms(x, g, seq_ids),
                    "gram_float64": lambda: _padded_gram(x, g, counts, torch.float64),
                    "gram_float32": lambda: _padded_gram(x, g, counts, torch.float32),
                    "direct_float32": lambda: _direct(x, g, counts),
                }
                row.update(_time(variants, device, args.kernel_repeats))
                row["after_over_before"] = round(row["after"]["median_ms"] / row["before"]["median_ms"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    errors = []
    proj, d_in, d_out = projections[2]
    with importance._ieee_float32_matmul():
        for t in sorted({min(256, args.seq_len), args.seq_len}):
            for kind in KINDS:
                x, g = _activations(kind, t, d_in, d_out, gen)
                counts = [t]
                reference = _reference(x, g, counts)
                x, g = x.to(device), g.to(device)
                seq_ids = torch.zeros(t, dtype=torch.long, device=device)
                stacks: dict[str, int] = {}
                with count_gram_stacks(stacks):
                    after = float(importance._sum_per_sequence_sq_norms(x, g, seq_ids))
                path = "direct" if not stacks else "gram float32 -> float64" if "float64" in stacks else "gram float32"
                row = {"kind": kind, "tokens": t, "d_in": d_in, "d_out": d_out, "after_path": path}
                # the float32 Gram form's own error estimate, relative (the float64 fallback above 5e-6)
                sq_norm, estimate = importance._gram_sq_norms(*importance._augmented_rows(x, g, counts))
                row["float32_estimate"] = float(f"{float(estimate[0] / sq_norm[0].abs()):.2e}")
                row["float32_error"] = float(f"{abs(float(sq_norm[0]) - reference) / reference:.2e}")
                xb, gb = x.bfloat16(), g.bfloat16()  # the bf16 path against the exact value of its own inputs
                reference_bf16 = _reference(xb.cpu().double(), gb.cpu().double(), counts)
                row["direct_bf16_inputs"] = float(
                    f"{abs(float(importance._direct_sq_norms_low_precision(xb, gb, seq_ids)) - reference_bf16) / reference_bf16:.2e}")
                for name, value in (("gram_float64", float(_padded_gram(x, g, counts, torch.float64))),
                                    ("gram_float32", float(_padded_gram(x, g, counts, torch.float32))),
                                    ("after", after), ("direct_float32", float(_direct(x, g, counts)))):
                    row[name] = float(f"{abs(value - reference) / reference:.2e}")
                errors.append(row)
                print(json.dumps(row), flush=True)
    return {"kernels": rows, "relative_errors": errors}


def grouped_kernels(args) -> dict:
    """One call's worth of all experts' (expert, sequence) groups in bf16, as the grouped probe sees them:
    time of the grouped GEMM, the zero-padded float32-output batch and the per-expert calls it replaced,
    and each one's error against float64 on the same bf16 values (and, for the grouped GEMM, against
    the bf16 rounding of each exact gradient: what autograd's own bf16 weight gradient holds)."""
    from unite_hf import importance, triton_sq_norms

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    h, i, experts, batch = args.hidden, args.intermediate, args.experts, args.batch
    rows = []
    for proj, d_in, d_out in [("gate_up", h, 2 * i), ("down", i, h)]:
        counts = [_routed_count(args.seq_len, 2 / experts, gen) for _ in range(experts * batch)]
        n = sum(counts)
        group = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
        x = torch.randn(n, d_in, generator=gen).to(device, torch.bfloat16)
        g = (1e-3 * torch.randn(n, d_out, generator=gen)).to(device, torch.bfloat16)
        seq = group % batch
        expert_rows = [(e * batch, (e + 1) * batch) for e in range(experts)]
        bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]

        def per_expert():
            return sum(importance._direct_sq_norms_low_precision(x[bounds[a]:bounds[b]], g[bounds[a]:bounds[b]],
                                                                  seq[bounds[a]:bounds[b]]) for a, b in expert_rows)

        variants = {
            "grouped_mm": lambda: importance._grouped_direct_sq_norms(x, g, group, len(counts)).sum(),
            "padded_bmm": lambda: importance._padded_direct_group_sq_norms(
                x, g, torch.unique_consecutive(group, return_counts=True)[1].tolist()).sum(),
            "per_expert_padded": per_expert,
        }
        if triton_sq_norms.available(x):
            variants["triton"] = lambda: importance._grouped_direct_sq_norms(x, g, group, len(counts), kernel="triton").sum()
        row = {"projection": proj, "d_in": d_in, "d_out": d_out, "groups": len(counts), "rows": n}
        row.update(_time(variants, device, args.kernel_repeats))
        exact = rounded = 0.0
        for a, b in zip(bounds, bounds[1:]):
            grad = g[a:b].double().T @ x[a:b].double()
            exact += float(grad.square().sum())
            rounded += float(grad.bfloat16().double().square().sum())
        for name, fn in variants.items():
            row[name]["rel_error_vs_exact"] = float(f"{abs(float(fn()) - exact) / exact:.2e}")
        row["grouped_mm"]["rel_error_vs_bf16_gradients"] = float(f"{abs(float(variants['grouped_mm']()) - rounded) / rounded:.2e}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"grouped_kernels": rows}


# -- command line ------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default=None, choices=METHODS, help="run one method in this process")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--shape", default="default", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--batches", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every method, interleaved")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: 1 on cuda, 0 on cpu)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every method in this process (faster start; peak memory then not per method)")
    parser.add_argument("--kernels", action="store_true", help="time and check the squared-norm kernels alone")
    parser.add_argument("--kernel-repeats", type=int, default=5)
    parser.add_argument("--grouped-kernels", action="store_true",
                        help="time and check the grouped probe's kernels on one call's groups (bf16)")
    args = parser.parse_args(argv)
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.method:
        result = run_method(args)
    elif args.kernels:
        result = kernels(args)
    elif args.grouped_kernels:
        result = grouped_kernels(args)
    else:
        passthrough = [a for a in argv if a not in args.methods and a != "--methods"]
        result = compare(args, passthrough)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
