"""UNITE extraction (paper §3.1-3.2): Fisher importance -> expert fusion -> Tucker -> gene.

Everything that can be checked without running the model is checked first (llm-compressor style):
a dense model, an unknown fusion or decomposition, ranks out of range, NaN/Inf weights and an empty
or out-of-vocabulary calibration set all fail before the expensive calibration pass starts.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import DEFAULT_CALIBRATION, CalibrationSet, load_calibration
from ..decomposition import DECOMPOSITIONS, decompose, resolve_ranks
from ..fusion import fuse_block, get_fusion
from ..gene import GeneConfig, UniteGene
from ..importance import LABEL_MODES, ExpertImportance, compute_expert_importance
from ..sources import FusedExpertsBlock, MoESource, get_source


def check_finite_weights(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer holding NaN or Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = "NaN" if torch.isnan(tensor).any() else "Inf"
            raise ValueError(f"source weight {name!r} contains {bad}; refusing to extract a gene from it.")


def _source_provenance(model: nn.Module, source_id: str | None, source_revision: str | None) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "source_id": source_id or getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None,
        "source_revision": source_revision or getattr(config, "_commit_hash", None),
        "source_model_type": getattr(config, "model_type", None),
        "source_config": config.to_dict() if hasattr(config, "to_dict") else {},
    }


def _planned_ranks(source: MoESource, decomposition: str, rank) -> dict[str, tuple[int, int, int]]:
    block = source.blocks[0]
    expert = block.expert(0)
    ranks = {}
    for proj in block.projection_names():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranks[proj] = resolve_ranks((len(source.blocks), *expert.projection(proj).shape), decomposition, rank)
        for warning in caught:  # say which projection was clipped
            warnings.warn(f"{proj} projection: {warning.message}", UserWarning, stacklevel=3)
    return ranks


def extract_universal_knowledge(
    model: nn.Module,
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
    importance: ExpertImportance | None = None,
    source_id: str | None = None,
    source_revision: str | None = None,
    show_progress: bool = True,
) -> UniteGene:
    """Extract a UNITE gene from a MoE causal LM.

    Args:
        model: any transformers MoE causal LM (fused 3D experts or per-expert ModuleList).
        tokenizer: tokenizer for text calibration input (not needed for an input_ids tensor).
        calibration: "wikitext2" (default), a local text file, a list of strings, a
            ``datasets.Dataset``, a Hub dataset id, an input_ids tensor ``[N, T]`` or a
            :class:`~unite_hf.calibration.CalibrationSet`.
        rank: Tucker ranks: ``None`` (512, clipped to the dimensions with a warning), an int ``r``
            (``(L, r, r)``) or ``(r_L, r_out, r_in)``. Explicit ranks out of range raise.
        fusion: ``fisher`` (paper Eq. 3), ``uniform`` (Eq. 1), ``frequency`` or ``fisher_diag``.
        decomposition: ``tucker`` (HOOI), or the ablations ``cp`` and ``svd``.
        fisher_labels: ``empirical`` (observed next tokens) or ``sampled`` (the true Fisher).
        num_sequences, seq_len, seed: calibration sample (N sequences of T tokens, seeded).
        batch_size: calibration sequences per forward/backward pass.
        n_iter_max: HOOI / ALS iteration budget.
        train_mode: calibrate in train mode (dropout off), for remote-code MoEs whose eval path
            runs the experts under ``torch.no_grad``.
        text_column, dataset_config, split: how to read a Hub or ``datasets`` calibration corpus.
        importance: precomputed :class:`ExpertImportance` (skips calibration).
        source_id, source_revision: provenance; defaults to the model's ``name_or_path``.
    """
    source = get_source(model)
    strategy = get_fusion(fusion)
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {sorted(DECOMPOSITIONS)}")
    if fisher_labels not in LABEL_MODES:
        raise ValueError(f"fisher_labels must be one of {LABEL_MODES}, got {fisher_labels!r}")
    ranks = _planned_ranks(source, decomposition, rank)
    check_finite_weights(model)

    if importance is None:
        calib = load_calibration(calibration, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                 text_column=text_column, dataset_config=dataset_config, split=split,
                                 show_progress=show_progress)
        _check_vocabulary(model, calib)
        importance = compute_expert_importance(
            model, calib, source=source, labels=fisher_labels, diagonal=strategy.requires == "fisher_diag",
            batch_size=batch_size, seed=seed, train_mode=train_mode, show_progress=show_progress,
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

    fused = [fuse_block(block, importance, fusion) for block in
             tqdm(source.blocks, desc="Fusing experts", unit="layer", disable=not show_progress)]
    projections = source.blocks[0].projection_names()
    decompositions, fused_biases = {}, {}
    for proj in tqdm(projections, desc=f"{decomposition} decomposition", unit="proj", disable=not show_progress):
        stacked = torch.stack([layer[proj][0] for layer in fused])  # (L, out, in)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rank was already resolved (and any clipping warned) above
            decompositions[proj] = decompose(stacked, decomposition, ranks[proj], n_iter_max=n_iter_max, name=proj)
        if fused[0][proj][1] is not None:
            fused_biases[proj] = torch.stack([layer[proj][1] for layer in fused])

    first = source.blocks[0]
    expert = first.expert(0)
    config = GeneConfig(
        **_source_provenance(model, source_id, source_revision),
        source_layout=source.layout,
        num_layers=source.num_layers,
        moe_layers=source.moe_layers,
        dense_layers=source.dense_layers,
        num_experts=source.num_experts,
        hidden_size=expert.down.shape[0],
        expert_intermediate_size=expert.down.shape[1],
        projections=list(projections),
        has_bias=first.has_bias,
        custom_gating=isinstance(first, FusedExpertsBlock) and first.custom_gating,
        shared_experts=[name for name, _ in first.shared_experts],
        calibration=calibration_name,
        num_sequences=num_sequences,
        seq_len=seq_len,
        seed=seed,
        fisher_labels=fisher_labels,
        fusion=fusion,
        decomposition=decomposition,
        n_iter_max=n_iter_max,
        ranks={proj: list(dec.ranks) for proj, dec in decompositions.items()},
        relative_error={proj: dec.relative_error for proj, dec in decompositions.items()},
        retained_energy={proj: dec.retained_energy() for proj, dec in decompositions.items()},
    )
    source_weights = {name: tensor.detach().to("cpu").clone() for name, tensor in source.non_expert_state_dict().items()}
    return UniteGene(config, decompositions, importance.fisher.clone(), importance.frequency.clone(),
                     source_weights, fused_biases)


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
