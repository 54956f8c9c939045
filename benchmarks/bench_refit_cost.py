"""What a ridge refit costs per layer, measured side by side with the layer's own work, and projected.

For one layer of shape (hidden d, fused width w), dense-first (full ranks, as a budget allocates), on
random weights: the time of the refit's statistics update (the rebuilt gate/up on the tokens, then
``Z^T Z`` and ``T^T Z`` in float64) against a forward and backward pass of the same fused FFN on the
same tokens (what a Fisher pass spends on that layer at least), and the time of the closed-form solve.
Prints one line per shape, the ratio measured in the same run (these machines are noisy), and the memory
of the statistics; then projects the Mixtral-8x7B shape (d 4096, 8 x 14336 experts) at 25% and 50%.

    python benchmarks/bench_refit_cost.py                      # the shapes below, 4096 tokens
    python benchmarks/bench_refit_cost.py --shapes 576x768 4096x14336 --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _layer(hidden: int, width: int, generator: torch.Generator):
    from unite_hf.decomposition import Decomposition
    from unite_hf.refit.base import LayerFFN

    def dec(d_out: int, d_in: int) -> Decomposition:
        energy = {m: torch.ones(1) for m in ("layer", "out", "in")}
        core = torch.randn(1, d_out, d_in, generator=generator) / d_in ** 0.5
        return Decomposition("tucker_hidden", core, torch.ones(1, 1), torch.eye(d_out), torch.eye(d_in), energy, 0.0,
                             (1, d_out, d_in))

    return LayerFFN({"gate": dec(width, hidden), "up": dec(width, hidden), "down": dec(hidden, width)}, {}, 0, F.silu)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(hidden: int, width: int, tokens: int, repeats: int) -> dict:
    from unite_hf.refit.ridge import RidgeStatistics

    generator = torch.Generator().manual_seed(0)
    layer = _layer(hidden, width, generator)
    x = torch.randn(tokens, hidden, generator=generator)
    t = torch.randn(tokens, hidden, generator=generator)
    stats = RidgeStatistics(layer)
    update = _best(lambda: stats.update(x, t), repeats)
    weights = {p: layer.cores[p].clone().requires_grad_(True) for p in layer.cores}

    def forward_backward() -> None:
        y = F.linear(F.silu(F.linear(x, weights["gate"])) * F.linear(x, weights["up"]), weights["down"])
        y.square().sum().backward()

    plain = _best(forward_backward, repeats)
    solve = _best(lambda: stats.solve(1e-4), max(1, repeats // 2))
    return {"hidden": hidden, "width": width, "tokens": tokens, "update_s": update, "fwd_bwd_s": plain,
            "update_over_fwd_bwd": update / plain, "solve_s": solve,
            "statistics_gb": 8 * (width * width + hidden * width) / 1024 ** 3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["256x512", "576x768", "576x3072", "2048x6144"],
                        help="hidden x fused width")
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens per timed batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes:
        hidden, width = (int(v) for v in shape.split("x"))
        row = measure(hidden, width, args.tokens, args.repeats)
        rows.append(row)
        print(f"d {hidden} w {width}: statistics update {row['update_s']:.3f} s = {row['update_over_fwd_bwd']:.2f}x "
              f"a forward+backward of the fused FFN on {args.tokens} tokens ({row['fwd_bwd_s']:.3f} s); solve "
              f"{row['solve_s']:.2f} s; statistics {row['statistics_gb']:.3f} GB", flush=True)
    for fraction in (0.25, 0.5):
        width = int(fraction * 8 * 14336)
        gb = 8 * (width * width + 4096 * width) / 1024 ** 3
        print(f"projection, Mixtral-8x7B at {fraction:.0%}: width {width}, statistics {gb:.1f} GB per layer in float64 "
              f"({gb / 2:.1f} GB in float32); a solve is two eigendecompositions of {width} x {width}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"command": "python benchmarks/bench_refit_cost.py " + " ".join(argv or []), "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
