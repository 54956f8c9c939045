"""``unite-hf bench``: the paper's experiments at our scale, written to ``benchmarks/RESULTS.md``.

Each experiment is a list of fine-tuning runs (:func:`unite_hf.training.finetune.finetune`) on one
real source (SmolLM2-135M moefied, see :mod:`tools.demo`), repeated over seeds and reported as
mean ± std:

- ``generalization``: UNITE vs random init vs copy-only across tasks (paper Table 5);
- ``data_efficiency``: 10/25/50/100% of the train data (Fig. 4);
- ``convergence``: accuracy after each epoch (Fig. 5), read from the generalization runs;
- ``fusion``: fisher / uniform / frequency / fisher_diag (Tables 1 and 6);
- ``decomposition``: tucker / cp / svd (Tables 1 and 7);
- ``rank`` (Tables 3 and 9) and ``depth`` (Tables 2 and 8);
- ``masa``: MASA genes of the dense source and of its MoE form, Llama targets of two widths against
  random init (each after the same short continued pretraining), and the paper's ablations (no
  spectral alignment; truncate/pad instead of adaptive scaling);
- ``downstream``: the retention issue's comparison with statistical power: targets from the gene that
  keeps the most function (concat fusion + tucker_hidden, inherited cores), the paper's default (Fisher +
  Tucker, random cores), copy-only and random init, scored on the full evaluation files (ARC and
  OpenBookQA test, SST-2 and RTE dev, the seeded validation splits of BoolQ and PIQA), with paired
  bootstrap 95% intervals of (variant - copy-only) and (variant - random)
  (:func:`unite_hf.evaluation.paired_difference`). Finished runs are kept in ``work_dir`` and reused by a
  rerun of the same profile, so an interrupted run resumes;
- ``xpert``: XPERT genes of the MoE form, targets at the source width (UNITE-style) and at a small
  Llama width against random init, the reviewers' controls (random and least-used experts, same
  count and ranks) and convergence curves.

The Fisher pass runs once; every gene of the ablations reuses it (``importance=``). Llama targets are
continued-pretrained once per (gene, width) and saved, then every task and seed starts from that
checkpoint. A run of some experiments keeps the stored runs of the others (``results.json``), so
``RESULTS.md`` always reports every experiment.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


from unite_hf.io import atomic_write_json, atomic_write_text

PAPER_CLAIMS = {
    "generalization": "UNITE targets beat random init by more than 6 points on reasoning tasks",
    "fusion": "Fisher fusion beats uniform averaging",
    "decomposition": "Tucker beats CP and SVD",
    "rank": "higher ranks are better",
    "depth": "deeper targets are better",
    "convergence": "UNITE targets converge in 3 to 5 epochs",
    "masa": "MASA-initialised targets of any width beat random init",
    "masa_ablation": "spectral alignment and adaptive scaling both help",
    "xpert": "XPERT targets beat random init at every scale and converge faster",
    "xpert_control": "common experts beat the same number of random or least-used experts",
    "downstream": "targets grown from a gene (with the knowledge it keeps) beat copy-only and random init",
}
# the split scored by the downstream experiment: test where its labels are public, else dev/validation
EVAL_SPLITS = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}
DOWNSTREAM_INITS = {  # label -> (gene key, finetune init, extra from_gene options)
    "oracle": ("source", "oracle", {}),  # not a gene: the source's own first N layers (see Bench._oracle_bases)
    "refit": ("concat/tucker_hidden/ridge", "unite", {"core_init": "tucker"}),  # grown at the gene's own ranks
    "kept": ("concat/tucker_hidden", "unite", {"core_init": "tucker"}),
    "paper": ("fisher/tucker", "unite", {}),
    "copy-only": ("fisher/tucker", "copy-only", {}),
    "random": ("fisher/tucker", "random", {}),
}
# the inits compared with copy-only (and random) in the downstream intervals, the upper bound first
DOWNSTREAM_VARIANTS = ("oracle", "refit", "kept", "paper")
UNITE_EXPERIMENTS = ("generalization", "data_efficiency", "fusion", "decomposition", "rank", "depth")


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
    # MASA and XPERT (Llama targets of several widths)
    widths: list[int] = field(default_factory=lambda: [384, 576])
    masa_rank: int = 64
    masa_tokens: int = 8192
    pretrain_tokens: int = 16384
    xpert_k: int = 2
    analysis_sequences: int = 8
    transfer_seeds: list[int] | None = None  # default: seeds
    # downstream (issue 11): full evaluation files, every task of the paper's suite we have locally
    downstream_tasks: list[str] = field(default_factory=lambda: [
        "sst2", "rte", "boolq", "piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "hellaswag"])
    downstream_seeds: list[int] | None = None  # default: seeds
    downstream_eval_examples: int | None = None  # None: the whole file
    downstream_inits: list[str] = field(default_factory=lambda: list(DOWNSTREAM_INITS))  # run in this order
    downstream_depths: list[int] | None = None  # target depths, run in this order; default: [layers]
    refit_budget: float = 0.25  # the refit gene: this fraction of the routed experts' parameters
    refit_sequences: int = 64  # its calibration (seq_len tokens each) for the ridge refit
    kept_width_fraction: float = 0.5  # concat fusion keeps this share of all E x I expert neurons
    # the source the in-process experiments grow targets from: "moefied" (SmolLM2, every experiment) or
    # "native" (the Mixtral trained from scratch by tools.sources, GPT-2 tokenizer: downstream only)
    source: str = "moefied"


PROFILES: dict[str, BenchProfile] = {
    # about half an hour on an idle 2-core CPU (see RESULTS.md for the measured time)
    "full": BenchProfile(tasks=["sst2", "rte", "boolq", "piqa", "arc_easy"], seeds=[0, 1, 2], train_examples=400,
                         eval_examples=150, epochs=3, layers=2, rank=128, gene_rank=(30, 192, 192),
                         ranks=[32, 64, 128], depths=[1, 2, 4], transfer_seeds=[0, 1], downstream_seeds=[0, 1]),
    # minutes: the same code paths, one seed, small data
    "quick": BenchProfile(tasks=["sst2", "arc_easy"], seeds=[0], train_examples=256, eval_examples=128, epochs=2,
                          layers=2, rank=64, gene_rank=(30, 128, 128), fractions=[0.25, 1.0], ranks=[16, 64],
                          depths=[1, 2], fusions=["fisher", "uniform"], decompositions=["tucker", "svd"]),
    # seconds, for the tests (tiny random source)
    "smoke": BenchProfile(tasks=["sst2"], seeds=[0], train_examples=32, eval_examples=16, epochs=1, layers=1, rank=8,
                          gene_rank=(2, 16, 16), fractions=[0.5, 1.0], ranks=[4, 8], depths=[1, 2],
                          fusions=["fisher", "uniform"], decompositions=["tucker", "svd"], max_length=32,
                          fisher_sequences=4, seq_len=32, widths=[32, 64], masa_rank=8, masa_tokens=128,
                          pretrain_tokens=64, analysis_sequences=2, downstream_tasks=["sst2", "arc_easy"],
                          downstream_eval_examples=24, refit_sequences=4),
}
# downstream on the native source (experts from different random inits, where the kept gene keeps swap gap
# 0.36 of each layer): the test that could show retention turning into accuracy; same sizes as "full"
# (issue 20): the oracle and copy-only first (without an oracle margin no gene can show), the paper's target depth
# (2) before full depth (4 = the source's layers; half depth is 2); paper and random init were run before
PROFILES["full-native"] = replace(PROFILES["full"], source="native", downstream_inits=["copy-only", "oracle", "refit", "kept"],
                                  downstream_depths=[2, 4])
# profile fields that only pick which downstream runs are made: a finished run does not depend on them
_SELECTION_FIELDS = ("downstream_tasks", "downstream_seeds", "downstream_inits", "downstream_depths")


SOURCES = ("moefied", "native")


def _native_source(path: str | os.PathLike | None = None):
    """(model, tokenizer, name) of the native source, built once into the cache by ``tools.sources``
    (or the built source folder ``path``, loaded as it is)."""
    from tools.sources import build_native, load_source

    model, tokenizer, report = load_source(path if path is not None else build_native().source_report.path)
    return model.float().eval(), tokenizer, f"native Mixtral trained from scratch ({report.path})"


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
        self.bases: dict[str, Path] = {}
        self.meta: dict[str, Any] = {}  # timings and gene statistics reported with the runs
        self.source_path: str | os.PathLike | None = None  # the native source's folder (default: build or cache)

    # -- source and genes ----------------------------------------------------------------------
    def prepare(self, experiments: list[str]) -> None:
        from unite_hf.calibration import find_local_data_dir, load_calibration
        from tools.demo import _real_source, _tiny_source, real_dense_source, tiny_dense_source
        from unite_hf.importance import compute_expert_importance
        from unite_hf.methods.unite import extract_universal_knowledge
        from unite_hf.sources import get_source

        data = find_local_data_dir()
        p = self.profile
        if p.source not in SOURCES:
            raise ValueError(f"profile source must be one of {SOURCES}, got {p.source!r}")
        if p.source == "native" and not self.tiny:
            unsupported = [e for e in experiments if e != "downstream"]
            if unsupported:
                raise ValueError(f"experiments {unsupported} run on the moefied source only; a profile with "
                                 "source='native' runs 'downstream' (use --profile full for the others)")
            self.model, self.tokenizer, self.source_name = _native_source(self.source_path)
        else:
            dense, tokenizer = tiny_dense_source(data) if self.tiny else real_dense_source()
            if "masa" in experiments:
                self._masa_genes("dense", dense, tokenizer)
            source = _tiny_source(data) if self.tiny else _real_source(data, dense, tokenizer)
            self.model, self.tokenizer, self.source_name = source
            del dense
        if "masa" in experiments:
            self._masa_genes("moe", self.model, self.tokenizer)
        if "xpert" in experiments:
            self._xpert_genes()
        if any(e in (*UNITE_EXPERIMENTS, "downstream") for e in experiments):
            calibration = load_calibration("wikitext2", self.tokenizer, num_sequences=p.fisher_sequences, seq_len=p.seq_len)
            started = time.perf_counter()
            # the elementwise diagonal Fisher feeds only the fisher_diag fusion ablation (genes do not store it)
            diagonal = "fusion" in experiments and "fisher_diag" in p.fusions
            self.importance = compute_expert_importance(self.model, calibration, diagonal=diagonal, batch_size=4)
            self.meta["fisher_seconds"] = round(time.perf_counter() - started, 1)
            variants = {("fisher", "tucker")}
            if any(e in UNITE_EXPERIMENTS for e in experiments):
                variants |= {(f, "tucker") for f in p.fusions} | {("fisher", d) for d in p.decompositions}
            layers = len(get_source(self.model).blocks)  # the layer-mode rank is at most the MoE layers
            for fusion, decomposition in sorted(variants):
                rank = (min(p.gene_rank[0], layers), *p.gene_rank[1:]) if decomposition == "tucker" else p.gene_rank[1]
                gene = extract_universal_knowledge(self.model, importance=self.importance, fusion=fusion,
                                                   decomposition=decomposition, rank=rank, source_id=self.source_name)
                self._save_gene(gene, f"{fusion}/{decomposition}")
            if "downstream" in experiments:
                inits = self.profile.downstream_inits
                if "kept" in inits:
                    self._kept_gene()
                if "refit" in inits:
                    self._refit_gene()
                if "oracle" in inits:
                    self._oracle_bases()
        del self.model

    def _kept_gene(self) -> None:
        """The gene that keeps the most of the source's function at the bench's ranks (RETENTION.md):
        every expert neuron side by side, Fisher-selected to ``kept_width_fraction`` of E x I, and
        bases shared across layers along the hidden axes only."""
        from unite_hf.methods.unite import extract_universal_knowledge
        from unite_hf.sources import get_source

        p = self.profile
        moe = get_source(self.model)
        intermediate = moe.blocks[0].expert(0).down.shape[1]
        width = max(1, int(p.kept_width_fraction * intermediate * moe.num_experts))
        gene = extract_universal_knowledge(self.model, importance=self.importance, fusion="concat",
                                           decomposition="tucker_hidden", fused_width=width,
                                           rank=p.gene_rank[1], source_id=self.source_name)
        self.meta["kept_gene"] = {"fusion": "concat", "decomposition": "tucker_hidden", "fused_width": width}
        self._save_gene(gene, "concat/tucker_hidden")

    def _refit_gene(self) -> None:
        """The budgeted gene whose FFNs are fitted to the source's routed output (unite_hf.refit): concat
        fusion + tucker_hidden at ``refit_budget`` of the routed experts' parameters, ridge refit on
        ``refit_sequences`` x ``seq_len`` tokens of WikiText-2; targets grow at the gene's own ranks."""
        from unite_hf.methods.unite import extract_universal_knowledge

        p = self.profile
        started = time.perf_counter()
        gene = extract_universal_knowledge(self.model, self.tokenizer, importance=self.importance, fusion="concat",
                                           decomposition="tucker_hidden", budget=p.refit_budget, refit="ridge",
                                           num_sequences=p.refit_sequences, seq_len=p.seq_len,
                                           source_id=self.source_name)
        mc = gene.config.method_config
        self.meta["refit_gene"] = {"fusion": "concat", "decomposition": "tucker_hidden", "budget": p.refit_budget,
                                   "refit": "ridge", "num_sequences": p.refit_sequences, "seq_len": p.seq_len,
                                   "seconds": round(time.perf_counter() - started, 1),
                                   **{k: mc[k] for k in ("allocation", "fused_width") if k in mc}}
        self._save_gene(gene, DOWNSTREAM_INITS["refit"][0])

    def _oracle_bases(self) -> None:
        """The upper bound no gene can beat: the source itself cut to each downstream depth (its first N
        decoder layers, every expert and router kept), saved as a causal LM; fine-tuning loads it with a
        fresh task head (AutoModelForSequenceClassification)."""
        import copy

        from unite_hf.io import save_model_folder

        p = self.profile
        for depth in p.downstream_depths or [p.layers]:
            key = f"oracle-L{depth}"
            if key in self.bases:
                continue
            model = copy.deepcopy(self.model)
            body = getattr(model, model.base_model_prefix)
            depth = min(depth, len(body.layers))
            body.layers = body.layers[:depth]
            model.config.num_hidden_layers = depth
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:depth]
            path = self.work_dir / "bases" / key
            save_model_folder(path, model, self.tokenizer)
            self.bases[key] = path
            del model

    def _save_gene(self, gene, key: str) -> None:
        gene.tokenizer = self.tokenizer if hasattr(self, "tokenizer") else gene.tokenizer
        path = self.work_dir / f"gene-{key.replace('/', '-')}"
        gene.save_pretrained(path)
        self.genes[key] = path

    def _masa_genes(self, form: str, model, tokenizer) -> None:
        from unite_hf.methods.masa import extract_masa_gene

        p = self.profile
        for key, weight in ((f"masa/{form}", 0.1), (f"masa/{form}-nospectral", 0.0)):
            if form == "moe" and weight == 0.0:
                continue  # the ablation runs on the dense source only
            gene = extract_masa_gene(model, tokenizer, rank=p.masa_rank, tokens=p.masa_tokens, seq_len=p.seq_len * 2,
                                     spectral_weight=weight, source_id=f"SmolLM2-135M {form}" if not self.tiny else form)
            gene.tokenizer = tokenizer
            path = self.work_dir / f"gene-{key.replace('/', '-')}"
            gene.save_pretrained(path)
            self.genes[key] = path
            mc = gene.config.method_config
            self.meta.setdefault("masa_genes", {})[key] = {
                k: mc[k] for k in ("rank", "selection", "units", "tokens", "steps", "seconds", "spectral_weight",
                                   "initial_output_error", "final_output_error", "final_spectral_error",
                                   "source_widths")}

    def _xpert_genes(self) -> None:
        from unite_hf.methods.xpert.analysis import DEFAULT_DOMAINS, analyze_experts
        from unite_hf.methods.xpert import extract_xpert_gene

        p = self.profile
        started = time.perf_counter()
        analysis = analyze_experts(self.model, DEFAULT_DOMAINS, self.tokenizer, num_sequences=p.analysis_sequences,
                                   seq_len=p.seq_len, k_common=p.xpert_k, source_id=self.source_name)
        self.meta["analysis_seconds"] = round(time.perf_counter() - started, 1)
        paths = analysis.save(self.out_dir / "xpert_analysis")
        self.meta["xpert_analysis"] = {"domains": analysis.domains, "tokens": analysis.tokens,
                                       "common_experts": analysis.common_experts, "files": paths}
        for strategy in ("common", "random", "least"):
            gene = extract_xpert_gene(self.model, analysis=analysis, k=p.xpert_k, strategy=strategy,
                                      rank=(len(analysis.moe_layers) * p.xpert_k, *p.gene_rank[1:]),
                                      source_id=self.source_name)
            self._save_gene(gene, f"xpert/{strategy}")
            self.meta.setdefault("xpert_genes", {})[strategy] = {
                "selected_experts": gene.config.method_config["selected_experts"],
                "relative_error": gene.config.relative_error}

    def base(self, key: str, gene: str, init: str, width: int, scaling: str | None = None) -> Path:
        """A Llama causal LM of ``width`` from ``gene`` (or random), continued-pretrained once and saved."""
        from unite_hf.training.finetune import build_llama_causal_lm
        from unite_hf.io import save_model_folder
        from unite_hf.training.pretrain import continued_pretraining

        if key not in self.bases:
            p = self.profile
            model = build_llama_causal_lm(self.genes[gene], init=init, layers=p.layers, width=width, scaling=scaling)
            summary = continued_pretraining(model, self.tokenizer, tokens=p.pretrain_tokens, seq_len=p.seq_len,
                                            output_dir=self.work_dir / "pretrain" / key, show_progress=False)
            path = self.work_dir / "bases" / key
            save_model_folder(path, model, self.tokenizer)
            self.bases[key] = path
            self.meta.setdefault("pretrain", {})[key] = {k: v for k, v in summary.items() if k != "output_dir"}
            print(f"bench: base {key}: pretrain loss {summary['loss_start']} -> {summary['loss_end']}", flush=True)
        return self.bases[key]

    # -- runs -----------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        """What a resumable run's result depends on beyond its own name: the profile and the source."""
        profile = {k: v for k, v in asdict(self.profile).items() if k not in _SELECTION_FIELDS}
        return json.dumps({"profile": profile, "tiny": self.tiny, "source": self.source_name}, sort_keys=True)

    def collect_finished(self) -> list[str]:
        """Add the resumable runs finished in ``work_dir`` under this profile and source that the stored
        runs lack (an interrupted ``downstream`` run, rendered with ``--report-only``); returns their
        experiments."""
        known = {(r["experiment"], r["task"], r["init"], r["seed"], r.get("depth")) for r in self.runs}
        added: set[str] = set()
        for path in sorted((self.work_dir / "runs").glob("*/bench_result.json")):
            stored = json.loads(path.read_text())
            result = stored.get("result", {})
            key = (result.get("experiment"), result.get("task"), result.get("init"), result.get("seed"), result.get("depth"))
            if stored.get("fingerprint") == self._fingerprint() and key not in known:
                self.runs.append(result)
                known.add(key)
                added.add(result["experiment"])
        return sorted(added)

    def run(self, experiment: str, *, task: str, init: str = "unite", gene: str = "fisher/tucker", seed: int,
            layers: int | None = None, rank: int | None = None, fraction: float = 1.0, base: Path | None = None,
            label: str | None = None, eval_split: str = "validation", eval_examples: int | None | str = "profile",
            resume: bool = False, eval_every_epoch: bool = True, **from_gene_kwargs: Any) -> dict[str, Any]:
        """One fine-tuning run: grown from ``gene``, or from a saved Llama ``base`` (labelled ``label``).
        With ``resume``, a run already finished in ``work_dir`` under the same profile is read back.
        ``rank="gene"``: the target keeps the gene's own ranks. Downstream runs record their ``depth``
        (``layers``; for a ``base``, the depth it was saved at)."""
        from unite_hf.training.finetune import finetune

        p = self.profile
        shape = {} if base is not None else {"layers": layers or p.layers, "rank": None if rank == "gene" else rank or p.rank}
        tag = base.name if base is not None else f"{gene.replace('/', '_')}-L{shape['layers']}-r{rank if rank == 'gene' else shape['rank']}"
        name = f"{experiment}-{task}-{label or init}-{tag}-f{fraction}-s{seed}"
        run_dir = self.work_dir / "runs" / name
        fingerprint = self._fingerprint()
        finished = run_dir / "bench_result.json"
        if resume and finished.is_file():
            stored = json.loads(finished.read_text())
            if stored.get("fingerprint") == fingerprint:
                self.runs.append(stored["result"])
                print(f"bench: {name}: accuracy {stored['result']['accuracy']:.4f} (kept from an earlier run)", flush=True)
                return stored["result"]
        result = finetune(base if base is not None else self.genes[gene], task, output_dir=run_dir,
                          init=init if base is None else "unite", epochs=p.epochs, train_fraction=fraction, seed=seed,
                          learning_rate=p.learning_rate, batch_size=p.batch_size, max_length=p.max_length,
                          max_train_examples=max(1, int(p.train_examples * fraction)) if fraction < 1 else p.train_examples,
                          max_eval_examples=p.eval_examples if eval_examples == "profile" else eval_examples,
                          eval_split=eval_split, eval_every_epoch=eval_every_epoch, show_progress=False, **shape,
                          **from_gene_kwargs)
        result.update(experiment=experiment, gene=gene if base is None else base.name, init=label or init)
        if experiment == "downstream":
            result["depth"] = layers or p.layers
        if resume:
            atomic_write_json({"fingerprint": fingerprint, "result": result}, finished)
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
        if "downstream" in experiments:
            for depth in p.downstream_depths or [p.layers]:
                for seed in p.downstream_seeds or p.seeds:
                    for task in p.downstream_tasks:
                        for label in p.downstream_inits:
                            gene, init, options = DOWNSTREAM_INITS[label]
                            shape: dict[str, Any] = {"layers": depth}
                            if label == "oracle":
                                shape["base"] = self.bases[f"oracle-L{depth}"]
                            elif label == "refit":
                                shape["rank"] = "gene"
                            self.run("downstream", task=task, init=init, gene=gene, seed=seed, label=label,
                                     eval_split=EVAL_SPLITS.get(task, "validation"),
                                     eval_examples=p.downstream_eval_examples, resume=True,
                                     eval_every_epoch=False, **shape, **options)  # the report reads final scores only
        for seed in p.transfer_seeds or p.seeds:
            if "masa" in experiments:
                self._run_masa(seed)
            if "xpert" in experiments:
                self._run_xpert(seed)

    def _run_masa(self, seed: int) -> None:
        p = self.profile
        for width in p.widths:
            for task in p.tasks:
                for label, gene, init in (("masa-dense", "masa/dense", "masa"), ("masa-moe", "masa/moe", "masa"),
                                          ("random", "masa/dense", "random")):
                    key = f"{label}-w{width}"
                    self.run("masa", task=task, seed=seed, base=self.base(key, gene, init, width), label=label)
        width = max(p.widths)
        for label, gene, scaling in (("no spectral", "masa/dense-nospectral", "adaptive"),
                                     ("truncate/pad", "masa/dense", "truncate")):
            key = f"{label.replace(' ', '-').replace('/', '-')}-w{width}"
            self.run("masa_ablation", task=p.ablation_task, seed=seed, base=self.base(key, gene, "masa", width, scaling),
                     label=label)

    def _run_xpert(self, seed: int) -> None:
        p = self.profile
        small = min(p.widths)
        for task in p.tasks:
            self.run("xpert", task=task, init="unite", gene="xpert/common", seed=seed, label="xpert")
            self.run("xpert", task=task, init="random", gene="xpert/common", seed=seed, label="random")
            self.run("xpert", task=task, seed=seed, base=self.base(f"xpert-w{small}", "xpert/common", "masa", small),
                     label=f"xpert-llama-w{small}")
            self.run("xpert", task=task, seed=seed, base=self.base(f"random-xpert-w{small}", "xpert/common", "random", small),
                     label=f"random-llama-w{small}")
        for strategy in ("random", "least"):
            self.run("xpert_control", task=p.ablation_task, init="unite", gene=f"xpert/{strategy}", seed=seed,
                     label=f"{strategy} experts")

    # -- report ---------------------------------------------------------------------------------
    def _values(self, experiment: str, **match: Any) -> list[float]:
        return [r["accuracy"] for r in self.runs if r["experiment"] == experiment
                and all(r.get(k) == v for k, v in match.items())]

    def report(self) -> str:
        p = self.profile
        reproduce = [f"- `{c['command']}` ({c['experiments']}): " + (f"{c['minutes']} minutes on this machine"
                     if c["minutes"] is not None else f"interrupted; its finished runs were collected from the work folder")
                     + _command_details(c) for c in self.meta.get("commands", [])]
        lines = [
            "# Benchmark results", "",
            f"Source: **{self.source_name}**. Gene: exact Fisher on WikiText-2 ({p.fisher_sequences} x {p.seq_len} "
            f"tokens, {self.meta.get('fisher_seconds', '?')} s), Tucker rank {p.gene_rank}. Targets: {p.layers} layers, rank {p.rank}, "
            f"random cores (the paper's default), k-way sequence classification (paper A.2.5). Fine-tuning: "
            f"{p.train_examples} train examples (fewer where a split is smaller), {p.eval_examples} eval examples, "
            f"{p.epochs} epochs, lr {p.learning_rate}, batch {p.batch_size}, max length {p.max_length}. "
            f"Seeds {p.seeds} (MASA and XPERT: {p.transfer_seeds or p.seeds}); accuracy in %, mean ± std over seeds.", "",
            "Reproduce (each command re-runs its experiments and keeps the stored runs of the others):", "",
            *reproduce, "",
        ]
        # the retention and LM-probe tables, written by their scripts (experiments "retention", "lm_probe")
        for name, title in (("RETENTION.md", "Retention: what a gene keeps of the source (issue 11)"),
                            ("LM_PROBE.md", "LM probe: does retention turn into better targets? (issue 11)")):
            part = self.out_dir / name
            if part.is_file():
                body = part.read_text(encoding="utf-8").split("\n", 1)[1].replace("\n## ", "\n### ")
                lines += [f"## {title}", body.strip(), ""]
        lines += self._downstream_section()
        if any(r["experiment"] in UNITE_EXPERIMENTS for r in self.runs):
            lines += ["## Downstream ablations (earlier runs, few eval examples; the intervals above supersede them)", ""]
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
        lines += self._masa_section() + self._xpert_section()
        return "\n".join(_with_verdict_summary(lines)) + "\n"

    def _downstream_section(self) -> list[str]:
        """Per target depth: accuracy per task and init, and paired bootstrap intervals of each variant
        (oracle, refit, kept, paper) minus copy-only and minus random, per task and pooled over the tasks'
        examples. The oracle (the source's own first N layers) bounds what any gene can show, so each
        depth's oracle verdict comes first: where even it does not beat copy-only, no gene's value can show."""
        from unite_hf.evaluation import paired_difference

        runs = [r for r in self.runs if r["experiment"] == "downstream" and "correct" in r]
        if not runs:
            return []
        p = self.profile

        def depth_of(r: dict[str, Any]) -> int:
            return r.get("depth", p.layers)  # runs stored before depths were recorded ran at the profile's depth

        ran = {depth_of(r) for r in runs}
        depths = [d for d in dict.fromkeys([*(p.downstream_depths or [p.layers]), *sorted(ran)]) if d in ran]
        tasks = [t for t in dict.fromkeys([*p.downstream_tasks, *(r["task"] for r in runs)])
                 if any(r["task"] == t for r in runs)]
        labels = [label for label in DOWNSTREAM_INITS if any(r["init"] == label for r in runs)]

        def outcomes(depth: int, task: str, label: str) -> dict[int, list[int]]:
            return {r["seed"]: r["correct"] for r in runs
                    if depth_of(r) == depth and r["task"] == task and r["init"] == label}

        def interval(depth: int, a: str, b: str, task_list: list[str]):
            """(difference, tasks pooled, seeds) over the tasks both inits ran with a common seed."""
            task_list = [t for t in task_list if set(outcomes(depth, t, a)) & set(outcomes(depth, t, b))]
            if not task_list:
                return None
            seeds = sorted(set.intersection(*(set(outcomes(depth, t, a)) & set(outcomes(depth, t, b)) for t in task_list)))
            # pooled: the tasks' examples side by side, each seed's outcomes concatenated in task order
            pa = [sum((outcomes(depth, t, a)[s] for t in task_list), []) for s in seeds]
            pb = [sum((outcomes(depth, t, b)[s] for t in task_list), []) for s in seeds]
            return paired_difference(pa, pb), task_list, seeds

        def cell(found) -> str:
            if found is None:
                return "-"
            d = found[0]
            mark = " **confirmed**" if d.confirmed else ""
            return f"{100 * d.difference:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]{mark}"

        def verdict(found) -> str:
            d = found[0]
            return "confirmed" if d.low > 0 else ("contradicted" if d.high < 0 else "not confirmed")

        def scope(found) -> str:
            _, pooled_tasks, seeds = found
            what = "all tasks" if len(pooled_tasks) == len(tasks) else f"{len(pooled_tasks)} tasks ({', '.join(pooled_tasks)})"
            return f"pooled over {what}, seeds {seeds}"

        pairs = [(a, b) for b in ("copy-only", "random") if b in labels for a in DOWNSTREAM_VARIANTS if a in labels]
        examples = {t: len(next(r["correct"] for r in runs if r["task"] == t)) for t in tasks}
        seeds = sorted({r["seed"] for r in runs})
        refit = self.meta.get("refit_gene", {})
        described = {
            "oracle": "the source's own first N decoder layers (every expert and router) with a fresh task head: "
                      "not a gene, the upper bound no gene can beat",
            "refit": f"concat/tucker_hidden gene at budget {refit.get('budget', p.refit_budget)} of the routed experts' "
                     f"parameters, FFNs ridge-refitted to the source's routed output on "
                     f"{refit.get('num_sequences', p.refit_sequences)} x {refit.get('seq_len', p.seq_len)} tokens "
                     f"(extraction {refit.get('seconds', '?')} s), grown at the gene's own ranks, unite {{'core_init': 'tucker'}}",
        }
        inits = "; ".join(f"`{label}` = " + described.get(label, f"{DOWNSTREAM_INITS[label][0]} gene, {DOWNSTREAM_INITS[label][1]}"
                                                          + (f" {DOWNSTREAM_INITS[label][2]}" if DOWNSTREAM_INITS[label][2] else ""))
                          for label in labels)
        lines = ["## Downstream with intervals (issues 11 and 20)", "",
                 f"Targets: depths {depths}, rank {p.rank} (refit: the gene's ranks), fine-tuned on {p.train_examples} "
                 f"examples, {p.epochs} epochs, seeds {seeds}. Scored on " + ("full files: " if p.downstream_eval_examples is None else
                                                 f"at most {p.downstream_eval_examples} examples of: ")
                 + ", ".join(f"{t} {EVAL_SPLITS.get(t, 'validation')} ({examples[t]})" for t in tasks)
                 + f". Inits: {inits}. Intervals: paired bootstrap 95% (examples resampled, each init's outcomes averaged "
                   "over its seeds first; *confirmed* = the interval excludes 0 above it, *contradicted* = below it).", ""]
        if "oracle" in labels and "copy-only" in labels:  # first: can this benchmark show a gene's value at all?
            lines += ["What the benchmark can show (the oracle against copy-only, per depth):", ""]
            for depth in depths:
                found = interval(depth, "oracle", "copy-only", tasks)
                if found is None:
                    continue
                if verdict(found) == "confirmed":
                    lines.append(f"- Depth {depth}: the oracle beats copy-only by {cell(found).replace(' **confirmed**', '')} "
                                 f"points ({scope(found)}): **confirmed**; a gene's value can show at this depth.")
                else:
                    lines.append(f"- Depth {depth}: even the oracle (the source's own first {depth} layers) does not beat "
                                 f"copy-only: {cell(found)} points ({scope(found)}): **{verdict(found)}**; this benchmark "
                                 f"cannot show any gene's value at depth {depth}, and its gene verdicts below decide nothing.")
            lines.append("")
        for depth in depths:
            lines += [f"### Depth {depth}" + (" (the paper's target depth)" if depth == p.layers else ""), "",
                      "Accuracy (%), mean ± std over seeds:", "",
                      "| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
            for task in tasks:
                cells = [[r["accuracy"] for r in runs if depth_of(r) == depth and r["task"] == task and r["init"] == label]
                         for label in labels]
                lines.append(f"| {task} | " + " | ".join(_fmt(v) if v else "-" for v in cells) + " |")
            lines += ["", "Differences in points with paired bootstrap 95% intervals:", "",
                      "| task | " + " | ".join(f"{a} - {b}" for a, b in pairs) + " |", "|---|" + "---|" * len(pairs)]
            for task in tasks:
                lines.append(f"| {task} | " + " | ".join(cell(interval(depth, a, b, [task])) for a, b in pairs) + " |")
            pooled = {pair: interval(depth, *pair, tasks) for pair in pairs}
            lines += ["| **all tasks pooled** | " + " | ".join(cell(pooled[pair]) for pair in pairs) + " |", ""]
            for (a, b), found in pooled.items():
                if found is not None and a != "oracle":
                    lines.append(f"- Depth {depth}, {a} - {b}: {cell(found).replace(' **confirmed**', '')} points "
                                 f"({scope(found)}): **{verdict(found)}**.")
            lines.append("")
        return lines

    def _task_table(self, experiment: str, labels: list[str], **match: Any) -> tuple[list[str], dict[str, float]]:
        """Rows task x label (mean ± std over seeds) and each label's mean over tasks; ``match`` filters runs."""
        lines = ["| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        means: dict[str, list[float]] = {label: [] for label in labels}
        for task in self.profile.tasks:
            cells = []
            for label in labels:
                values = self._values(experiment, task=task, init=label, **match)
                cells.append(_fmt(values) if values else "-")
                if values:
                    means[label].append(statistics.fmean(values))
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        overall = {label: statistics.fmean(v) for label, v in means.items() if v}
        lines.append("| **mean** | " + " | ".join(f"**{100 * overall[l]:.1f}**" if l in overall else "-" for l in labels) + " |")
        return lines, overall

    def _noise(self, experiment: str) -> float:
        groups: dict[tuple[str, str], list[float]] = {}
        for r in self.runs:
            if r["experiment"] == experiment:
                groups.setdefault((r["task"], r["init"]), []).append(r["accuracy"])
        return max([statistics.pstdev(v) for v in groups.values() if len(v) > 1] or [0.01])

    def _masa_section(self) -> list[str]:
        if not any(r["experiment"] == "masa" for r in self.runs):
            return []
        p, meta = self.profile, self.meta
        lines = ["## MASA: gene matrices into plain Llama targets (issue 6)", "",
                 f"Genes: rank {p.masa_rank}, aligned on {p.masa_tokens} tokens of local WikiText-2 + SimpleBooks "
                 f"(the paper: 4M to 10M tokens of RedPajama). Dense source: its own FFNs; MoE form: its most "
                 f"frequently routed expert per layer. Targets: {p.layers}-layer `LlamaForSequenceClassification`, "
                 f"hidden {' and '.join(map(str, p.widths))}, intermediate 8/3 of that; embeddings and attention are "
                 f"random for every init, so each (gene, width) is continued-pretrained for {p.pretrain_tokens} tokens "
                 f"(the paper: 2B to 10B) and every task and seed starts from that checkpoint. Same tasks, examples, "
                 f"epochs and learning rate as UNITE.", ""]
        genes = meta.get("masa_genes", {})
        if genes:
            lines += ["| gene | λ | tokens | seconds | output error at start (gate/up/down) | after alignment | spectral gap |",
                      "|---|---|---|---|---|---|---|"]
            for key, g in genes.items():
                def triple(d):
                    return "/".join(f"{d.get(k, float('nan')):.4f}" for k in ("gate", "up", "down"))
                lines.append(f"| {key} | {g['spectral_weight']} | {g['tokens']} | {g['seconds']} | "
                             f"{triple(g['initial_output_error'])} | {triple(g['final_output_error'])} | "
                             f"{triple(g['final_spectral_error'])} |")
            lines.append("")
        for width in p.widths:
            labels = ["masa-dense", "masa-moe", "random"]
            if not self._values("masa", width=width):
                continue
            table, overall = self._task_table("masa", labels, width=width)
            noise = self._noise("masa")
            lines += [f"### Width {width}", "", *table, ""]
            if "random" in overall:
                for label in ("masa-dense", "masa-moe"):
                    if label in overall:
                        gap = overall[label] - overall["random"]
                        verdict = "inconclusive (within seed noise)" if abs(gap) < noise else (
                            "confirmed" if gap > 0 else "contradicted")
                        lines.append(f"- {label} - random: {100 * gap:+.1f} points (noise {100 * noise:.1f}): **{verdict}**.")
                lines.append("")
        ablation = [r for r in self.runs if r["experiment"] == "masa_ablation"]
        if ablation:
            width = max(p.widths)
            full = [r["accuracy"] for r in self.runs if r["experiment"] == "masa" and r["init"] == "masa-dense"
                    and r["task"] == p.ablation_task and r.get("width") == width]
            lines += [f"### Ablations ({p.ablation_task}, width {width}, dense source)", "", "| variant | accuracy |",
                      "|---|---|", f"| MASA (spectral alignment + adaptive scaling) | {_fmt(full) if full else '-'} |"]
            for label in ("no spectral", "truncate/pad"):
                values = self._values("masa_ablation", init=label)
                if values:
                    lines.append(f"| {label} | {_fmt(values)} |")
            lines.append("")
        pretrain = meta.get("pretrain", {})
        if pretrain:
            lines += ["Continued pretraining (causal-LM loss, first and last tenth of the steps): " + "; ".join(
                f"{key} {v['loss_start']} -> {v['loss_end']}" for key, v in pretrain.items()), ""]
        lines += self._masa_findings()
        return lines

    def _masa_findings(self) -> list[str]:
        """What the MASA numbers say, computed from them."""
        genes, pretrain = self.meta.get("masa_genes", {}), self.meta.get("pretrain", {})
        lines = ["### What the numbers say", ""]
        dense = genes.get("masa/dense")
        if dense:
            start, end = (statistics.fmean(dense[k].values()) for k in ("initial_output_error", "final_output_error"))
            shape = dense.get("source_widths", {}).get("up")
            lines.append(f"- The gene matrices explain almost none of the FFN outputs: relative output error "
                         f"{start:.3f} at the closed-form start and {end:.3f} after alignment (dense source). One "
                         f"{dense['rank']} x {dense['rank']} matrix repeated along the block diagonal, `(P ⊗ M)`, cannot "
                         f"express {'a ' + ' x '.join(map(str, shape)) if shape else 'a full'} FFN weight. The alignment "
                         f"budget here is {4_000_000 // max(dense['tokens'], 1)}x below the paper's smallest, but the error "
                         f"barely moves over the steps that were run.")
        nospectral = genes.get("masa/dense-nospectral")
        if dense and nospectral:
            out_on, out_off = (statistics.fmean(g["final_output_error"].values()) for g in (dense, nospectral))
            gap_on, gap_off = (statistics.fmean(g["final_spectral_error"].values()) for g in (dense, nospectral))
            lines.append(f"- The two terms pull apart: with λ = 0 the output error ends at {out_off:.4f} (vs {out_on:.4f}) "
                         f"and the log-spectral gap at {gap_off:.2f} (vs {gap_on:.2f}). W's top-r singular values sit "
                         f"far above those of the output-optimal M, so matching them costs output fit.")
        for width in self.profile.widths:
            ours, base = pretrain.get(f"masa-dense-w{width}"), pretrain.get(f"random-w{width}")
            if ours and base:
                lines.append(f"- After the same continued pretraining, the MASA-initialised Llama (width {width}) has a "
                             f"{'higher' if ours['loss_end'] > base['loss_end'] else 'lower'} LM loss than the random one "
                             f"({ours['loss_end']} vs {base['loss_end']}): the scaled gene matrices "
                             f"{'slow' if ours['loss_end'] > base['loss_end'] else 'help'} early language modelling.")
        lines += ["- Task accuracy: every MASA - random gap above is within the seed-to-seed spread; the paper's gains "
                  "do not show at this scale (2-layer targets, 16k pretraining tokens, 400 examples per task).", ""]
        return lines

    def _xpert_section(self) -> list[str]:
        if not any(r["experiment"] == "xpert" for r in self.runs):
            return []
        p, meta = self.profile, self.meta
        small = min(p.widths)
        analysis = meta.get("xpert_analysis", {})
        lines = ["## XPERT: common experts, consolidated and reused across scales (issue 7)", "",
                 f"Routing analysis (inference only, {meta.get('analysis_seconds', '?')} s) over the domains "
                 f"{analysis.get('domains')} ({p.analysis_sequences} x {p.seq_len} tokens each); commonality = "
                 f"`min_frequency` (E x the expert's smallest routing share over domains); k = {p.xpert_k} experts "
                 f"per layer. Heat map and JSON report: `benchmarks/xpert_analysis/`. The k experts of all layers are "
                 f"stacked and Tucker-decomposed (ranks ({p.xpert_k} L, {p.gene_rank[1]}, {p.gene_rank[2]})). Source "
                 f"width: UNITE-style {p.layers}-layer targets at rank {p.rank}, random cores, against the same "
                 f"architecture with random weights. Width {small}: plain Llama targets (the common experts side by "
                 f"side, brought to size by coupled scaling: one neuron set for gate, up and down) against a random Llama, "
                 f"both continued-pretrained "
                 f"for {p.pretrain_tokens} tokens.", ""]
        genes = meta.get("xpert_genes", {})
        if genes:
            lines += ["| selection | experts per layer (first 6 layers) | rel. error up |", "|---|---|---|"]
            for strategy, g in genes.items():
                lines.append(f"| {strategy} | {g['selected_experts'][:6]} | {g['relative_error'].get('up', float('nan')):.4f} |")
            lines.append("")
        labels = ["xpert", "random", f"xpert-llama-w{small}", f"random-llama-w{small}"]
        table, overall = self._task_table("xpert", labels)
        noise = self._noise("xpert")
        lines += table + [""]
        for ours, baseline in ((labels[0], labels[1]), (labels[2], labels[3])):
            if ours in overall and baseline in overall:
                gap = overall[ours] - overall[baseline]
                verdict = "inconclusive (within seed noise)" if abs(gap) < noise else ("confirmed" if gap > 0 else "contradicted")
                lines.append(f"- {ours} - {baseline}: {100 * gap:+.1f} points (noise {100 * noise:.1f}): **{verdict}**.")
        lines.append("")
        common = self._values("xpert", task=p.ablation_task, init="xpert")
        lines += [f"### Control: which experts ({p.ablation_task}, source width, same k, ranks and schedule)", "",
                  "| experts | accuracy |", "|---|---|", f"| common | {_fmt(common) if common else '-'} |"]
        for label in ("random experts", "least experts"):
            values = self._values("xpert_control", init=label)
            if values:
                lines.append(f"| {label.split()[0]} | {_fmt(values)} |")
        lines += ["", "### Convergence: mean accuracy after each epoch, all tasks", "",
                  "| init | " + " | ".join(f"epoch {i + 1}" for i in range(p.epochs)) + " |", "|---|" + "---|" * p.epochs]
        for label in labels:
            runs = [r["accuracy_per_epoch"] for r in self.runs if r["experiment"] == "xpert" and r["init"] == label]
            if runs:
                curve = [statistics.fmean(epoch) for epoch in zip(*runs)]
                lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in curve) + " |")
        lines += ["", "![XPERT convergence](xpert_convergence.png)", ""]
        genes = meta.get("xpert_genes", {})
        if genes:
            errors = {s: g["relative_error"].get("up", float("nan")) for s, g in genes.items()}
            lines += ["### What the numbers say", "",
                      f"- Consolidation error (up projection) is about the same whichever experts are stacked: "
                      + ", ".join(f"{s} {e:.3f}" for s, e in errors.items()) + ". The source is SmolLM2 moefied by "
                      "splitting each dense FFN into balanced neuron groups, so its experts are alike by construction "
                      "and routing spreads evenly; a natively trained MoE is where common experts can differ.",
                      "- The controls (common vs random vs least-used experts, same count, ranks and schedule) and "
                      "the gaps to random init are compared against the seed spread above; a gap smaller than the "
                      "spread decides nothing.", ""]
        return lines

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
        xpert = {}
        for r in self.runs:
            if r["experiment"] == "xpert":
                xpert.setdefault(r["init"], []).append(r["accuracy_per_epoch"])
        if xpert:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for label, runs in xpert.items():
                mean = [statistics.fmean(e) for e in zip(*runs)]
                ax.plot(range(1, len(mean) + 1), [100 * v for v in mean], marker="o", label=label)
            ax.set(xlabel="epoch", ylabel="accuracy (%)", title="XPERT convergence (mean over tasks and seeds)")
            ax.legend(fontsize=7)
            path = self.out_dir / "xpert_convergence.png"
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


VERDICT_WORDS = ("**confirmed", "**not confirmed", "**contradicted", "**inconclusive", "**met", "**not met",
                 "**not reached", "**separated", "**NOT separated")


def _command_details(command: dict[str, Any]) -> str:
    """Minutes per part, the machine's 1-minute load average at the start and the end (2 cores: above
    about 1, other jobs shared them) and any note, for a command of the reproduce list."""
    details = []
    if len(command.get("parts") or {}) > 1:
        details.append(", ".join(f"{name} {minutes} min" for name, minutes in command["parts"].items()))
    if command.get("load_average"):
        start, end = command["load_average"]
        details.append(f"load average {start} at the start, {end} at the end")
    if command.get("note"):
        details.append(command["note"])
    return f" ({'; '.join(details)})" if details else ""


def _with_verdict_summary(lines: list[str]) -> list[str]:
    """The report with a "Claims and verdicts" list after its reproduce block: every line of the body
    that states a verdict in bold, under the heading of its section, so each claim is read in one place."""
    lines = "\n".join(lines).split("\n")  # included files arrive as one multi-line entry
    summary, heading = [], ""
    for line in lines:
        if line.startswith("## ") or line.startswith("### "):
            heading = line.lstrip("#").strip()
        elif not line.startswith("|") and any(word in line for word in VERDICT_WORDS):  # not table cells
            summary.append(f"- *{heading}*: {line.lstrip('- ').strip()}")
    if not summary:
        return lines
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    return [*lines[:at], "## Claims and verdicts (each is detailed in its section below)", "", *summary, "",
            *lines[at:]]


# experiments run by scripts of the repository's benchmarks/ folder (a source checkout): name -> the commands,
# run in order; each writes its JSON, the last renders the part's markdown (included in RESULTS.md)
_RETENTION_JSONS = ["benchmarks/retention_moefied.json", "benchmarks/retention_native.json",
                    "benchmarks/retention_upcycled.json"]
SCRIPT_EXPERIMENTS = {
    "retention": [  # the grid of RETENTION.md's table
        ["benchmarks/bench_retention.py", "--sources", "moefied", "--variants", "paper", "hidden", "aligned+hidden",
         "concat+hidden", "--json", _RETENTION_JSONS[0]],
        ["benchmarks/bench_retention.py", "--sources", "native", "--json", _RETENTION_JSONS[1]],
        # upcycled: no activation-aware cell (concat+hidden+aa was killed at 23 GB, this machine's memory)
        ["benchmarks/bench_retention.py", "--sources", "upcycled", "--variants", "paper", "hidden", "aligned+hidden",
         "concat+hidden", "--ranks", "256", "576", "--fisher-sequences", "8", "--json", _RETENTION_JSONS[2]],
        ["benchmarks/bench_retention.py", "--report-only", "--json", *_RETENTION_JSONS,
         "--markdown", "benchmarks/RETENTION.md"],
    ],
    "lm_probe": [
        ["benchmarks/bench_lm_probe.py", "--source", "native", "--rank", "256", "--json", "benchmarks/lm_probe_native.json"],
        ["benchmarks/bench_lm_probe.py", "--report-only", "--json", "benchmarks/lm_probe_native.json"],
    ],
}
# with --tiny (plumbing only): each script once on its tiny random source, written under the work folder
TINY_SCRIPT_EXPERIMENTS = {
    "retention": [["benchmarks/bench_retention.py", "--tiny", "--sources", "moefied", "--ranks", "8", "16",
                   "--fisher-sequences", "2", "--seq-len", "16", "--num-windows", "2", "--retention-seq-len", "16",
                   "--json", "{work_dir}/retention_tiny.json"]],
    "lm_probe": [["benchmarks/bench_lm_probe.py", "--tiny", "--seeds", "0", "--steps", "2", "--eval-every", "1",
                  "--rank", "8", "--train-windows", "8", "--held-out-windows", "2", "--seq-len", "16",
                  "--fisher-sequences", "2", "--json", "{work_dir}/lm_probe_tiny.json",
                  "--markdown", "{work_dir}/LM_PROBE_tiny.md", "--work-dir", "{work_dir}/lm_probe_tiny"]],
}
DEFAULT_EXPERIMENTS = (*UNITE_EXPERIMENTS, "downstream", "masa", "xpert")  # the scripts run when named
EXPERIMENTS = (*DEFAULT_EXPERIMENTS, *SCRIPT_EXPERIMENTS)


def _run_script_experiment(name: str, tiny: bool, work_dir: Path = Path("runs/bench")) -> None:
    """Run the commands of one of :data:`SCRIPT_EXPERIMENTS` (:data:`TINY_SCRIPT_EXPERIMENTS` with
    ``tiny``) from the repository root (they need ``tools/`` and ``benchmarks/``, which are not
    installed with the library)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    commands = (TINY_SCRIPT_EXPERIMENTS if tiny else SCRIPT_EXPERIMENTS)[name]
    for command in commands:
        if not (root / command[0]).is_file():
            raise ValueError(f"experiment {name!r} runs {command[0]} of a source checkout of unite_hf; "
                             f"{root / command[0]} does not exist (installed from a wheel?)")
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for command in commands:
        command = [arg.format(work_dir=work) for arg in command]
        print(f"bench: {name}: {' '.join(command)}", flush=True)
        subprocess.run([sys.executable, *command], cwd=root, check=True)


TRANSFER_RUNS = {"masa": ("masa", "masa_ablation"), "xpert": ("xpert", "xpert_control")}


def run_bench(out_dir: str | os.PathLike = "benchmarks", profile: str = "full", *, work_dir: str | os.PathLike = "runs/bench",
              experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS, tiny: bool = False, command: str = "unite-hf bench",
              report_only: bool = False, source_path: str | os.PathLike | None = None) -> Path:
    """Run the experiments and write ``RESULTS.md``, ``results.json`` and PNG plots to ``out_dir``.
    ``report_only`` re-renders them from the stored ``results.json`` without running anything.
    ``source_path``: a built native source folder, loaded as it is (not rebuilt when a cache key changed)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    unknown = set(experiments) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; choose from {EXPERIMENTS}")
    started = time.perf_counter()
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(out_dir, PROFILES[profile], work_dir, tiny)
    bench.source_path = source_path
    rerun = {name for e in experiments for name in TRANSFER_RUNS.get(e, (e,))}
    stored = out_dir / "results.json"
    same = False
    if stored.is_file():  # keep the other experiments' runs, so RESULTS.md reports them all
        previous = json.loads(stored.read_text())
        # fields added to the profile since (with their defaults) do not invalidate the stored runs
        current, before = json.loads(json.dumps(asdict(PROFILES[profile]))), previous.get("profile", {})
        same = (set(before) <= set(current) and all(current[k] == v for k, v in before.items())
                and previous.get("tiny", False) == tiny)
        if same and not report_only:
            bench.runs = [r for r in previous["runs"] if r["experiment"] not in rerun]
            bench.meta = previous.get("meta", {})
            bench.meta["commands"] = [c for c in bench.meta.get("commands", []) if not set(c["experiments"]) <= set(experiments)]
        elif not report_only:
            warnings.warn(f"{stored} holds runs of another profile or source; they are replaced, not merged",
                          UserWarning, stacklevel=2)
    if report_only:
        if not stored.is_file() or not same:
            raise ValueError(f"nothing to re-render: {stored} is missing or holds another profile")
        bench.runs, bench.meta, bench.source_name = previous["runs"], previous.get("meta", {}), previous["source"]
        collected = bench.collect_finished()  # runs of an interrupted resumable experiment join the report
        if collected:
            bench.meta.setdefault("commands", []).append(
                {"command": f"unite-hf bench --profile {profile} --work-dir {work_dir} --experiments {' '.join(collected)}",
                 "experiments": collected, "minutes": None})
    else:
        load_at_start, parts = round(os.getloadavg()[0], 1), {}
        for name in experiments:
            if name in SCRIPT_EXPERIMENTS:
                part_started = time.perf_counter()
                _run_script_experiment(name, tiny, work_dir)
                parts[name] = round((time.perf_counter() - part_started) / 60, 1)
        in_process = [e for e in experiments if e not in SCRIPT_EXPERIMENTS]
        if in_process:
            part_started = time.perf_counter()
            bench.prepare(in_process)
            bench.run_all(in_process)
            parts[" ".join(in_process)] = round((time.perf_counter() - part_started) / 60, 1)
        elif stored.is_file() and same:  # only scripts ran: re-render with the stored runs
            bench.runs, bench.meta, bench.source_name = previous["runs"], previous.get("meta", {}), previous["source"]
        else:
            bench.source_name = "(no in-process experiment run)"
        seconds = time.perf_counter() - started
        bench.meta.setdefault("commands", []).append({"command": command, "experiments": list(experiments),
                                                      "minutes": round(seconds / 60), "parts": parts,
                                                      "load_average": [load_at_start, round(os.getloadavg()[0], 1)]})
    bench.plots()
    atomic_write_json({"profile": asdict(PROFILES[profile]), "tiny": tiny, "source": bench.source_name, "meta": bench.meta,
                       "runs": bench.runs}, stored)
    report = out_dir / "RESULTS.md"
    atomic_write_text(bench.report(), report)
    return report
