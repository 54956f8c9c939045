"""Retention of genes: source x fusion x decomposition x rank, on held-out text.

For each representative source (moefied SmolLM2, upcycled SmolLM2, a native MoE trained from scratch)
one Fisher pass on WikiText-2 is shared by every variant; each (fusion, decomposition) gene is
extracted once at the largest rank and measured with :func:`unite_hf.evaluation.measure_retention`
at every rank (targets truncate the gene's bases). Writes a JSON file and a markdown table with the
command that reproduces it.

    python benchmarks/bench_retention.py                       # all three sources, default grid
    python benchmarks/bench_retention.py --sources upcycled --ranks 32 64
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tools/ package

VARIANTS = {  # name -> (fusion, decomposition, extra extraction options)
    "paper": ("fisher", "tucker", {}),
    "hidden": ("fisher", "tucker_hidden", {}),
    "aligned+hidden": ("fisher_aligned", "tucker_hidden", {}),
    "concat+hidden": ("concat", "tucker_hidden", {}),
    "concat+hidden+aa": ("concat", "tucker_hidden", {"activation_aware": True}),
}


def load_source(name: str, tiny: bool):
    """(model, tokenizer, description) of a representative source."""
    if name == "moefied":
        from tools.demo import _real_source, _tiny_source  # the demo's SmolLM2 -> 8-expert top-6 MoE

        if tiny:
            model, tokenizer, label = _tiny_source(_data_dir())
            return model, tokenizer, label
        return _real_source(_data_dir())
    from tools.sources import build_native, build_upcycled, load_source as load_built

    model = (build_upcycled if name == "upcycled" else build_native)()
    report = getattr(model, "source_report", None)
    model, tokenizer, report = load_built(report.path)
    return model, tokenizer, f"{name} ({report.path})"


def _data_dir():
    from unite_hf.calibration import find_local_data_dir

    return find_local_data_dir()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def run(args: argparse.Namespace) -> dict:
    from unite_hf import compute_expert_importance, extract_universal_knowledge, get_source
    from unite_hf.calibration import load_calibration
    from unite_hf.evaluation import measure_retention

    results = {"command": "python benchmarks/bench_retention.py " + " ".join(sys.argv[1:]), "runs": []}
    run_started = time.perf_counter()
    for source_name in args.sources:
        started = time.perf_counter()
        model, tokenizer, label = load_source(source_name, args.tiny)
        model = model.float().eval()
        moe = get_source(model)
        intermediate = moe.blocks[0].expert(0).down.shape[1]
        ranks = sorted(args.ranks)
        calib = load_calibration("wikitext2", tokenizer, num_sequences=args.fisher_sequences, seq_len=args.seq_len, seed=0,
                                 show_progress=False)
        importance = compute_expert_importance(model, calib, batch_size=4, seed=0, show_progress=False)
        print(f"[{source_name}] {label}: loaded and calibrated in {time.perf_counter() - started:.0f} s", flush=True)
        baseline: dict = {}  # the source's own passes (log-probs, no-experts KLs), shared by every cell
        for variant in args.variants:
            fusion, decomposition, options = VARIANTS[variant]
            if fusion == "concat":
                options = {**options, "fused_width": int(args.concat_width * intermediate * moe.num_experts)}
            if options.get("activation_aware"):  # the input-moment pass reads the same calibration windows
                options = {**options, "num_sequences": args.fisher_sequences, "seq_len": args.seq_len}
            top = max(ranks)
            extract_started = time.perf_counter()
            try:
                gene = extract_universal_knowledge(model, tokenizer, importance=importance, fusion=fusion,
                                                   decomposition=decomposition, rank=top, show_progress=False, **options)
            except (TypeError, ValueError) as err:
                print(f"[{source_name}] {variant}: not run ({err})", flush=True)
                results["runs"].append({"source": source_name, "variant": variant, "error": str(err)})
                continue
            extract_seconds = time.perf_counter() - extract_started
            fused_ppl = None
            for rank in ranks:
                retention_started = time.perf_counter()
                report = measure_retention(gene, model, tokenizer=tokenizer, num_windows=args.num_windows,
                                           seq_len=args.retention_seq_len, rank=rank, show_progress=False,
                                           measure_fused=fused_ppl is None, baseline=baseline)
                fused_ppl = report.perplexity["fused"] = report.perplexity["fused"] or fused_ppl  # rank-independent
                row = {**report.to_dict(), "source": source_name, "source_label": label, "variant": variant,
                       "fusion": fusion, "decomposition": decomposition, "rank": rank,
                       "extract_seconds": round(extract_seconds, 1),
                       "retention_seconds": round(time.perf_counter() - retention_started, 1),
                       "peak_rss_gb": round(peak_rss_gb(), 2)}
                results["runs"].append(row)
                print(f"[{source_name}] {variant} rank {rank}: swap gap {report.mean_swap_gap:.3f}, "
                      f"ffn fraction {report.ffn_parameter_fraction:.2f}, ppl {report.perplexity}", flush=True)
                results["minutes"] = round((time.perf_counter() - run_started) / 60, 1)
                Path(args.json[0]).write_text(json.dumps(results, indent=1, sort_keys=True))
        del model
    return results


def render(results: dict) -> str:
    lines = [
        "| source | variant (fusion + decomposition) | rank | FFN params / source | mean swap gap ± SE | "
        "per-layer rel. error (mean) | ppl source / fused / target | extract s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"| {row['source']} | {row['variant']} | - | - | not run: {row['error']} | | | | |")
            continue
        gaps = [layer["swap_gap"] for layer in row["layers"]]
        se = (sum(layer["swap_gap_se"] ** 2 for layer in row["layers"]) ** 0.5) / len(gaps)
        errors = list(row["relative_error"].values())
        ppl = row["perplexity"]
        fused = f"{ppl['fused']:.1f}" if ppl["fused"] is not None else "n/a"
        lines.append(
            f"| {row['source']} | {row['variant']} ({row['fusion']} + {row['decomposition']}) | {row['rank']} | "
            f"{row['ffn_parameter_fraction']:.2f} | {row['mean_swap_gap']:.3f} ± {se:.3f} | "
            f"{sum(errors) / len(errors):.3f} | {ppl['source']:.1f} / {fused} / {ppl['target']:.1f} | "
            f"{row['extract_seconds']} | {row['peak_rss_gb']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["moefied", "upcycled", "native"],
                        choices=["moefied", "upcycled", "native"], help="representative sources")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="gene variants")
    parser.add_argument("--ranks", nargs="+", type=int, default=[64, 128],
                        help="target ranks (the gene is extracted once at the largest)")
    parser.add_argument("--concat-width", type=float, default=0.5,
                        help="concat fusion keeps this fraction of all E x I neurons")
    parser.add_argument("--fisher-sequences", type=int, default=16, help="calibration sequences (WikiText-2)")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration sequence length")
    parser.add_argument("--num-windows", type=int, default=8, help="held-out windows (SimpleBooks, last 20%%)")
    parser.add_argument("--retention-seq-len", type=int, default=128, help="tokens per held-out window")
    parser.add_argument("--json", nargs="+", default=["benchmarks/retention.json"],
                        help="where the results go (with --report-only: several files are merged)")
    parser.add_argument("--tiny", action="store_true", help="tiny random sources (plumbing only)")
    parser.add_argument("--report-only", action="store_true", help="print the table from --json, run nothing")
    parser.add_argument("--markdown", help="also write the table into this file (RETENTION.md), in place of the "
                                           "one under its '## Retention table' heading")
    args = parser.parse_args(argv)
    if args.report_only:
        results = {"runs": [run for path in args.json for run in json.loads(Path(path).read_text())["runs"]]}
    else:
        results = run(args)
    table = render(results)
    print(table)
    if args.markdown:
        replace_table(Path(args.markdown), table)
    return 0


def replace_table(path: Path, table: str) -> None:
    """Put ``table`` under the file's ``## Retention table`` heading, in place of the table there (the
    prose around it, written from the numbers, stays: read it against the new table)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith("## Retention table")), None)
    if at is None:
        raise ValueError(f"{path} has no '## Retention table' heading to put the table under")
    start = next(i for i in range(at + 1, len(lines)) if lines[i].startswith("|") or lines[i].startswith("## "))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table.split("\n")
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
