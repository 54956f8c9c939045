"""Tucker benchmarks (issue 5, target 3).

deepseek: X of shape (27, 1408, 2048) (DeepSeek-MoE-16B: 27 MoE layers of 1408 x 2048 fused experts),
    rank (27, 512, 512). Ours (`decompose(..., "tucker")`) and `tensorly.decomposition.tucker`, same
    HOSVD init ("svd"), same iteration budget, tol=0 so both run every sweep; times and errors side by side.
mixtral: 3 projections x 32 layers of 14336 x 4096 (Mixtral-8x7B), rank (32, 512, 512), layers generated
    on the fly from fixed seeds and fed to `decompose_streaming` (X is never materialised: 7.5 GB per
    projection in float32). Reports total time, time spent generating layers, and peak RSS.

Synthetic layers: X_l = (U * decay) @ S_l @ V^T (+ noise for deepseek), U, V, S_l Gaussian from fixed
seeds, decay log-spaced over 2 decades, so a rank-512 truncation discards a real but small part.

    .venv/bin/python benchmarks/bench_tucker.py deepseek --iters 3
    .venv/bin/python benchmarks/bench_tucker.py mixtral --sweeps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unite_hf.decomposition import decompose, decompose_streaming


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def deepseek(args) -> dict:
    import tensorly as tl
    from tensorly.decomposition import tucker

    g = torch.Generator().manual_seed(0)
    L, O, I, k = 27, 1408, 2048, 768
    U, V = torch.randn(O, k, generator=g), torch.randn(I, k, generator=g)
    decay = torch.logspace(0, -2, k)
    x = torch.stack([(U * decay) @ torch.randn(k, k, generator=g) @ V.T / k + 0.05 * torch.randn(O, I, generator=g)
                     for _ in range(L)])
    ranks = (L, 512, 512)
    t0 = time.perf_counter()
    ours = decompose(x, "tucker", ranks, n_iter_max=args.iters, tol=0.0)
    t_ours = time.perf_counter() - t0
    with tl.backend_context("pytorch"):
        t0 = time.perf_counter()
        core, factors = tucker(x, rank=list(ranks), n_iter_max=args.iters, init="svd", tol=0.0)
        t_tl = time.perf_counter() - t0
        err_tl = float(torch.linalg.vector_norm(x - tl.tucker_to_tensor((core, factors))) / torch.linalg.vector_norm(x))
    return {"case": "deepseek", "shape": [L, O, I], "ranks": ranks, "iters": args.iters,
            "ours_s": round(t_ours, 2), "tensorly_s": round(t_tl, 2), "speedup": round(t_tl / t_ours, 2),
            "ours_rel_err": ours.relative_error, "tensorly_rel_err": err_tl,
            "err_ratio": ours.relative_error / err_tl}


def mixtral(args) -> dict:
    L, O, I, k = 32, 14336, 4096, 640
    results = []
    t_start = time.perf_counter()
    for proj in range(args.projections):
        g = torch.Generator().manual_seed(1000 + proj)
        U = torch.randn(O, k, generator=g) * torch.logspace(0, -2, k)
        V = torch.randn(I, k, generator=g)
        gen_time = [0.0]

        def layer_fn(layer: int, proj=proj, U=U, V=V, gen_time=gen_time) -> torch.Tensor:
            t0 = time.perf_counter()
            s = torch.randn(k, k, generator=torch.Generator().manual_seed(10_000 * proj + layer)) / k
            out = (U @ s) @ V.T
            gen_time[0] += time.perf_counter() - t0
            return out

        t0 = time.perf_counter()
        dec = decompose_streaming(layer_fn, L, (O, I), "tucker", (L, 512, 512), n_iter_max=args.sweeps, tol=0.0,
                                  init=args.init, solver="auto", show_progress=args.progress, name=f"proj{proj}")
        results.append({"projection": proj, "seconds": round(time.perf_counter() - t0, 1),
                        "layer_generation_s": round(gen_time[0], 1), "rel_err": dec.relative_error})
        print(json.dumps(results[-1]), flush=True)
    return {"case": "mixtral", "shape": [L, O, I], "ranks": [L, 512, 512], "sweeps": args.sweeps,
            "init": args.init, "projections": results, "total_s": round(time.perf_counter() - t_start, 1),
            "total_generation_s": round(sum(r["layer_generation_s"] for r in results), 1),
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["deepseek", "mixtral"])
    parser.add_argument("--iters", type=int, default=3, help="deepseek: HOOI iterations for both")
    parser.add_argument("--sweeps", type=int, default=2, help="mixtral: HOOI sweeps")
    parser.add_argument("--init", default="auto", help="mixtral: auto (random sketch at this size) or hosvd")
    parser.add_argument("--projections", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = deepseek(args) if args.case == "deepseek" else mixtral(args)
    result["threads"] = args.threads
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # CPU time: wall x threads when uncontended
    print(json.dumps(result))


if __name__ == "__main__":
    main()
