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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # retention_controls

VARIANTS = {  # name -> (fusion, decomposition, extra extraction options)
    "paper": ("fisher", "tucker", {}),
    "hidden": ("fisher", "tucker_hidden", {}),
    "aligned+hidden": ("fisher_aligned", "tucker_hidden", {}),
    "concat+hidden": ("concat", "tucker_hidden", {}),
    "concat+hidden+aa": ("concat", "tucker_hidden", {"activation_aware": True}),
}

BUDGET_VARIANTS = {  # name -> (fusion, decomposition, extraction options); each extracted at every --budgets value
    "paper@budget": ("fisher", "tucker", {}),
    "hidden+ridge": ("fisher", "tucker_hidden", {"refit": "ridge"}),
    "concat": ("concat", "tucker_hidden", {}),
    "concat+ridge": ("concat", "tucker_hidden", {"refit": "ridge"}),
    "concat+ridge+seq": ("concat", "tucker_hidden", {"refit": "ridge", "refit_sequential": True}),
    "concat+distill": ("concat", "tucker_hidden", {"refit": "distill"}),
    "control:random+ridge": ("random_neurons", "tucker_hidden", {"refit": "ridge"}),
}
"""The refit grid: the controls beside the variants at the same budget. ``control:linear`` (a
least-squares map ``y = A x``, not a gene) is measured once per source with --budget-variants naming it."""
CONTROL = "control:random+ridge"


def load_source(name: str, tiny: bool, path: str | None = None):
    """(model, tokenizer, description) of a representative source; ``path``: a folder that
    ``python -m tools.sources`` built (for native and upcycled sources), loaded as it is."""
    if path is not None and name != "moefied":
        from tools.sources import load_source as load_built

        model, tokenizer, report = load_built(path)
        return model, tokenizer, f"{name} ({report.path})"
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


def run_budgets(args: argparse.Namespace) -> dict:
    """The budget grid: every variant of --budget-variants at every --budgets value, on each source, beside
    the random-neuron control and the linear control; refits calibrate on --refit-sequences windows."""
    import retention_controls  # registers the random_neurons fusion
    from unite_hf import compute_expert_importance, extract_universal_knowledge
    from unite_hf.calibration import load_calibration
    from unite_hf.evaluation import measure_retention, measure_routed_replacement

    results = {"command": "python benchmarks/bench_retention.py " + " ".join(sys.argv[1:]), "runs": []}
    run_started = time.perf_counter()

    def save() -> None:
        results["minutes"] = round((time.perf_counter() - run_started) / 60, 1)
        Path(args.json[0]).write_text(json.dumps(results, indent=1, sort_keys=True))

    for source_name in args.sources:
        started = time.perf_counter()
        model, tokenizer, label = load_source(source_name, args.tiny, (args.source_path or {}).get(source_name))
        model = model.float().eval()
        calib = load_calibration("wikitext2", tokenizer, num_sequences=args.fisher_sequences, seq_len=args.seq_len,
                                 seed=0, show_progress=False)
        fisher_started = time.perf_counter()
        importance = compute_expert_importance(model, calib, batch_size=4, seed=0, show_progress=False)
        fisher_seconds = time.perf_counter() - fisher_started
        refit_calib = dict(num_sequences=args.refit_sequences, seq_len=args.seq_len)
        print(f"[{source_name}] {label}: loaded in {fisher_started - started:.0f} s, Fisher {fisher_seconds:.0f} s",
              flush=True)
        baseline: dict = {}
        retention = dict(tokenizer=tokenizer, num_windows=args.num_windows, seq_len=args.retention_seq_len,
                         baseline=baseline)
        if "control:linear" in args.budget_variants:
            ids = load_calibration("wikitext2", tokenizer, seed=0, show_progress=False, **refit_calib).input_ids
            fit_started = time.perf_counter()
            maps = retention_controls.linear_control(model, ids, batch_size=4)
            fit_seconds = time.perf_counter() - fit_started
            measured = measure_routed_replacement(model, maps, **retention)
            hidden = get_hidden(model)
            results["runs"].append({
                "source": source_name, "source_label": label, "variant": "control:linear", "budget": None,
                "ffn_parameter_fraction": hidden * hidden / routed_per_layer(model), "mean_swap_gap": measured["mean_swap_gap"],
                "layers": [vars(layer) for layer in measured["layers"]],
                "perplexity": {"source": measured["perplexity"]["source"], "target": measured["perplexity"]["replaced"]},
                "extract_seconds": round(fit_seconds, 1), "fisher_seconds": round(fisher_seconds, 1)})
            print(f"[{source_name}] control:linear: swap gap {measured['mean_swap_gap']:.3f}, "
                  f"ppl {measured['perplexity']}", flush=True)
            save()
        for budget in args.budgets:
            for variant in (v for v in args.budget_variants if v != "control:linear"):
                fusion, decomposition, options = BUDGET_VARIANTS[variant]
                if options.get("refit") == "distill":
                    options = {**options, "refit_steps": args.distill_steps}
                extract_started = time.perf_counter()
                try:
                    gene = extract_universal_knowledge(model, tokenizer, importance=importance, fusion=fusion,
                                                       decomposition=decomposition, budget=budget, show_progress=False,
                                                       **refit_calib, **options)
                except (TypeError, ValueError) as err:
                    print(f"[{source_name}] {variant} @ {budget}: not run ({err})", flush=True)
                    results["runs"].append({"source": source_name, "variant": variant, "budget": budget, "error": str(err)})
                    continue
                extract_seconds = time.perf_counter() - extract_started
                report = measure_retention(gene, model, show_progress=False, measure_fused=False, **retention)
                refit_errors = gene.config.method_config.get("refit_calibration_error", {})
                results["runs"].append({
                    **report.to_dict(), "source": source_name, "source_label": label, "variant": variant,
                    "budget": budget, "allocation": gene.config.method_config.get("allocation"),
                    "refit_calibration_error": refit_errors, "extract_seconds": round(extract_seconds, 1),
                    "fisher_seconds": round(fisher_seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 2)})
                print(f"[{source_name}] {variant} @ {budget}: swap gap {report.mean_swap_gap:.3f}, "
                      f"ffn fraction {report.ffn_parameter_fraction:.3f}, ppl {report.perplexity['target']:.1f} "
                      f"(source {report.perplexity['source']:.1f}), extract {extract_seconds:.0f} s", flush=True)
                save()
        if args.cost:
            results["runs"].append({"source": source_name, "variant": "cost", "budget": args.budgets[0],
                                    **refit_cost(model, tokenizer, importance, args.budgets[0], refit_calib)})
            print(f"[{source_name}] cost: {results['runs'][-1]}", flush=True)
            save()
        del model
    return results


def refit_cost(model, tokenizer, importance, budget: float, calibration: dict) -> dict:
    """The ridge refit's wall time against a Fisher pass over the same calibration windows, side by side
    (the refit of a concat + tucker_hidden gene at ``budget``, timed alone)."""
    from unite_hf import compute_expert_importance, extract_universal_knowledge, get_source
    from unite_hf.calibration import load_calibration
    from unite_hf.methods.unite import UniteExtractionConfig
    from unite_hf.refit import RefitOptions, refit_decompositions

    calib = load_calibration("wikitext2", tokenizer, seed=0, show_progress=False, **calibration)
    gene = extract_universal_knowledge(model, tokenizer, importance=importance, fusion="concat",
                                       decomposition="tucker_hidden", budget=budget, show_progress=False)
    options = RefitOptions.from_config(UniteExtractionConfig(refit="ridge"))  # the extraction's defaults
    started = time.perf_counter()
    refit_decompositions(model, get_source(model), gene.decompositions, gene.fused_biases, calib.input_ids, "ridge",
                         options, batch_size=4, show_progress=False)
    refit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    compute_expert_importance(model, calib, batch_size=4, seed=0, show_progress=False)
    fisher_seconds = time.perf_counter() - started
    return {"refit_seconds": round(refit_seconds, 1), "fisher_seconds_same_windows": round(fisher_seconds, 1),
            "refit_over_fisher": round(refit_seconds / fisher_seconds, 3), "windows": calib.num_sequences}


def get_hidden(model) -> int:
    from unite_hf import get_source

    return get_source(model).blocks[0].expert(0).down.shape[0]


def routed_per_layer(model) -> int:
    """Routed expert parameters of one MoE layer."""
    from unite_hf import get_source

    block = get_source(model).blocks[0]
    return sum(p.numel() for p in block.expert_parameters())


def _gap_se(row: dict) -> float:
    """Standard error of the mean swap gap over the measured layers (per-layer SEs, independent)."""
    return (sum(layer["swap_gap_se"] ** 2 for layer in row["layers"]) ** 0.5) / len(row["layers"])


def render_budgets(results: dict) -> str:
    """The budget grid, each variant beside the random-neuron control of its source and budget: the margin
    (variant - control) and its standard error (the two SEs combined as independent, which overstates it:
    both share the zeroed-layer KLs)."""
    costs = [row for row in results["runs"] if row.get("variant") == "cost"]
    results = {**results, "runs": [row for row in results["runs"] if row.get("variant") != "cost"]}
    runs = [row for row in results["runs"] if "error" not in row]
    control = {(row["source"], row["budget"]): row for row in runs if row["variant"] == CONTROL}
    lines = ["| source | variant | budget | FFN params / routed | mean swap gap ± SE | margin over random ± SE | "
             "full-depth ppl (source) | extract s (Fisher s) |", "|---|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"| {row['source']} | {row['variant']} | {row['budget']} | - | not run: {row['error']} | | | |")
            continue
        ref = control.get((row["source"], row["budget"]))
        margin = "-"
        if ref is not None and row is not ref:
            margin = f"{row['mean_swap_gap'] - ref['mean_swap_gap']:+.3f} ± {(_gap_se(row) ** 2 + _gap_se(ref) ** 2) ** 0.5:.3f}"
        ppl = row["perplexity"]
        budget = "-" if row["budget"] is None else f"{row['budget']:.2f}"
        lines.append(f"| {row['source']} | {row['variant']} | {budget} | {row['ffn_parameter_fraction']:.3f} | "
                     f"{row['mean_swap_gap']:.3f} ± {_gap_se(row):.3f} | {margin} | {ppl['target']:.1f} "
                     f"({ppl['source']:.1f}) | {row['extract_seconds']} ({row.get('fisher_seconds', '-')}) |")
    for row in costs:
        lines.append(f"\n{row['source']}, cost at budget {row['budget']}: the ridge refit {row['refit_seconds']} s, a Fisher "
                     f"pass over the same {row['windows']} windows {row['fisher_seconds_same_windows']} s "
                     f"(ratio {row['refit_over_fisher']}).")
    return "\n".join(lines)


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
    parser.add_argument("--budgets", nargs="+", type=float,
                        help="run the refit grid instead: every --budget-variants entry at each budget (a fraction of "
                             "the routed experts' parameters), beside the controls")
    parser.add_argument("--budget-variants", nargs="+", default=[*BUDGET_VARIANTS, "control:linear"],
                        choices=[*BUDGET_VARIANTS, "control:linear"], help="variants of the refit grid")
    parser.add_argument("--refit-sequences", type=int, default=64,
                        help="calibration sequences (WikiText-2) the refits fit on")
    parser.add_argument("--distill-steps", type=int, default=300, help="Adam steps per layer of the distill refit")
    parser.add_argument("--cost", action="store_true",
                        help="also time the ridge refit against a Fisher pass on the same windows (first budget)")
    parser.add_argument("--source-path", nargs="+", default=[], metavar="NAME=DIR",
                        help="load these built sources from their folders instead of building (e.g. native=DIR)")
    parser.add_argument("--tiny", action="store_true", help="tiny random sources (plumbing only)")
    parser.add_argument("--report-only", action="store_true", help="print the table from --json, run nothing")
    parser.add_argument("--markdown", help="also write the table into this file (RETENTION.md), in place of the "
                                           "one under its '## Retention table' heading")
    args = parser.parse_args(argv)
    args.source_path = dict(item.split("=", 1) for item in args.source_path)
    if args.report_only:
        results = {"runs": [run for path in args.json for run in json.loads(Path(path).read_text())["runs"]]}
    else:
        results = run_budgets(args) if args.budgets else run(args)
    kinds = {"budget" in row for row in results["runs"]}
    if len(kinds) > 1:
        raise SystemExit("--json mixes the rank grid and the refit grid (--budgets); render them separately")
    budget_grid = bool(args.budgets) or kinds == {True}
    table = render_budgets(results) if budget_grid else render(results)
    print(table)
    if args.markdown:
        replace_table(Path(args.markdown), table, "## Refits and controls at parameter budgets" if budget_grid
                      else "## Retention table")
    return 0


def replace_table(path: Path, table: str, heading: str = "## Retention table") -> None:
    """Put ``table`` under the file's ``heading``, in place of the table there (the prose around it,
    written from the numbers, stays: read it against the new table)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    at = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if at is None:
        raise ValueError(f"{path} has no '{heading}' heading to put the table under")
    start = next(i for i in range(at + 1, len(lines)) if lines[i].startswith("|") or lines[i].startswith("## "))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[start:end] = table.split("\n")
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
