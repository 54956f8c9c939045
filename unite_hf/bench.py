"""``unite-hf bench``: the paper's experiments at our scale, written to ``benchmarks/RESULTS.md``.

Each experiment is a list of fine-tuning runs (:func:`unite_hf.training.finetune.finetune`) on one
real source (SmolLM2-135M moefied, see :mod:`unite_hf.demo`), repeated over seeds and reported as
mean ± std:

- ``generalization``: UNITE vs random init vs copy-only across tasks (paper Table 5);
- ``data_efficiency``: 10/25/50/100% of the train data (Fig. 4);
- ``convergence``: accuracy after each epoch (Fig. 5), read from the generalization runs;
- ``fusion``: fisher / uniform / frequency / fisher_diag (Tables 1 and 6);
- ``decomposition``: tucker / cp / svd (Tables 1 and 7);
- ``rank`` (Tables 3 and 9) and ``depth`` (Tables 2 and 8).

The Fisher pass runs once; every gene of the ablations reuses it (``importance=``).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

PAPER_CLAIMS = {
    "generalization": "UNITE targets beat random init by more than 6 points on reasoning tasks",
    "fusion": "Fisher fusion beats uniform averaging",
    "decomposition": "Tucker beats CP and SVD",
    "rank": "higher ranks are better",
    "depth": "deeper targets are better",
    "convergence": "UNITE targets converge in 3 to 5 epochs",
}


@dataclass
class BenchProfile:
    tasks: list[str]
    seeds: list[int]
    train_examples: int
    eval_examples: int
    epochs: int
    layers: int
    rank: int
    gene_rank: tuple[int, int, int]
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    ablation_task: str = "sst2"
    ranks: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    depths: list[int] = field(default_factory=lambda: [2, 4, 8])
    fusions: list[str] = field(default_factory=lambda: ["fisher", "uniform", "frequency", "fisher_diag"])
    decompositions: list[str] = field(default_factory=lambda: ["tucker", "cp", "svd"])
    max_length: int = 96
    batch_size: int = 16
    learning_rate: float = 3e-4
    fisher_sequences: int = 16
    seq_len: int = 128


PROFILES: dict[str, BenchProfile] = {
    # about half an hour on an idle 2-core CPU (see RESULTS.md for the measured time)
    "full": BenchProfile(tasks=["sst2", "rte", "boolq", "piqa", "arc_easy"], seeds=[0, 1, 2], train_examples=400,
                         eval_examples=150, epochs=3, layers=2, rank=128, gene_rank=(30, 192, 192),
                         ranks=[32, 64, 128], depths=[1, 2, 4]),
    # minutes: the same code paths, one seed, small data
    "quick": BenchProfile(tasks=["sst2", "arc_easy"], seeds=[0], train_examples=256, eval_examples=128, epochs=2,
                          layers=2, rank=64, gene_rank=(30, 128, 128), fractions=[0.25, 1.0], ranks=[16, 64],
                          depths=[1, 2], fusions=["fisher", "uniform"], decompositions=["tucker", "svd"]),
    # seconds, for the tests (tiny random source)
    "smoke": BenchProfile(tasks=["sst2"], seeds=[0], train_examples=32, eval_examples=16, epochs=1, layers=1, rank=8,
                          gene_rank=(2, 16, 16), fractions=[0.5, 1.0], ranks=[4, 8], depths=[1, 2],
                          fusions=["fisher", "uniform"], decompositions=["tucker", "svd"], max_length=32,
                          fisher_sequences=4, seq_len=32),
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


class Bench:
    def __init__(self, out_dir: str | os.PathLike, profile: BenchProfile, work_dir: str | os.PathLike, tiny: bool):
        self.out_dir, self.profile, self.work_dir, self.tiny = Path(out_dir), profile, Path(work_dir), tiny
        self.runs: list[dict[str, Any]] = []
        self.genes: dict[str, Path] = {}

    # -- source and genes ----------------------------------------------------------------------
    def prepare(self) -> None:
        from .demo import _real_source, _tiny_source
        from .calibration import find_local_data_dir, load_calibration
        from .importance import compute_expert_importance
        from .methods.unite import extract_universal_knowledge

        data = find_local_data_dir()
        source = None if self.tiny else _real_source(data)
        self.model, self.tokenizer, self.source_name = source or _tiny_source(data)
        p = self.profile
        calibration = load_calibration("wikitext2", self.tokenizer, num_sequences=p.fisher_sequences, seq_len=p.seq_len)
        started = time.perf_counter()
        self.importance = compute_expert_importance(self.model, calibration, diagonal=True, batch_size=4)
        self.fisher_seconds = time.perf_counter() - started
        variants = {("fisher", "tucker")} | {(f, "tucker") for f in p.fusions} | {("fisher", d) for d in p.decompositions}
        for fusion, decomposition in sorted(variants):
            rank = p.gene_rank if decomposition == "tucker" else p.gene_rank[1]
            gene = extract_universal_knowledge(self.model, importance=self.importance, fusion=fusion,
                                               decomposition=decomposition, rank=rank, source_id=self.source_name)
            gene.tokenizer = self.tokenizer
            path = self.work_dir / f"gene-{fusion}-{decomposition}"
            gene.save_pretrained(path)
            self.genes[f"{fusion}/{decomposition}"] = path
        del self.model

    # -- runs -----------------------------------------------------------------------------------
    def run(self, experiment: str, *, task: str, init: str = "unite", gene: str = "fisher/tucker", seed: int,
            layers: int | None = None, rank: int | None = None, fraction: float = 1.0) -> dict[str, Any]:
        from .training.finetune import finetune

        p = self.profile
        name = f"{experiment}-{task}-{init}-{gene.replace('/', '_')}-L{layers or p.layers}-r{rank or p.rank}-f{fraction}-s{seed}"
        result = finetune(self.genes[gene], task, output_dir=self.work_dir / "runs" / name, init=init,
                          layers=layers or p.layers, rank=rank or p.rank, epochs=p.epochs, train_fraction=fraction,
                          seed=seed, learning_rate=p.learning_rate, batch_size=p.batch_size, max_length=p.max_length,
                          max_train_examples=max(1, int(p.train_examples * fraction)) if fraction < 1 else p.train_examples,
                          max_eval_examples=p.eval_examples, show_progress=False)
        result.update(experiment=experiment, gene=gene)
        self.runs.append(result)
        print(f"bench: {name}: accuracy {result['accuracy']:.4f} ({result['seconds']} s)", flush=True)
        return result

    def run_all(self, experiments: list[str]) -> None:
        p = self.profile
        for seed in p.seeds:
            if "generalization" in experiments:
                for task in p.tasks:
                    for init in ("unite", "random", "copy-only"):
                        self.run("generalization", task=task, init=init, seed=seed)
            if "data_efficiency" in experiments:
                for fraction in p.fractions:
                    for init in ("unite", "random"):
                        self.run("data_efficiency", task=p.ablation_task, init=init, seed=seed, fraction=fraction)
            if "fusion" in experiments:
                for fusion in p.fusions:
                    self.run("fusion", task=p.ablation_task, gene=f"{fusion}/tucker", seed=seed)
            if "decomposition" in experiments:
                for decomposition in p.decompositions:
                    self.run("decomposition", task=p.ablation_task, gene=f"fisher/{decomposition}", seed=seed)
            if "rank" in experiments:
                for rank in p.ranks:
                    self.run("rank", task=p.ablation_task, rank=rank, seed=seed)
            if "depth" in experiments:
                for depth in p.depths:
                    self.run("depth", task=p.ablation_task, layers=depth, seed=seed)

    # -- report ---------------------------------------------------------------------------------
    def _values(self, experiment: str, **match: Any) -> list[float]:
        return [r["accuracy"] for r in self.runs if r["experiment"] == experiment
                and all(r.get(k) == v for k, v in match.items())]

    def report(self, command: str, seconds: float) -> str:
        p = self.profile
        lines = [
            "# Benchmark results", "",
            f"Source: **{self.source_name}**. Gene: exact Fisher on WikiText-2 ({p.fisher_sequences} x {p.seq_len} "
            f"tokens, {self.fisher_seconds:.0f} s), Tucker rank {p.gene_rank}. Targets: {p.layers} layers, rank {p.rank}, "
            f"random cores (the paper's default), k-way sequence classification (paper A.2.5). Fine-tuning: "
            f"{p.train_examples} train examples (fewer where a split is smaller), {p.eval_examples} eval examples, "
            f"{p.epochs} epochs, lr {p.learning_rate}, batch {p.batch_size}, max length {p.max_length}. "
            f"Seeds {p.seeds}; accuracy in %, mean ± std over seeds.", "",
            f"Reproduce: `{command}` ({seconds / 60:.0f} minutes on this machine).", "",
        ]
        if any(r["experiment"] == "generalization" for r in self.runs):
            lines += ["## Generalization across tasks (paper Table 5)", "",
                      "| task | UNITE | random init | copy-only | UNITE - random |", "|---|---|---|---|---|"]
            gaps = []
            for task in p.tasks:
                unite, random_, copy = (self._values("generalization", task=task, init=i) for i in ("unite", "random", "copy-only"))
                if not unite:
                    continue
                gap = statistics.fmean(unite) - statistics.fmean(random_)
                gaps.append(gap)
                lines.append(f"| {task} | {_fmt(unite)} | {_fmt(random_)} | {_fmt(copy)} | {100 * gap:+.1f} |")
            mean_gap = 100 * statistics.fmean(gaps)
            verdict = "confirmed" if mean_gap > 6 else "not confirmed at our scale"
            if mean_gap < 0:
                verdict = "contradicted at our scale"
            lines += ["", f"Paper claim: {PAPER_CLAIMS['generalization']}. Mean gap here: {mean_gap:+.1f} points: **{verdict}**.", ""]
            lines += self._convergence()
        for experiment, key, label, title in (
                ("data_efficiency", "train_fraction", "train fraction", "Data efficiency (paper Fig. 4)"),
                ("fusion", "gene", "fusion", "Ablation: fusion (paper Tables 1 and 6)"),
                ("decomposition", "gene", "decomposition", "Ablation: decomposition (paper Tables 1 and 7)"),
                ("rank", "ranks", "rank", "Ablation: rank (paper Tables 3 and 9)"),
                ("depth", "layers", "depth", "Ablation: depth (paper Tables 2 and 8)")):
            rows = [r for r in self.runs if r["experiment"] == experiment]
            if not rows:
                continue
            lines += [f"## {title}", "", f"| {label} | init | accuracy |", "|---|---|---|"]
            groups: dict[tuple[str, str], list[float]] = {}
            for r in rows:
                value = r[key] if key != "ranks" else r["ranks"][next(iter(r["ranks"]))][0]
                groups.setdefault((str(value), r["init"]), []).append(r["accuracy"])
            for (value, init), accs in groups.items():
                lines.append(f"| {value} | {init} | {_fmt(accs)} |")
            if experiment in PAPER_CLAIMS:
                lines += ["", f"Paper claim: {PAPER_CLAIMS[experiment]}. {self._claim(experiment, groups)}"]
            lines.append("")
        return "\n".join(lines) + "\n"

    def _convergence(self) -> list[str]:
        curves = {}
        for init in ("unite", "random", "copy-only"):
            runs = [r["accuracy_per_epoch"] for r in self.runs if r["experiment"] == "generalization" and r["init"] == init]
            if runs:
                curves[init] = [statistics.fmean(epoch) for epoch in zip(*runs)]
        lines = ["## Convergence (paper Fig. 5): mean accuracy after each epoch, all tasks", "",
                 "| init | " + " | ".join(f"epoch {i + 1}" for i in range(len(next(iter(curves.values()))))) + " |",
                 "|---|" + "---|" * len(next(iter(curves.values())))]
        for init, curve in curves.items():
            lines.append(f"| {init} | " + " | ".join(f"{100 * v:.1f}" for v in curve) + " |")
        best = curves.get("unite", [])
        if best:
            reached = next((i + 1 for i, v in enumerate(best) if v >= max(best) - 0.005), len(best))
            lines += ["", f"Paper claim: {PAPER_CLAIMS['convergence']}. UNITE reaches its best accuracy (within 0.5 "
                      f"points) after epoch {reached} of {len(best)} here.", ""]
        return lines

    @staticmethod
    def _claim(experiment: str, groups: dict[tuple[str, str], list[float]]) -> str:
        means = {value: statistics.fmean(accs) for (value, _), accs in groups.items()}
        # a difference smaller than the seed-to-seed spread (or 1 point with one seed) decides nothing
        noise = max([statistics.pstdev(a) for a in groups.values() if len(a) > 1] or [0.01])

        def verdict(gap: float) -> str:
            return "inconclusive (within seed noise)" if abs(gap) < noise else ("confirmed" if gap > 0 else "contradicted")

        if experiment == "fusion" and {"fisher/tucker", "uniform/tucker"} <= set(means):
            gap = means["fisher/tucker"] - means["uniform/tucker"]
            return f"Fisher - uniform here: {100 * gap:+.1f} points (noise {100 * noise:.1f}): **{verdict(gap)}**."
        if experiment == "decomposition" and "fisher/tucker" in means:
            others = {k: v for k, v in means.items() if k != "fisher/tucker"}
            gap = means["fisher/tucker"] - max(others.values())
            return (f"Tucker - best of {sorted(others)} here: {100 * gap:+.1f} points (noise {100 * noise:.1f}): "
                    f"**{verdict(gap)}**.")
        if experiment in ("rank", "depth"):
            keys = sorted(means, key=lambda v: int(v))
            gap = means[keys[-1]] - means[keys[0]]
            monotone = all(means[b] >= means[a] for a, b in zip(keys, keys[1:]))
            return (f"{experiment} {keys[-1]} - {experiment} {keys[0]}: {100 * gap:+.1f} points (noise {100 * noise:.1f}), "
                    f"{'monotone' if monotone else 'not monotone'}: **{verdict(gap)}**.")
        return ""

    def plots(self) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        curves = {init: [r["accuracy_per_epoch"] for r in self.runs if r["experiment"] == "generalization" and r["init"] == init]
                  for init in ("unite", "random", "copy-only")}
        if any(curves.values()):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for init, runs in curves.items():
                if runs:
                    mean = [statistics.fmean(e) for e in zip(*runs)]
                    ax.plot(range(1, len(mean) + 1), [100 * v for v in mean], marker="o", label=init)
            ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Convergence (mean over tasks and seeds)")
            ax.legend()
            path = self.out_dir / "convergence.png"
            fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)
            written.append(path)
        rows = [r for r in self.runs if r["experiment"] == "data_efficiency"]
        if rows:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for init in ("unite", "random"):
                points = sorted({r["train_fraction"] for r in rows if r["init"] == init})
                means = [statistics.fmean([r["accuracy"] for r in rows if r["init"] == init and r["train_fraction"] == f])
                         for f in points]
                ax.plot([100 * f for f in points], [100 * m for m in means], marker="o", label=init)
            ax.set(xlabel="train data (%)", ylabel="accuracy (%)", title="Data efficiency")
            ax.legend()
            path = self.out_dir / "data_efficiency.png"
            fig.tight_layout(), fig.savefig(path, dpi=120), plt.close(fig)
            written.append(path)
        return written


EXPERIMENTS = ("generalization", "data_efficiency", "fusion", "decomposition", "rank", "depth")


def run_bench(out_dir: str | os.PathLike = "benchmarks", profile: str = "full", *, work_dir: str | os.PathLike = "runs/bench",
              experiments: tuple[str, ...] = EXPERIMENTS, tiny: bool = False, command: str = "unite-hf bench") -> Path:
    """Run the experiments and write ``RESULTS.md``, ``results.json`` and PNG plots to ``out_dir``."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {EXPERIMENTS}")
    started = time.perf_counter()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(out_dir, PROFILES[profile], work_dir, tiny)
    bench.prepare()
    bench.run_all(list(experiments))
    seconds = time.perf_counter() - started
    bench.plots()
    (out_dir / "results.json").write_text(json.dumps({"profile": asdict(PROFILES[profile]), "source": bench.source_name,
                                                      "seconds": round(seconds), "runs": bench.runs}, indent=1))
    report = out_dir / "RESULTS.md"
    report.write_text(bench.report(command, seconds))
    return report
