"""UNITE extraction (paper §3.1-3.2): Fisher importance -> expert fusion -> Tucker -> gene.

Everything that can be checked without running the model is checked first (llm-compressor style):
a dense model, an unknown fusion or decomposition, ranks out of range, NaN/Inf weights and an empty
or out-of-vocabulary calibration set all fail before the expensive calibration pass starts.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ...calibration import DEFAULT_CALIBRATION, CalibrationSet, load_calibration, published_calibration
from ...decomposition import (
    DECOMPOSITIONS,
    NEEDS_HIDDEN_MODE,
    decompose,
    decompose_streaming,
    resolve_ranks,
)
from ...decomposition.budget import allocate, projection_ranks
from ...fusion import check_width, fuse_block, get_fusion
from ...gene import UniteGene
from ...importance import LABEL_MODES, ExpertImportance, compute_expert_importance
from ...refit import RefitOptions, get_refit, refit_decompositions
from ...sources import MoESource, get_source
from ...sources.checkpoint import MoECheckpoint, is_checkpoint_path
from .config import UniteExtractionConfig
from ..common import (  # noqa: F401  (check_* and the old private names stay importable from here)
    check_finite_weights, check_on_device, check_seq_len, make_gene, source_provenance,
)

_source_provenance = source_provenance  # the names these had before they moved to methods/common.py
_make_gene = make_gene


_CALIBRATION_SETTINGS = ("calibration", "num_sequences", "seq_len", "text_column", "dataset_config", "split",
                         "batch_size", "fisher_labels", "train_mode")
"""Settings that only the calibration pass reads (the Fisher, or the activation-aware moments)."""


_REFIT_SETTINGS = ("refit_ridge", "refit_sequential", "refit_max_memory_gb", "refit_steps", "refit_lr",
                   "refit_max_tokens")
"""Settings that only a refit reads (the last three only the iterative ones)."""


_RANK_CLIPPED = r"default rank \d+ exceeds"
"""The message of :func:`~unite_hf.decomposition.resolve_ranks`'s clipping warning: the one warning the
extractor silences inside a decomposition, because it has already raised it once per projection."""


def _planned_ranks(source: MoESource, decomposition: str, rank, fused_width: int | None = None) -> dict[str, tuple[int, int, int]]:
    block = source.blocks[0]
    expert = block.expert(0)
    ranks = {}
    for proj in block.projection_names():
        wanted = projection_ranks(rank, proj, len(source.blocks)) if isinstance(rank, dict) else rank
        shape = list(expert.projection(proj).shape)
        if fused_width is not None:  # the fused FFN's neuron axis: rows of gate/up, columns of down
            shape[1 if proj == "down" else 0] = fused_width
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # recorded, then re-raised below with the projection's name
            ranks[proj] = resolve_ranks((len(source.blocks), *shape), decomposition, wanted)
        for warning in caught:  # say which projection was clipped
            warnings.warn(f"{proj} projection: {warning.message}", UserWarning, stacklevel=3)
    return ranks


def extract_universal_knowledge(
    model: nn.Module | str | os.PathLike,
    tokenizer=None,
    calibration: Any = DEFAULT_CALIBRATION,
    *,
    rank: int | tuple[int, int, int] | None = None,
    fusion: str = "fisher",
    decomposition: str = "tucker",
    fisher_labels: str = "empirical",
    num_sequences: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    n_iter_max: int = 25,
    train_mode: bool = False,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    importance: ExpertImportance | str | os.PathLike | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
    spill_dir: str | os.PathLike | None = None,
    fused_width: int | None = None,
    activation_aware: bool = False,
    budget: float | None = None,
    refit: str = "none",
    refit_ridge: float = 1e-4,
    refit_sequential: bool = False,
    refit_steps: int = 300,
    refit_lr: float = 1e-3,
    refit_max_tokens: int = 16384,
    refit_max_memory_gb: float = 4.0,
) -> UniteGene:
    """Extract a UNITE gene from a MoE causal LM.

    Args:
        model: any transformers MoE causal LM (fused 3D experts or per-expert ModuleList), or the path
            of a checkpoint folder (config.json + *.safetensors [+ index]). A checkpoint is streamed:
            experts are read from the shards one at a time, fused layer by layer into a temporary
            spill file (``spill_dir``, default the system temp folder; one float32 matrix per layer
            and projection), and decomposed layer by layer with
            :func:`~unite_hf.decomposition.decompose_streaming`; memory stays at about one layer.
            It needs ``importance`` (e.g. from :func:`~unite_hf.compute_expert_importance` on a
            loaded copy, or from several processes with :mod:`unite_hf.distributed`) unless
            ``fusion="uniform"``.
        tokenizer: tokenizer for text calibration input (not needed for an input_ids tensor).
        calibration: "wikitext2" (default), a local text file, a list of strings, a
            ``datasets.Dataset``, a Hub dataset id, an input_ids tensor ``[N, T]`` or a
            :class:`~unite_hf.calibration.CalibrationSet`.
        rank: Tucker ranks: ``None`` (512, clipped to the dimensions with a warning), an int ``r``
            (``(L, r, r)``) or ``(r_L, r_out, r_in)``. Explicit ranks out of range raise.
        fusion: ``fisher`` (paper Eq. 3), ``uniform`` (Eq. 1), ``frequency`` or ``fisher_diag``.
        decomposition: ``tucker`` (HOOI), the ablations ``cp`` and ``svd``, or ``tucker_hidden`` (bases
            shared across layers only along the hidden axis, a factor per layer along the neuron axis).
        fisher_labels: ``empirical`` (observed next tokens) or ``sampled`` (the true Fisher).
        num_sequences, seq_len, seed: calibration sample (N sequences of T tokens, seeded).
        batch_size: calibration sequences per forward/backward pass.
        n_iter_max: HOOI / ALS iteration budget.
        train_mode: calibrate in train mode (dropout off), for remote-code MoEs whose eval path
            runs the experts under ``torch.no_grad``.
        text_column, dataset_config, split: how to read a Hub or ``datasets`` calibration corpus.
        importance: precomputed :class:`ExpertImportance` (skips calibration), or a saved UNITE gene (folder
            or Hub id) whose Fisher and routing frequency are reused.
        source_id, source_revision: provenance; defaults to the model's ``name_or_path``.
        trust_remote_code, spill_dir: for a checkpoint path only.
        fused_width: width of the fused FFN for fusions that keep neurons side by side (``concat``:
            ``1..E*I``, default ``E*I``); other fusions keep the experts' width.
        activation_aware: weight each projection by the second moment of its calibration inputs
            before decomposing and un-weight afterwards (SVD-LLM / ASVD; see
            :mod:`unite_hf.decomposition`). Costs one more inference pass over the calibration
            windows (also when ``importance`` is given).
        budget: instead of ``rank`` and ``fused_width``: the target FFN's parameters as a fraction of the
            routed experts' (e.g. ``0.25``), spent dense-first (:mod:`unite_hf.decomposition.budget`); the
            allocation is recorded in ``gene.config.method_config["allocation"]``. ``rank`` also takes
            per-axis ranks, ``{"hidden": r_h, "neuron": r_n}``.
        refit: after decomposing, fit each MoE layer's cores to the source's routed output on the
            calibration windows (:mod:`unite_hf.refit`): ``"none"`` (the paper), ``"ridge"`` (the
            closed-form ``down`` core given the rebuilt gate/up) or ``"distill"`` (ridge, then Adam on
            every core). Needs the calibration windows (also when ``importance`` is given).
        refit_ridge, refit_sequential, refit_steps, refit_lr, refit_max_tokens, refit_max_memory_gb: how the refit runs
            (:class:`~unite_hf.methods.unite.UniteExtractionConfig` says what each does).

    The settings (everything but the model, tokenizer, importance, provenance and runtime switches) make
    a :class:`~unite_hf.methods.unite.UniteExtractionConfig`, validated before anything runs and saved
    in the gene as its recipe (``gene.recipe``); :func:`extract_from_config` runs one directly.
    """
    config = UniteExtractionConfig(
        calibration=calibration, num_sequences=num_sequences, seq_len=seq_len, seed=seed, text_column=text_column,
        dataset_config=dataset_config, split=split, batch_size=batch_size, fisher_labels=fisher_labels,
        train_mode=train_mode, fusion=fusion, fused_width=fused_width, decomposition=decomposition, rank=rank,
        n_iter_max=n_iter_max, activation_aware=activation_aware, budget=budget, refit=refit, refit_ridge=refit_ridge,
        refit_sequential=refit_sequential, refit_steps=refit_steps, refit_lr=refit_lr, refit_max_tokens=refit_max_tokens,
        refit_max_memory_gb=refit_max_memory_gb)
    return extract_from_config(config, model, tokenizer, importance=importance, source_id=source_id,
                               source_revision=source_revision, show_progress=show_progress,
                               trust_remote_code=trust_remote_code, spill_dir=spill_dir)


def extract_from_config(
    config: UniteExtractionConfig,
    model: nn.Module | str | os.PathLike,
    tokenizer=None,
    *,
    importance: ExpertImportance | str | os.PathLike | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
    show_progress: bool = True,
    trust_remote_code: bool = False,
    spill_dir: str | os.PathLike | None = None,
) -> UniteGene:
    """Run UNITE with ``config`` (see :func:`extract_universal_knowledge` for the other arguments).
    ``importance`` may also name a saved UNITE gene (folder or Hub id) whose Fisher is reused."""
    from ...progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    if isinstance(importance, (str, os.PathLike)):
        importance = donor_importance(importance)
    c = config
    calibration, rank, fusion, decomposition, fused_width = c.calibration, c.rank, c.fusion, c.decomposition, c.fused_width
    num_sequences, seq_len, seed, batch_size, n_iter_max = c.num_sequences, c.seq_len, c.seed, c.batch_size, c.n_iter_max
    fisher_labels, activation_aware = c.fisher_labels, c.activation_aware
    refitting = get_refit(c.refit) is not None  # an unknown refit fails here, before anything runs
    if is_checkpoint_path(model):
        if fused_width is not None or activation_aware or refitting or c.budget is not None:
            raise ValueError("fused_width, budget, activation_aware and refit are not supported when streaming from "
                             "a checkpoint path; load the model")
        config.warn_unread(_CALIBRATION_SETTINGS, "the experts stream from a checkpoint with no calibration pass")
        return _extract_from_checkpoint(
            model, rank=rank, fusion=fusion, decomposition=decomposition, n_iter_max=n_iter_max, importance=importance,
            source_id=source_id, source_revision=source_revision, show_progress=show_progress,
            trust_remote_code=trust_remote_code, spill_dir=spill_dir, recipe=published_recipe(config, None),
        )
    if isinstance(model, (str, os.PathLike)):
        raise ValueError(f"{model} is not a checkpoint folder; pass a loaded model or a folder with config.json "
                         "and *.safetensors")
    source = get_source(model)
    strategy = get_fusion(fusion)
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {sorted(DECOMPOSITIONS)}")
    if fisher_labels not in LABEL_MODES:
        raise ValueError(f"fisher_labels must be one of {LABEL_MODES}, got {fisher_labels!r}")
    method_config: dict[str, Any] = {"activation_aware": True} if activation_aware else {}
    if c.budget is not None:
        block = source.blocks[0]
        allocation = allocate(c.budget, hidden=block.expert(0).down.shape[0], num_experts=source.num_experts,
                              intermediate=block.expert(0).down.shape[1], num_projections=len(block.projection_names()),
                              variable_width=strategy.variable_width)
        fused_width = allocation.fused_width if strategy.variable_width else None
        rank = {"hidden": allocation.hidden_rank, "neuron": allocation.neuron_rank}
        method_config["allocation"] = allocation.to_dict()
    check_width(source.blocks[0], strategy, fused_width)  # before calibration
    ranks = _planned_ranks(source, decomposition, rank, fused_width)
    check_on_device(model)
    check_finite_weights(model)

    needs_windows = activation_aware or refitting  # passes over the calibration windows besides the Fisher
    if not refitting:
        config.warn_unread(_REFIT_SETTINGS, "refit is 'none'")
    elif c.refit == "ridge":
        config.warn_unread(_REFIT_SETTINGS[3:], "only the distill refit reads them")
    if importance is not None and not needs_windows:
        config.warn_unread(_CALIBRATION_SETTINGS, "the importance is precomputed")
    calib = None
    if importance is None or needs_windows:
        calib = load_calibration(calibration, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                 text_column=c.text_column, dataset_config=c.dataset_config, split=c.split,
                                 show_progress=show_progress)
        check_seq_len(model, calib.seq_len)  # the windows' real length, before the Fisher pass
        _check_vocabulary(model, calib)
    if importance is None:
        importance = compute_expert_importance(
            model, calib, source=source, labels=fisher_labels, diagonal=strategy.requires == "fisher_diag",
            batch_size=batch_size, seed=seed, train_mode=c.train_mode, show_progress=show_progress,
        )
        calibration_name, num_sequences, seq_len = calib.name, calib.num_sequences, calib.seq_len
    else:
        if importance.moe_layers != source.moe_layers:
            raise ValueError(f"importance covers layers {importance.moe_layers}, the model's MoE layers are {source.moe_layers}")
        if strategy.requires == "fisher_diag" and importance.fisher_diag is None:
            raise ValueError("fusion='fisher_diag' needs importance computed with diagonal=True")
        calibration_name, num_sequences, seq_len = "precomputed importance", importance.num_sequences, 0
    fisher_labels = importance.labels
    _check_importance(importance)

    fused = [fuse_block(block, importance, fusion, width=fused_width) for block in
             tqdm(source.blocks, desc="Fusing experts", unit="layer", disable=not show_progress)]
    projections = source.blocks[0].projection_names()
    weights = _input_weights(model, source, calib, fused, decomposition, batch_size, show_progress) \
        if activation_aware else {}
    decompositions, fused_biases, stacks = {}, {}, {}
    for proj in projections:  # each decomposition shows its own bar, named after the projection
        stacked = stacks[proj] = torch.stack([layer[proj][0] for layer in fused])  # (L, out, in)
        with warnings.catch_warnings():
            # the rank was already resolved (and any clipping warned, per projection) above; nothing else is hidden
            warnings.filterwarnings("ignore", message=_RANK_CLIPPED, category=UserWarning)
            decompositions[proj] = decompose(stacked, decomposition, ranks[proj], n_iter_max=n_iter_max, name=proj,
                                             show_progress=show_progress, hidden_mode=hidden_mode(proj),
                                             input_weight=weights.get(proj))
        if fused[0][proj][1] is not None:
            fused_biases[proj] = torch.stack([layer[proj][1] for layer in fused])
    if refitting:
        decompositions, errors = refit_decompositions(
            model, source, decompositions, fused_biases, calib.input_ids, c.refit, RefitOptions.from_config(c),
            batch_size=batch_size, fused=stacks, show_progress=show_progress)
        method_config.update(refit=c.refit, refit_sequential=c.refit_sequential, refit_calibration_error=errors)
    del stacks

    source_weights = {name: tensor.detach().to("cpu").clone() for name, tensor in source.non_expert_state_dict().items()}
    provenance = source_provenance(model, source_id, source_revision)
    gene = make_gene(source, provenance, decompositions, fused_biases, importance, source_weights,
                     calibration=calibration_name, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                     fisher_labels=fisher_labels, fusion=fusion, decomposition=decomposition, n_iter_max=n_iter_max,
                     recipe=published_recipe(config, calib), **({"method_config": method_config} if method_config else {}))
    gene.tokenizer = tokenizer  # travels with the gene, so targets grown from it can be fine-tuned right away
    return gene


def published_recipe(config: UniteExtractionConfig, calib: CalibrationSet | None) -> dict[str, Any]:
    """The recipe a gene records (and ``push_to_hub`` publishes): the settings, with the calibration as
    :func:`~unite_hf.calibration.published_calibration` records it (a file by its name; never the text of a
    list of documents nor a local folder) and, where windows were cut, their real shape: a token tensor
    sets ``N x T``, not the ``num_sequences`` / ``seq_len`` it leaves unread, so the recipe says what the
    provenance says."""
    recipe = config.to_dict()
    recipe["calibration"] = published_calibration(config.calibration)
    if calib is not None:
        recipe["num_sequences"], recipe["seq_len"] = calib.num_sequences, calib.seq_len
    return recipe


def _extract_from_checkpoint(path, *, rank, fusion: str, decomposition: str, n_iter_max: int,
                             importance: ExpertImportance | None, source_id: str | None, source_revision: str | None,
                             show_progress: bool, trust_remote_code: bool, spill_dir, recipe: dict[str, Any]) -> UniteGene:
    """Streaming extraction: fuse layer by layer from the shards, spill, decompose layer by layer."""
    strategy = get_fusion(fusion)
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {sorted(DECOMPOSITIONS)}")
    if decomposition in NEEDS_HIDDEN_MODE:
        raise ValueError(f"decomposition {decomposition!r} does not stream from a checkpoint yet; load the model and "
                         "pass it instead of the path")
    with MoECheckpoint(path, trust_remote_code=trust_remote_code) as checkpoint:
        source = checkpoint.source
        ranks = _planned_ranks(source, decomposition, rank)
        if importance is None:
            if strategy.requires != "none":
                raise ValueError(
                    f"extracting from a checkpoint path with fusion={fusion!r} needs precomputed importance=... "
                    "(compute_expert_importance on a loaded model, or unite_hf.distributed); only fusion='uniform' "
                    "works without it.")
            shape = (len(source.blocks), source.num_experts)
            importance = ExpertImportance(source.moe_layers, torch.zeros(shape, dtype=torch.float64),
                                          torch.zeros(shape, dtype=torch.float64), num_sequences=0)
        if importance.moe_layers != source.moe_layers:
            raise ValueError(f"importance covers layers {importance.moe_layers}, the checkpoint's MoE layers are "
                             f"{source.moe_layers}")
        if tuple(importance.fisher.shape) != (len(source.blocks), source.num_experts):
            raise ValueError(f"importance has shape {tuple(importance.fisher.shape)}, the checkpoint has "
                             f"{len(source.blocks)} MoE layers of {source.num_experts} experts")
        if strategy.requires == "fisher_diag" and importance.fisher_diag is None:
            raise ValueError("fusion='fisher_diag' needs importance computed with diagonal=True")
        _check_importance(importance)
        source_weights = checkpoint.non_expert_state_dict()
        for name, tensor in source_weights.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"source weight {name!r} contains NaN or Inf; refusing to extract a gene from it.")
        projections = checkpoint.blocks[0].projection_names()
        fused_biases: dict[str, list[torch.Tensor]] = {}
        decompositions = {}
        with tempfile.TemporaryDirectory(prefix="unite-spill-", dir=spill_dir) as tmp:
            spill = [Path(tmp) / f"layer{block.layer_idx}.safetensors" for block in checkpoint.blocks]
            for block, file in zip(tqdm(checkpoint.blocks, desc="Fusing experts", unit="layer",
                                        disable=not show_progress), spill):
                fused = fuse_block(block, importance, fusion)
                for proj, (weight, bias) in fused.items():
                    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
                        raise ValueError(f"{block.name}: fused {proj} holds NaN or Inf; an expert weight in the "
                                         "checkpoint is not finite")
                    if bias is not None:
                        fused_biases.setdefault(proj, []).append(bias)
                save_file({proj: weight.contiguous() for proj, (weight, _) in fused.items()}, str(file))
                del fused
            for proj in projections:
                def layer_fn(index: int, proj: str = proj) -> torch.Tensor:
                    with safe_open(spill[index], framework="pt") as f:
                        return f.get_tensor(proj)

                with safe_open(spill[0], framework="pt") as f:
                    shape = tuple(f.get_slice(proj).get_shape())
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=_RANK_CLIPPED, category=UserWarning)  # warned above
                    decompositions[proj] = decompose_streaming(
                        layer_fn, len(spill), shape, decomposition, ranks[proj], n_iter_max=n_iter_max,
                        show_progress=show_progress, name=proj)
        provenance = source_provenance(checkpoint.meta_model, source_id, source_revision, loaded_from=path)
        return make_gene(source, provenance, decompositions, {p: torch.stack(v) for p, v in fused_biases.items()},
                          importance, source_weights, calibration="precomputed importance",
                          num_sequences=importance.num_sequences, seq_len=0, seed=0, fisher_labels=importance.labels,
                          fusion=fusion, decomposition=decomposition, n_iter_max=n_iter_max, recipe=recipe)


def _input_weights(model, source: MoESource, calib: CalibrationSet, fused: list, decomposition: str, batch_size: int,
                   show_progress: bool) -> dict[str, torch.Tensor]:
    """``proj -> S`` for activation-aware bases: one shared weight where the method shares the input
    factor across layers (the mean moment), per layer where each layer has its own."""
    from ...decomposition import input_axis_is_per_layer, input_weight_from_moment
    from ...input_moments import collect_block_inputs, fused_hidden_moment

    inputs = collect_block_inputs(model, source, calib.input_ids, batch_size=batch_size, show_progress=show_progress)
    weights = {}
    for proj in source.blocks[0].projection_names():
        if proj == "down":
            moments = torch.stack([fused_hidden_moment(inputs[block.layer_idx], layer, block.activation)
                                   for block, layer in zip(source.blocks, fused)])
        else:
            moments = torch.stack([inputs[block.layer_idx].moment for block in source.blocks])
        per_layer = input_axis_is_per_layer(decomposition, hidden_mode(proj))
        weights[proj] = input_weight_from_moment(moments if per_layer else moments.mean(0))
    return weights


def donor_importance(gene_path: str | os.PathLike) -> ExpertImportance:
    """The Fisher and routing frequency stored in a saved UNITE gene, to extract again without calibrating."""
    return UniteGene.from_pretrained(gene_path).expert_importance()  # an XPERT gene refuses: no Fisher there


def hidden_mode(proj: str) -> str:
    """Which axis of a projection's (out, in) matrix is the hidden (residual-stream) one."""
    return "out" if proj == "down" else "in"


def _check_importance(importance: ExpertImportance) -> None:
    for what, table in (("Fisher", importance.fisher), ("routing frequency", importance.frequency)):
        bad = (~torch.isfinite(table)).nonzero()
        if len(bad):
            row, expert = bad[0].tolist()
            raise ValueError(f"{what} of layer {importance.moe_layers[row]} expert {expert} is {table[row, expert].item()}; "
                             "the calibration pass overflowed (try a float32 source).")


def _check_vocabulary(model: nn.Module, calibration: CalibrationSet) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    top = int(calibration.input_ids.max())
    if top >= vocab:
        raise ValueError(f"calibration token id {top} is outside the model's vocabulary ({vocab}); wrong tokenizer?")
