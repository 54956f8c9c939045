"""Tucker benchmarks (issue 5, target 3; issue 15: on a GPU too).

deepseek: X of shape (27, 1408, 2048) (DeepSeek-MoE-16B: 27 MoE layers of 1408 x 2048 fused experts),
    rank (27, 512, 512). Ours (`decompose(..., "tucker")`) and `tensorly.decomposition.tucker`, same
    HOSVD init ("svd"), same iteration budget, tol=0 so both run every sweep; times and errors side by side.
mixtral: 3 projections x 32 layers of 14336 x 4096 (Mixtral-8x7B), rank (32, 512, 512), layers generated
    on the fly from fixed seeds and fed to `decompose_streaming` (X is never materialised: 7.5 GB per
    projection in float32). Reports total time, time spent generating layers, and peak RSS. tensorly
    (which needs X whole) runs on the first projection on cuda, or with ``--tensorly yes``.
small: (4, 96, 128), rank (4, 32, 32): the deepseek comparison in a second (the smoke test).

Synthetic layers: X_l = (U * decay) @ S_l @ V^T (+ noise for deepseek and small), U, V, S_l Gaussian
from fixed seeds (drawn on the CPU, so every device sees the same X), decay log-spaced over 2 decades,
so a rank-512 truncation discards a real but small part. tensorly's failures (e.g. cuSOLVER on the
14336 x 131072 unfolding) are caught and printed.

    .venv/bin/python benchmarks/bench_tucker.py deepseek --iters 3
    .venv/bin/python benchmarks/bench_tucker.py mixtral --sweeps 2
    .venv/bin/python benchmarks/bench_tucker.py --device cuda --shape deepseek
    .venv/bin/python benchmarks/bench_tucker.py --device cuda --shape mixtral --projections 1
    .venv/bin/python benchmarks/bench_tucker.py --device cpu --shape small
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unite_hf.decomposition import decompose, decompose_streaming

CASES = ("small", "deepseek", "mixtral")
# case -> (layers, out, in, k of the synthetic spectrum, rank of the out and in modes)
DENSE = {"small": (4, 96, 128, 48, 32), "deepseek": (27, 1408, 2048, 768, 512)}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def tensorly_tucker(x: torch.Tensor, ranks: tuple[int, int, int], iters: int, device: torch.device) -> dict:
    """tensorly's HOOI (pytorch backend, on ``x``'s device): seconds and relative error, or its failure."""
    try:
        import tensorly as tl
        from tensorly.decomposition import tucker

        with tl.backend_context("pytorch"):
            (core, factors), seconds = timed(
                lambda: tucker(x, rank=list(ranks), n_iter_max=iters, init="svd", tol=0.0), device)
            err = float(torch.linalg.vector_norm(x - tl.tucker_to_tensor((core, factors))) / torch.linalg.vector_norm(x))
        return {"tensorly_s": round(seconds, 2), "tensorly_rel_err": err}
    except Exception as exc:  # noqa: BLE001 - a failure is a result here (cuSOLVER on big unfoldings)
        return {"tensorly_error": describe(exc)}


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def compare(result: dict, ours_s: float, ours_err: float, theirs: dict) -> dict:
    result.update({"ours_s": round(ours_s, 2), "ours_rel_err": ours_err, **theirs})
    if "tensorly_s" in theirs:
        result["speedup"] = round(theirs["tensorly_s"] / ours_s, 2)
        result["err_ratio"] = ours_err / theirs["tensorly_rel_err"]
    return result


def dense(args, device: torch.device) -> dict:
    L, O, I, k, r = DENSE[args.case]
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(O, k, generator=g), torch.randn(I, k, generator=g)
    decay = torch.logspace(0, -2, k)
    x = torch.stack([(U * decay) @ torch.randn(k, k, generator=g) @ V.T / k + 0.05 * torch.randn(O, I, generator=g)
                     for _ in range(L)]).to(device)
    ranks = (L, r, r)
    ours, t_ours = timed(lambda: decompose(x, "tucker", ranks, n_iter_max=args.iters, tol=0.0), device)
    theirs = tensorly_tucker(x, ranks, args.iters, device) if args.tensorly != "no" else {"tensorly": "skipped"}
    return compare({"case": args.case, "shape": [L, O, I], "ranks": ranks, "iters": args.iters},
                   t_ours, ours.relative_error, theirs)


def mixtral(args, device: torch.device) -> dict:
    L, O, I, k = 32, 14336, 4096, 640
    results = []
    t_start = time.perf_counter()
    for proj in range(args.projections):
        g = torch.Generator().manual_seed(1000 + proj)
        U = (torch.randn(O, k, generator=g) * torch.logspace(0, -2, k)).to(device)
        V = torch.randn(I, k, generator=g).to(device)
        gen_time = [0.0]

        def layer_fn(layer: int, proj=proj, U=U, V=V, gen_time=gen_time) -> torch.Tensor:
            t0 = time.perf_counter()
            s = (torch.randn(k, k, generator=torch.Generator().manual_seed(10_000 * proj + layer)) / k).to(device)
            out = (U @ s) @ V.T
            if device.type == "cuda":
                torch.cuda.synchronize()
            gen_time[0] += time.perf_counter() - t0
            return out

        dec, seconds = timed(lambda: decompose_streaming(
            layer_fn, L, (O, I), "tucker", (L, 512, 512), n_iter_max=args.sweeps, tol=0.0, init=args.init,
            solver="auto", device=device, show_progress=args.progress, name=f"proj{proj}"), device)
        row = {"projection": proj, "seconds": round(seconds, 2), "layer_generation_s": round(gen_time[0], 2),
               "rel_err": dec.relative_error}
        if proj == 0 and (args.tensorly == "yes" or (args.tensorly == "auto" and device.type == "cuda")):
            try:
                x = torch.stack([layer_fn(layer) for layer in range(L)])
            except Exception as exc:  # noqa: BLE001 - X whole may not fit: say so, as tensorly's failure
                row["tensorly_error"] = f"materialising X: {describe(exc)}"
            else:
                compare(row, seconds, dec.relative_error, tensorly_tucker(x, (L, 512, 512), args.sweeps, device))
                del x
        results.append(row)
        print(json.dumps(row), flush=True)
    return {"case": "mixtral", "shape": [L, O, I], "ranks": [L, 512, 512], "sweeps": args.sweeps,
            "init": args.init, "projections": results, "total_s": round(time.perf_counter() - t_start, 1),
            "total_generation_s": round(sum(r["layer_generation_s"] for r in results), 1),
            "peak_rss_gb": round(peak_rss_gb(), 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", nargs="?", choices=CASES, help="the shape (same as --shape)")
    parser.add_argument("--shape", choices=CASES)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=3, help="deepseek, small: HOOI iterations for both")
    parser.add_argument("--sweeps", type=int, default=2, help="mixtral: HOOI sweeps")
    parser.add_argument("--init", default="auto", help="mixtral: auto (random sketch at this size) or hosvd")
    parser.add_argument("--projections", type=int, default=3)
    parser.add_argument("--tensorly", default="auto", choices=["auto", "yes", "no"],
                        help="auto: always for deepseek and small, for mixtral on cuda only (X whole is 7.5 GB)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.case and args.shape and args.case != args.shape:
        parser.error(f"case {args.case!r} and --shape {args.shape!r} disagree")
    args.case = args.shape or args.case
    if args.case is None:
        parser.error("give the shape: small, deepseek or mixtral")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = mixtral(args, device) if args.case == "mixtral" else dense(args, device)
    result.update({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "threads": args.threads})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["process_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # CPU time: wall x threads when uncontended
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
