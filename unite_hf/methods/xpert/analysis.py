"""Cross-domain expert activation analysis (XPERT, part 1): which experts are used in every domain.

XPERT starts from inference-only routing statistics: run the MoE over several domains (general text,
books, science questions, sentiment, ...) and find the experts that the router picks everywhere. Those
"common" experts are the candidates for the transferable knowledge; the others are domain specialists.

For ``D`` domains, ``L`` MoE layers and ``E`` experts per layer the analysis records

- ``frequency[d, l, e]``: the share of layer ``l``'s top-k hits (routed ``(token, slot)`` pairs) that
  went to expert ``e`` on domain ``d``; every ``(d, l)`` row sums to 1 (uniform routing gives ``1/E``).
  Equivalently, hits per token divided by ``k``.
- ``router_mass[d, l, e]``: the mean router weight expert ``e`` receives per token, i.e. the sum over
  tokens of the routing weight its output is scaled by (0 when not picked) divided by the number of
  tokens. With renormalised top-k weights (Mixtral) each ``(d, l)`` row sums to 1; without (Qwen3-MoE,
  OLMoE) to the top-k probability mass; DeepSeek-V3 includes its ``routed_scaling_factor``.
- ``commonality[l, e]``: a score from :data:`COMMONALITY_SCORES` (see there for the exact definitions),
  and ``common_experts[l]``: the experts selected by ``k_common`` or ``threshold`` on that score.

Routing is counted by :func:`unite_hf.importance.compute_expert_importance` with ``fisher=False`` (the
same probe the Fisher pass uses), so every expert layout it reads works here, with no gradients and
no labels.

Example::

    analysis = analyze_experts(model, tokenizer=tokenizer)      # DEFAULT_DOMAINS
    analysis.save("analysis/")                                  # expert_analysis.json + expert_heatmap.png
    random_control = select_experts(analysis, "random", k=2, seed=0)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...calibration import CalibrationSet, find_local_data_dir, load_calibration
from ...importance import compute_expert_importance
from ...io import json_bytes, write_folder_atomically
from ...sources import get_source
from ..common import check_seq_len
from .config import DEFAULT_DOMAINS  # one default: XPERT's config (torch-free, read by the CLI)

__all__ = [
    "ANALYSIS_FILE", "BUILTIN_DOMAINS", "COMMONALITY_SCORES", "DEFAULT_DOMAINS", "HEATMAP_FILE", "SELECTION_STRATEGIES",
    "ExpertAnalysis", "add_arguments", "analyze_experts", "commonality_scores", "domain_texts", "rank_experts",
    "register_domain", "register_score", "run", "select_common_experts", "select_experts",
]


ANALYSIS_FILE = "expert_analysis.json"
HEATMAP_FILE = "expert_heatmap.png"
FORMAT_VERSION = 1
MAX_HEATMAP_PANELS = 12
"""Sources with more MoE layers get this many evenly spaced layers in the heat map (named in its title)."""


# --------------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------------
BUILTIN_DOMAINS: dict[str, Callable[[], list[str]]] = {}
"""Built-in domain name -> reader of its documents, from the task files under ``$UNITE_HF_DATA_DIR``
(the Hub when it is unset or the files are missing) through :func:`unite_hf.training.tasks.load_task`.
Names not here (``"wikitext2"``, ``"simplebooks"``, files, Hub ids) go to
:func:`~unite_hf.calibration.load_calibration`."""


def register_domain(name: str) -> Callable[[Callable[[], list[str]]], Callable[[], list[str]]]:
    """Decorator: make ``reader() -> list[str]`` a built-in domain called ``name``."""
    def decorator(reader: Callable[[], list[str]]) -> Callable[[], list[str]]:
        BUILTIN_DOMAINS[name] = reader
        return reader
    return decorator


def _task_columns(task: str, split: str = "train") -> tuple[list[str], list[list[str]], list[int]]:
    """(contexts, choices, labels) of one task split; the train split, so benchmark evaluation sets stay unseen."""
    # datasets/pyarrow are slow to import: only when a task domain is used
    from ...training.tasks import load_task

    table = load_task(task, split).dataset.with_format("arrow")[:]
    return (table["context"].to_pylist(), table["choices"].to_pylist(), table["label"].to_pylist())


def _questions_with_answers(task: str) -> list[str]:
    """Multiple-choice items as the text a reader sees when the item is answered: ``"{question} {answer}"``."""
    contexts, choices, labels = _task_columns(task)
    return [f"{c} {opts[label]}" if 0 <= label < len(opts) else c for c, opts, label in zip(contexts, choices, labels)]


def _contexts(task: str) -> list[str]:
    return _task_columns(task)[0]


def _openbook_facts() -> list[str]:
    """OpenBookQA's 1,326 science facts (``openbook.txt``, one quoted fact per line), when present locally."""
    data_dir = find_local_data_dir()
    path = None if data_dir is None else data_dir / "openbookqa" / "openbook.txt"
    if path is None or not path.is_file():
        return []
    return [line.strip().strip('"') for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@register_domain("openbookqa")
def _openbookqa() -> list[str]:
    """Question stems with their right answers, plus the book of facts."""
    return _questions_with_answers("openbookqa") + _openbook_facts()


@register_domain("arc_easy")
def _arc_easy() -> list[str]:
    return _questions_with_answers("arc_easy")


@register_domain("arc_challenge")
def _arc_challenge() -> list[str]:
    return _questions_with_answers("arc_challenge")


@register_domain("arc")
def _arc() -> list[str]:
    """ARC-Easy and ARC-Challenge together."""
    return _arc_easy() + _arc_challenge()


@register_domain("piqa")
def _piqa() -> list[str]:
    """Physical goals with their right solutions."""
    return _questions_with_answers("piqa")


@register_domain("sst2")
def _sst2() -> list[str]:
    """Movie-review sentences."""
    return _contexts("sst2")


@register_domain("rte")
def _rte() -> list[str]:
    """Premise and hypothesis pairs."""
    return _contexts("rte")


@register_domain("boolq")
def _boolq() -> list[str]:
    """Wikipedia passages (the normalised context is ``"Passage: ...\\nQuestion: ...?"``); each once."""
    passages = [c.split("\nQuestion:")[0].removeprefix("Passage:").strip() for c in _contexts("boolq")]
    return list(dict.fromkeys(passages))


def domain_texts(name: str) -> list[str]:
    """The documents of a built-in domain (see :data:`BUILTIN_DOMAINS`)."""
    if name not in BUILTIN_DOMAINS:
        raise ValueError(f"unknown built-in domain {name!r}; built-in domains: {sorted(BUILTIN_DOMAINS)}")
    return BUILTIN_DOMAINS[name]()


def _normalize_domains(domains: Mapping[str, Any] | Sequence[str]) -> dict[str, Any]:
    """name -> corpus; a bare name stands for itself (a built-in domain, an alias, a file or a Hub id)."""
    if isinstance(domains, Mapping):
        named = dict(domains)
    elif isinstance(domains, (str, os.PathLike)):
        named = {os.fspath(domains): domains}
    else:
        names = [os.fspath(d) for d in domains]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"domains {duplicates} are given more than once")
        named = dict(zip(names, domains))
    if not named:
        raise ValueError("no domains given; pass at least two (e.g. DEFAULT_DOMAINS)")
    return named


def _load_domain(name: str, corpus: Any, tokenizer: Any, *, num_sequences: int, seq_len: int, seed: int,
                 vocab_size: int, show_progress: bool) -> CalibrationSet:
    """One domain as token windows; every failure names the domain."""
    builtin = corpus if isinstance(corpus, str) and corpus in BUILTIN_DOMAINS else None
    try:
        texts = domain_texts(builtin) if builtin else corpus
        calib = load_calibration(texts, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                 show_progress=show_progress)
    except (FileNotFoundError, TypeError, ValueError) as err:
        kind = next(cls for cls in (FileNotFoundError, TypeError, ValueError) if isinstance(err, cls))
        raise kind(f"domain {name!r}: {err}") from err
    if builtin:
        calib.name = f"{builtin} (built-in domain: task train split)"
    top = int(calib.input_ids.max())
    if top >= vocab_size:
        raise ValueError(f"domain {name!r}: token id {top} is outside the model's vocabulary ({vocab_size}); "
                         "wrong tokenizer?")
    return calib


# --------------------------------------------------------------------------------------------------
# Commonality scores
# --------------------------------------------------------------------------------------------------
CommonalityScore = Callable[[torch.Tensor, "torch.Tensor | None", int], torch.Tensor]

COMMONALITY_SCORES: dict[str, CommonalityScore] = {}
"""name -> ``score(frequency [D, L, E], router_mass [D, L, E] or None, top_m) -> [L, E]``; higher is
more common. Definitions (``f = frequency``, rows summing to 1, ``E`` experts, ``D`` domains):

- ``"min_frequency"``: ``E * min_d f[d, l, e]``, the expert's routing share in its least favourable
  domain in units of the uniform share ``1/E`` (equivalently hits per token over ``k/E``). 1 means "at
  least a fair share in every domain", 0 means "never picked in some domain".
- ``"top_m_fraction"``: ``(1/D) * #{d : e is among the top_m experts of f[d, l, :]}``, the fraction of
  domains in which the expert is one of the layer's ``top_m`` most frequently routed experts. Within a
  domain, ties are broken toward the lower expert index (a stable sort).
- ``"min_router_mass"``: ``min_d router_mass[d, l, e] * E / sum_e' router_mass[d, l, e']``, like
  ``min_frequency`` but on the router weight the expert receives rather than on hit counts.

When experts are ranked on a score (:func:`rank_experts`), ties are broken by the mean frequency over
domains (higher first), then by the lower expert index.
"""


def register_score(name: str) -> Callable[[CommonalityScore], CommonalityScore]:
    """Decorator: add a commonality score to :data:`COMMONALITY_SCORES`."""
    def decorator(score: CommonalityScore) -> CommonalityScore:
        COMMONALITY_SCORES[name] = score
        return score
    return decorator


@register_score("min_frequency")
def _min_frequency(frequency: torch.Tensor, router_mass: torch.Tensor | None, top_m: int) -> torch.Tensor:
    return frequency.shape[-1] * frequency.min(dim=0).values


@register_score("top_m_fraction")
def _top_m_fraction(frequency: torch.Tensor, router_mass: torch.Tensor | None, top_m: int) -> torch.Tensor:
    order = torch.sort(frequency, dim=-1, descending=True, stable=True).indices  # [D, L, E]
    in_top = torch.zeros_like(frequency).scatter_(-1, order[..., :top_m], 1.0)
    return in_top.mean(dim=0)


@register_score("min_router_mass")
def _min_router_mass(frequency: torch.Tensor, router_mass: torch.Tensor | None, top_m: int) -> torch.Tensor:
    if router_mass is None:
        raise ValueError("score 'min_router_mass' needs router_mass, which this source's router did not provide")
    share = router_mass / router_mass.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return router_mass.shape[-1] * share.min(dim=0).values


def _check_score(score: str) -> CommonalityScore:
    if score not in COMMONALITY_SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {sorted(COMMONALITY_SCORES)}")
    return COMMONALITY_SCORES[score]


def commonality_scores(frequency: torch.Tensor, score: str = "min_frequency", *, top_m: int = 2,
                       router_mass: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[L, E]`` commonality of every expert from ``[D, L, E]`` statistics (see :data:`COMMONALITY_SCORES`)."""
    fn = _check_score(score)
    if frequency.ndim != 3:
        raise ValueError(f"frequency must be [domains, layers, experts], got shape {tuple(frequency.shape)}")
    _check_count("top_m", top_m, frequency.shape[-1])
    return fn(frequency.double(), None if router_mass is None else router_mass.double(), top_m)


def rank_experts(scores: torch.Tensor, frequency: torch.Tensor) -> list[list[int]]:
    """Per layer, every expert from most to least common: ``scores`` [L, E] descending, ties by mean
    ``frequency`` [D, L, E] over domains (descending), then by expert index."""
    mean = frequency.double().mean(dim=0)
    return [sorted(range(scores.shape[1]), key=lambda e: (-float(scores[l, e]), -float(mean[l, e]), e))
            for l in range(scores.shape[0])]


def select_common_experts(scores: torch.Tensor, frequency: torch.Tensor, *, k_common: int | None = None,
                          threshold: float | None = None) -> list[list[int]]:
    """Per layer, the ``k_common`` most common experts, or every expert scoring at least ``threshold``;
    most common first. Exactly one of the two must be given."""
    if (k_common is None) == (threshold is None):
        raise ValueError("give exactly one of k_common and threshold")
    ranking = rank_experts(scores, frequency)
    if k_common is not None:
        _check_count("k_common", k_common, scores.shape[1])
        return [order[:k_common] for order in ranking]
    return [[e for e in order if float(scores[l, e]) >= threshold] for l, order in enumerate(ranking)]


def _check_count(name: str, value: Any, num_experts: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
        raise ValueError(f"{name} must be an int in [1, {num_experts}] (the number of experts), got {value!r}")


# --------------------------------------------------------------------------------------------------
# The analysis artifact
# --------------------------------------------------------------------------------------------------
@dataclass
class ExpertAnalysis:
    """Routing statistics over domains, the commonality of every expert and the common experts.

    Tensor rows follow ``domains`` and ``moe_layers``; expert lists are most common first.
    """

    domains: list[str]
    moe_layers: list[int]
    num_experts: int
    top_k: int
    tokens: list[int]  # tokens routed per domain
    frequency: torch.Tensor  # [D, L, E] float64, share of top-k hits; rows sum to 1
    router_mass: torch.Tensor | None  # [D, L, E] float64, mean router weight per token; None if unreadable
    commonality: torch.Tensor  # [L, E] float64, COMMONALITY_SCORES[score]
    score: str
    top_m: int
    common_experts: list[list[int]]
    k_common: int | None = None
    threshold: float | None = None
    domain_sources: list[str] = field(default_factory=list)  # where each domain's text came from
    source_id: str | None = None
    seed: int = 0
    seq_len: int = 0
    num_sequences: int = 0
    format_version: int = FORMAT_VERSION

    def row(self, layer: int) -> int:
        """Row of source layer ``layer`` in the tensors."""
        return self.moe_layers.index(layer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tensors become nested lists (float64 survives JSON exactly)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("frequency", "router_mass", "commonality"):
            data[name] = None if data[name] is None else data[name].tolist()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertAnalysis:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"expert analysis format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown expert analysis fields {sorted(unknown)}")
        values = dict(data)
        for name in ("frequency", "router_mass", "commonality"):
            if values.get(name) is not None:
                values[name] = torch.tensor(values[name], dtype=torch.float64)
        return cls(**values)

    def save(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write :data:`HEATMAP_FILE` and :data:`ANALYSIS_FILE` into ``directory``, replacing an earlier
        analysis there as a whole (other files of the folder are kept; see
        :func:`unite_hf.io.write_folder_atomically`)."""
        directory = Path(directory)
        paths = {"json": str(directory / ANALYSIS_FILE), "heatmap": str(directory / HEATMAP_FILE)}
        heatmap, report = self.heatmap_png(), self.to_dict()  # before the folder is touched

        def write(staging: Path) -> None:
            (staging / HEATMAP_FILE).write_bytes(heatmap)
            (staging / ANALYSIS_FILE).write_bytes(json_bytes(report))

        write_folder_atomically(directory, write, owned=lambda name: name in (ANALYSIS_FILE, HEATMAP_FILE),
                                keep_foreign=True)
        return paths

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExpertAnalysis:
        """Read a saved analysis (the folder, or the JSON file itself)."""
        path = Path(directory)
        path = path / ANALYSIS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; save an analysis there with ExpertAnalysis.save")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def heatmap_layers(self) -> list[int]:
        """The MoE layers drawn in the heat map: all, or :data:`MAX_HEATMAP_PANELS` evenly spaced ones."""
        count = len(self.moe_layers)
        if count <= MAX_HEATMAP_PANELS:
            return list(self.moe_layers)
        rows = sorted({round(i * (count - 1) / (MAX_HEATMAP_PANELS - 1)) for i in range(MAX_HEATMAP_PANELS)})
        return [self.moe_layers[r] for r in rows]

    def heatmap_png(self) -> bytes:
        """Domain x expert routing frequency per MoE layer (in units of the uniform share ``1/E``),
        common experts outlined in red, as PNG bytes. Uses the Agg canvas: no pyplot, no global backend."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        layers = self.heatmap_layers()
        num_domains, num_experts = len(self.domains), self.num_experts
        ncols = min(len(layers), 2 if num_experts > 16 else 3)
        nrows = math.ceil(len(layers) / ncols)
        fig = Figure(figsize=(ncols * max(4.0, 0.12 * num_experts + 2.5), nrows * max(1.8, 0.35 * num_domains + 1.2) + 0.8),
                     layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        relative = self.frequency * num_experts
        vmax = float(relative.max()) if relative.numel() else 1.0
        image = None
        for ax, layer in zip(axes.flat, layers):
            row = self.row(layer)
            image = ax.imshow(relative[:, row, :].numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            for expert in self.common_experts[row]:
                ax.add_patch(Rectangle((expert - 0.5, -0.5), 1, num_domains, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_yticks(range(num_domains), self.domains, fontsize=7)
            step = max(1, math.ceil(num_experts / 16))
            ax.set_xticks(range(0, num_experts, step))
            ax.tick_params(axis="x", labelsize=7)
            ax.set_xlabel("expert", fontsize=8)
        for ax in list(axes.flat)[len(layers):]:
            ax.set_visible(False)
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), label="routing frequency / (1/E)", shrink=0.8)
        shown = (f"all {len(layers)} MoE layers" if len(layers) == len(self.moe_layers)
                 else f"{len(layers)} of {len(self.moe_layers)} MoE layers, evenly spaced: {layers}")
        selection = f"k_common={self.k_common}" if self.k_common is not None else f"threshold={self.threshold}"
        fig.suptitle(f"Expert routing by domain ({shown}); red: common experts ({self.score}, {selection})",
                     fontsize=10)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Control selections for benchmarks
# --------------------------------------------------------------------------------------------------
def _select_common(analysis: ExpertAnalysis, k: int, generator: torch.Generator) -> list[list[int]]:
    return [order[:k] for order in rank_experts(analysis.commonality, analysis.frequency)]


def _select_random(analysis: ExpertAnalysis, k: int, generator: torch.Generator) -> list[list[int]]:
    return [sorted(torch.randperm(analysis.num_experts, generator=generator)[:k].tolist()) for _ in analysis.moe_layers]


def _select_least(analysis: ExpertAnalysis, k: int, generator: torch.Generator) -> list[list[int]]:
    overall = analysis.frequency.mean(dim=0)  # [L, E], every domain weighs the same
    return [torch.sort(row, stable=True).indices[:k].tolist() for row in overall]


SELECTION_STRATEGIES: dict[str, Callable[[ExpertAnalysis, int, torch.Generator], list[list[int]]]] = {
    "common": _select_common,  # top-k by commonality, most common first
    "random": _select_random,  # k distinct experts per layer from a torch.Generator seeded with `seed`, ascending
    "least": _select_least,  # the k least routed experts (mean frequency over domains), least first
}
"""Expert selections compared by the XPERT benchmark: the common experts and two controls."""


def select_experts(analysis: ExpertAnalysis, strategy: str, k: int, seed: int = 0) -> list[list[int]]:
    """``k`` experts per MoE layer (rows follow ``analysis.moe_layers``) chosen by ``strategy``, one of
    :data:`SELECTION_STRATEGIES`. ``seed`` only matters for ``"random"``, which is reproducible."""
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {sorted(SELECTION_STRATEGIES)}")
    _check_count("k", k, analysis.num_experts)
    return SELECTION_STRATEGIES[strategy](analysis, k, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The analysis pass
# --------------------------------------------------------------------------------------------------
def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def analyze_experts(
    model: nn.Module,
    domains: Mapping[str, Any] | Sequence[str] = DEFAULT_DOMAINS,
    tokenizer: Any = None,
    *,
    num_sequences: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 4,
    score: str = "min_frequency",
    k_common: int | None = None,
    threshold: float | None = None,
    top_m: int | None = None,
    source_id: str | None = None,
    show_progress: bool = True,
) -> ExpertAnalysis:
    """Route every domain through the MoE (inference only) and find the experts common to all of them.

    Args:
        model: a MoE causal LM any :func:`unite_hf.sources.get_source` layout reads.
        domains: names (built-in :data:`BUILTIN_DOMAINS`, ``"wikitext2"``, ``"simplebooks"``, a text file,
            a Hub dataset id) or a dict ``name -> corpus`` where the corpus is anything
            :func:`~unite_hf.calibration.load_calibration` accepts (also a built-in domain name).
        tokenizer: turns text domains into token ids (not needed for ``input_ids`` tensors).
        num_sequences, seq_len, seed: each domain is ``num_sequences`` windows of ``seq_len`` tokens at
            offsets drawn with ``seed``.
        batch_size: sequences per forward pass.
        score: a :data:`COMMONALITY_SCORES` name.
        k_common: common experts kept per layer; default the model's top-k when ``threshold`` is not given.
        threshold: keep instead every expert whose score is at least this (possibly none in a layer).
        top_m: ``m`` of the ``"top_m_fraction"`` score; default the model's top-k.
        source_id: provenance; default the model's ``name_or_path``.

    Raises (before any forward pass): :class:`~unite_hf.sources.UnsupportedSourceError` for a dense
    model, ``ValueError`` for an unknown score, both or a bad ``k_common``/``threshold``, a bad
    ``top_m``, an empty or out-of-vocabulary domain (named). One domain only is a warning: commonality
    then says nothing about other domains.
    """
    from ...progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    source = get_source(model)
    score_fn = _check_score(score)
    num_experts = source.num_experts
    if k_common is not None and threshold is not None:
        raise ValueError("give k_common or threshold, not both")
    if k_common is not None:
        _check_count("k_common", k_common, num_experts)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if top_m is not None:
        _check_count("top_m", top_m, num_experts)
    for name, value in (("num_sequences", num_sequences), ("seq_len", seq_len), ("batch_size", batch_size)):
        _check_positive(name, value)
    named = _normalize_domains(domains)
    if len(named) < 2:
        warnings.warn(f"only one domain ({next(iter(named))!r}): commonality needs at least 2 domains to mean "
                      "anything; the analysis still runs.", UserWarning, stacklevel=2)

    vocab_size = model.get_input_embeddings().num_embeddings
    calibrations = {name: _load_domain(name, corpus, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                       vocab_size=vocab_size, show_progress=show_progress)
                    for name, corpus in named.items()}
    for calib in calibrations.values():  # the windows' real length (short texts give shorter windows)
        check_seq_len(model, calib.seq_len)

    frequency, mass, tokens, routed_per_token = [], [], [], set()
    for name, calib in tqdm(calibrations.items(), desc="Domains", unit="domain", disable=not show_progress):
        importance = compute_expert_importance(model, calib, source=source, fisher=False, batch_size=batch_size,
                                               seed=seed, show_progress=show_progress)
        count = calib.num_sequences * calib.seq_len
        tokens.append(count)
        frequency.append(importance.frequency)
        mass.append(None if importance.routing_mass is None else importance.routing_mass / count)
        routed_per_token.update(round(float(r) / count) for r in importance.routed.sum(dim=1))
    frequency_t = torch.stack(frequency)
    router_mass = None if any(m is None for m in mass) else torch.stack(mass)
    if router_mass is None:
        warnings.warn("the router outputs of this source could not be read: router_mass is not available "
                      "(frequencies are).", UserWarning, stacklevel=2)

    # hits per token: the top-k the model actually used (whatever its config calls it)
    top_k = max(routed_per_token)
    top_m = top_k if top_m is None else top_m
    if k_common is None and threshold is None:
        k_common = top_k
    commonality = score_fn(frequency_t, router_mass, top_m)
    common = select_common_experts(commonality, frequency_t, k_common=k_common, threshold=threshold)
    config = getattr(model, "config", None)
    return ExpertAnalysis(
        domains=list(calibrations), moe_layers=source.moe_layers, num_experts=num_experts, top_k=top_k,
        tokens=tokens, frequency=frequency_t, router_mass=router_mass, commonality=commonality, score=score,
        top_m=top_m, common_experts=common, k_common=k_common,
        threshold=None if threshold is None else float(threshold),
        domain_sources=[calib.name for calib in calibrations.values()],
        source_id=source_id or getattr(config, "_name_or_path", None) or None,
        seed=seed, seq_len=seq_len, num_sequences=num_sequences,
    )


# --------------------------------------------------------------------------------------------------
# CLI: `unite-hf analyze-experts`
# --------------------------------------------------------------------------------------------------
def domain_argument(value: str) -> tuple[str, str]:
    """``NAME=CORPUS`` (or a built-in ``NAME``) as ``(NAME, CORPUS)``, for argparse."""
    from .config import parse_domain

    try:
        return parse_domain(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``unite-hf analyze-experts``, defined with the torch-free CLI parser."""
    from unite_hf_cli import _analyze_arguments

    _analyze_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the source, analyse, save; print one JSON line with the common experts and the paths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    domains = dict(args.domains) if args.domains else DEFAULT_DOMAINS
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.source, revision=None if args.tokenizer else args.revision,
                                              trust_remote_code=args.trust_remote_code)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.source, revision=args.revision, dtype=dtype,
                                                 trust_remote_code=args.trust_remote_code)
    analysis = analyze_experts(model, domains, tokenizer, num_sequences=args.num_sequences, seq_len=args.seq_len,
                               seed=args.seed, batch_size=args.batch_size, score=args.score, k_common=args.k_common,
                               threshold=args.threshold, top_m=args.top_m, source_id=args.source)
    paths = analysis.save(args.out)
    print(json.dumps({
        "out": str(args.out), **paths, "domains": analysis.domains, "score": analysis.score,
        "k_common": analysis.k_common, "threshold": analysis.threshold,
        "common_experts": {str(layer): experts for layer, experts in zip(analysis.moe_layers, analysis.common_experts)},
    }))
    return 0
