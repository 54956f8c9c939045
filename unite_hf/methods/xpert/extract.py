"""XPERT (2026): common experts found across domains, consolidated by Tucker, reused at any scale.

1. **Analysis** (:func:`unite_hf.methods.xpert.analysis.analyze_experts`): inference-only routing statistics over
   several domains and a commonality score per expert.
2. **Consolidation** (:func:`extract_xpert_gene`): the ``k`` selected experts of each of the ``L``
   MoE layers are stacked per projection layer-major, as ``(L * k, d_out, d_in)`` (row ``l * k + j``
   is layer ``l``'s ``j``-th selected expert), and decomposed with the same Tucker (HOOI) as UNITE:
   shared bases ``U_out``, ``U_in``, a core ``G`` and one coefficient row ``U_E[l k + j]`` per expert.
3. **Reuse across scales.** The factors map to targets in two ways:

   - *source width* (UNITE-style targets, :func:`unite_hf.targets.from_gene`): each layer's
     coefficient is the mean of its experts' rows weighted by their routing frequency,
     ``U_L[l] = sum_j w_lj U_E[l k + j]``; with ``U_out``, ``U_in`` and ``G`` this is an ordinary
     ``(L, d_out, d_in)`` Tucker decomposition, so an :class:`XpertGene` is a :class:`UniteGene`
     whose fused expert is the frequency-weighted mean of the common experts;
   - *any width* (plain Llama targets, :func:`unite_hf.llama_targets.masa_init`): :meth:`XpertGene.gene_matrix`
     is the layer's common experts rebuilt from the factors and laid side by side as one dense FFN
     (gate and up stacked along the output, down along the input, its column blocks scaled by the
     routing weights ``w_lj``, which sum to 1 like a renormalised top-k mixture), which coupled
     scaling (:mod:`unite_hf.methods.xpert.scaling`) then brings to the target's ``(intermediate, hidden)`` shapes.

The control selections of the benchmark (``strategy="random"`` or ``"least"``) go through the same
consolidation with the same ``k`` and ranks, so they match the parameter count and schedule.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .analysis import DEFAULT_DOMAINS, ExpertAnalysis, analyze_experts, select_experts
from ...calibration import published_calibration
from ...decomposition import Decomposition, decompose, resolve_ranks
from ...gene import GeneConfig, UniteGene, register_gene
from ...sources import get_source
from ..common import check_finite_weights, check_on_device, make_gene, source_provenance
from .config import XpertExtractionConfig


@register_gene("xpert")
class XpertGene(UniteGene):
    """A UNITE-shaped gene of the common experts, plus the per-expert coefficients and the analysis.

    Extra tensor keys in ``gene.safetensors``: ``ffn.{proj}.expert_factor`` (``U_E``, ``(L * k, r_L)``) and
    ``importance.commonality`` (:attr:`commonality`); ``importance.frequency`` is the routing frequency
    averaged over domains. There is no Fisher (``importance.fisher``): XPERT computes none, and
    ``config.fusion`` is empty (the fused FFN is the frequency-weighted mean of the selected experts, whose
    choice, ``config.method_config["strategy"]``, the selected experts, their weights and the analysis
    are in ``config.method_config``). Genes of format 2, which kept the commonality in
    ``importance.fisher`` and ``"xpert-<strategy>"`` in ``fusion``, are read into this form.
    """

    card_template = "gene_xpert.md"
    default_scaling = "coupled"  # gene matrices are real experts side by side: keep neurons whole
    format_version = 3  # the commonality's own key: older unite_hf versions would look for a Fisher

    def __init__(self, *args: Any, expert_factors: dict[str, torch.Tensor] | None = None,
                 commonality: torch.Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expert_factors = expert_factors or {}
        self._commonality = commonality

    @property
    def selected_experts(self) -> list[list[int]]:
        return [list(experts) for experts in self.config.method_config["selected_experts"]]

    @property
    def commonality(self) -> torch.Tensor:
        """The commonality score per expert, ``[len(moe_layers), num_experts]`` (``importance.commonality``)."""
        return self._commonality.float()

    @property
    def importance(self) -> torch.Tensor:
        """Deprecated: an XPERT gene's ``importance`` was its commonality score (it has no Fisher); use
        :attr:`commonality`."""
        warnings.warn("XpertGene.importance is deprecated: it is the commonality score, not a Fisher (an XPERT gene "
                      "has none); use gene.commonality", FutureWarning, stacklevel=2)
        return self.commonality

    @property
    def mix_weights(self) -> torch.Tensor:
        return torch.tensor(self.config.method_config["mix_weights"], dtype=torch.float64)

    @property
    def matrix_layers(self) -> list[int]:
        return self.moe_layers

    def expert_weight(self, layer: int, slot: int, proj: str) -> torch.Tensor:
        """Layer ``layer``'s ``slot``-th selected expert's ``proj`` rebuilt from the factors, ``(out, in)``."""
        dec = self._decomposition(proj)
        k = len(self.selected_experts[0])
        coefficients = self.expert_factors[proj][self._row(layer) * k + slot]
        core = torch.tensordot(coefficients, dec.core, dims=([0], [0]))
        return dec.out_factor @ core @ dec.in_factor.T

    def gene_matrix(self, layer: int, proj: str) -> torch.Tensor:
        """The layer's common experts side by side as one dense FFN weight (see the module docstring)."""
        k = len(self.selected_experts[0])
        weights = self.mix_weights[self._row(layer)]
        blocks = [self.expert_weight(layer, j, proj) for j in range(k)]
        if proj == "down":
            return torch.cat([block * float(weights[j]) for j, block in enumerate(blocks)], dim=1)
        return torch.cat(blocks, dim=0)

    def gene_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = super().gene_state_dict()
        tensors.update({f"ffn.{proj}.expert_factor": factor for proj, factor in self.expert_factors.items()})
        tensors["importance.commonality"] = self._commonality
        return tensors

    @classmethod
    def required_statistics(cls, config: GeneConfig) -> tuple[str, ...]:
        # format 2 kept the commonality in importance.fisher
        return ("importance.fisher" if config.format_version < 3 else "importance.commonality"), "importance.frequency"

    @classmethod
    def known_tensors(cls, config: GeneConfig) -> set[str]:
        return super().known_tensors(config) | {"importance.commonality"} | {
            f"ffn.{proj}.expert_factor" for proj in config.projections}

    @classmethod
    def _from_tensors(cls, config: GeneConfig, gene_tensors: dict[str, torch.Tensor],
                      source_tensors: dict[str, torch.Tensor]) -> "XpertGene":
        if config.format_version < 3:  # format 2: read the commonality from where it was, and no Fisher
            gene_tensors = dict(gene_tensors)
            gene_tensors["importance.commonality"] = gene_tensors.pop("importance.fisher")
            config = dataclasses.replace(config, fusion="" if config.fusion.startswith("xpert-") else config.fusion)
        gene = super()._from_tensors(config, gene_tensors, source_tensors)
        gene.expert_factors = {proj: gene_tensors[f"ffn.{proj}.expert_factor"] for proj in config.projections}
        gene._commonality = gene_tensors["importance.commonality"]
        return gene

    def analysis(self) -> ExpertAnalysis:
        """The expert analysis the gene was built from."""
        return ExpertAnalysis.from_dict(self.config.method_config["analysis"])

    def card_variables(self, config: GeneConfig) -> dict[str, Any]:
        variables = super().card_variables(config)
        mc = config.method_config
        analysis = mc["analysis"]
        variables.update(strategy=mc["strategy"], k=mc["k"], selected=mc["selected_experts"],
                         domains=analysis["domains"], score=analysis["score"])
        return variables


def extract_xpert_gene(
    model: nn.Module,
    tokenizer=None,
    domains: Any = DEFAULT_DOMAINS,
    *,
    analysis: ExpertAnalysis | None = None,
    k: int | None = None,
    strategy: str = "common",
    rank: int | tuple[int, int, int] | None = None,
    n_iter_max: int = 25,
    num_sequences: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 4,
    score: str = "min_frequency",
    source_id: str | None = None,
    source_revision: str | None = None,
    show_progress: bool = True,
) -> XpertGene:
    """Consolidate a MoE's common experts into an XPERT gene.

    Args:
        model: a MoE causal LM.
        tokenizer, domains, num_sequences, seq_len, seed, batch_size, score: for the expert analysis
            (:func:`~unite_hf.methods.xpert.analysis.analyze_experts`), unless ``analysis`` is given.
        analysis: a precomputed :class:`~unite_hf.methods.xpert.analysis.ExpertAnalysis` (skips the routing pass).
        k: experts per layer (default: the analysis's ``k_common``, else the largest number of common
            experts any layer has under its threshold; every layer needs the same count to stack).
        strategy: ``"common"`` (XPERT), or the controls ``"random"`` (seeded) and ``"least"``.
        rank: Tucker ranks of the stacked ``(L * k, d_out, d_in)`` tensor: ``(r_E, r_out, r_in)``, one
            int ``r`` for ``(L * k, r, r)``, or ``None`` (512, clipped to the dimensions with a warning).

    The settings make an :class:`~unite_hf.methods.xpert.XpertExtractionConfig` (validated first, saved
    in the gene as its recipe); :func:`extract_from_config` runs one directly.
    """
    config = XpertExtractionConfig(domains=domains, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                   batch_size=batch_size, score=score, k=k, strategy=strategy, rank=rank,
                                   n_iter_max=n_iter_max)
    return extract_from_config(config, model, tokenizer, analysis=analysis, source_id=source_id,
                               source_revision=source_revision, show_progress=show_progress)


def extract_from_config(
    config: XpertExtractionConfig,
    model: nn.Module,
    tokenizer=None,
    *,
    analysis: ExpertAnalysis | str | os.PathLike | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
    show_progress: bool = True,
) -> XpertGene:
    """Run XPERT with ``config`` (see :func:`extract_xpert_gene`); ``analysis`` may also be the folder
    of a saved analysis (``unite-hf analyze-experts --out``)."""
    from ...progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    if isinstance(analysis, (str, os.PathLike)):
        analysis = ExpertAnalysis.load(analysis)
    domains, num_sequences, seq_len, seed = config.domains, config.num_sequences, config.seq_len, config.seed
    batch_size, score, k, strategy = config.batch_size, config.score, config.k, config.strategy
    rank, n_iter_max = config.rank, config.n_iter_max
    source = get_source(model)
    if analysis is not None and (analysis.moe_layers != source.moe_layers or analysis.num_experts != source.num_experts):
        raise ValueError(f"the analysis covers layers {analysis.moe_layers} with {analysis.num_experts} experts; the "
                         f"model's MoE layers are {source.moe_layers} with {source.num_experts}")
    if k is not None and not 1 <= k <= source.num_experts:
        raise ValueError(f"k={k} is out of range: the source has {source.num_experts} experts per layer")
    check_on_device(model)  # before the routing analysis (which checks its windows' length itself)
    check_finite_weights(model)
    if analysis is not None:
        config.warn_unread(("domains", "num_sequences", "seq_len", "batch_size", "score"), "the analysis is precomputed")
    if analysis is None:
        analysis = analyze_experts(model, domains, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                   batch_size=batch_size, score=score, k_common=k, source_id=source_id,
                                   show_progress=show_progress)
    if k is None:
        k = analysis.k_common or max(len(experts) for experts in analysis.common_experts)
        if analysis.k_common is None and len({len(e) for e in analysis.common_experts}) > 1:
            warnings.warn(f"the threshold keeps a different number of common experts per layer; every layer is "
                          f"consolidated with k={k} (layers with fewer take their next most common experts)",
                          UserWarning, stacklevel=2)
    selected = select_experts(analysis, strategy, k, seed=seed)
    mean_frequency = analysis.frequency.mean(dim=0)  # (L, E)
    mix = torch.stack([mean_frequency[row, experts] for row, experts in enumerate(selected)])
    mix = torch.where(mix.sum(1, keepdim=True) > 0, mix / mix.sum(1, keepdim=True).clamp_min(1e-12), 1.0 / k)

    expert = source.blocks[0].expert(0)
    projections = source.blocks[0].projection_names()
    # ranks of the stacked (L * k, out, in) tensor; explicit ranks out of range fail here, before any work
    planned = {proj: resolve_ranks((len(selected) * k, *expert.projection(proj).shape), "tucker", rank)
               for proj in projections}
    decompositions, expert_factors, biases = {}, {}, {}
    for proj in tqdm(projections, desc="XPERT consolidation", unit="proj", disable=not show_progress):
        stacked = torch.stack([block.expert(e).projection(proj).detach().float()
                               for block, experts in zip(source.blocks, selected) for e in experts])  # (L*k, out, in)
        full = decompose(stacked, "tucker", planned[proj], n_iter_max=n_iter_max, name=proj, show_progress=show_progress)
        full = Decomposition(method="tucker", core=full.core.cpu(), layer_factor=full.layer_factor.cpu(),
                             out_factor=full.out_factor.cpu(), in_factor=full.in_factor.cpu(),
                             spectral_energy={m: e.cpu() for m, e in full.spectral_energy.items()},
                             relative_error=full.relative_error, ranks=full.ranks)
        expert_factors[proj] = full.layer_factor
        per_layer = full.layer_factor.reshape(len(selected), k, -1)
        layer_factor = torch.einsum("lk,lkr->lr", mix.to(per_layer), per_layer)
        decompositions[proj] = Decomposition(
            method="tucker", core=full.core, layer_factor=layer_factor, out_factor=full.out_factor,
            in_factor=full.in_factor, spectral_energy=full.spectral_energy, relative_error=full.relative_error,
            ranks=full.ranks)
        if source.blocks[0].has_bias:
            biases[proj] = torch.stack([
                sum(w * block.expert(e).bias(proj).detach().float() for w, e in zip(mix[row].tolist(), experts))
                for row, (block, experts) in enumerate(zip(source.blocks, selected))])

    source_weights = {name: t.detach().to("cpu").clone() for name, t in source.non_expert_state_dict().items()}
    gene = make_gene(
        source, source_provenance(model, source_id, source_revision), decompositions, biases, mean_frequency.double(),
        source_weights, gene_class=XpertGene,
        gene_kwargs={"expert_factors": expert_factors, "commonality": analysis.commonality.double().clone()},
        calibration=", ".join(analysis.domains), num_sequences=analysis.num_sequences, seq_len=analysis.seq_len,
        seed=seed, fisher_labels="none", fusion="", decomposition="tucker", n_iter_max=n_iter_max,
        method="xpert",
        method_config={"strategy": strategy, "k": k, "selected_experts": selected, "mix_weights": mix.tolist(),
                       "analysis": analysis.to_dict()},
        recipe=_published_recipe(config),
    )
    gene.tokenizer = tokenizer
    return gene


def _published_recipe(config: XpertExtractionConfig) -> dict[str, Any]:
    """The recipe the gene records (and ``push_to_hub`` publishes): each domain's corpus as
    :func:`~unite_hf.calibration.published_calibration` records it (a file by its name; never the text of a
    list of documents nor a local folder)."""
    data = config.to_dict()
    if isinstance(config.domains, dict):
        data["domains"] = {name: published_calibration(corpus) for name, corpus in config.domains.items()}
    elif isinstance(config.domains, (list, tuple)):
        data["domains"] = [published_calibration(corpus) for corpus in config.domains]
    return data
