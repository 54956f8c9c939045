"""UNITE (ICLR 2026): Fisher importance -> expert fusion -> Tucker -> gene.

``config.py`` holds :class:`UniteExtractionConfig` (the recipe), ``extract.py`` the extraction;
the gene class is :class:`unite_hf.gene.UniteGene` (the base of every Tucker-shaped gene, XPERT's too).
``unite_hf.methods.unite`` keeps every name it had as a single module.
"""

from __future__ import annotations

from typing import Any, Callable

from ...gene import UniteGene
from ..common import check_finite_weights, check_on_device, check_seq_len  # noqa: F401  (importable from here)
from .. import register_method
from .config import UniteExtractionConfig
from .extract import (  # noqa: F401  (the module's names before it became a folder)
    _check_importance, _check_vocabulary, _extract_from_checkpoint, _input_weights, _make_gene, _planned_ranks,
    _RANK_CLIPPED, _source_provenance, donor_importance, extract_from_config, extract_universal_knowledge, hidden_mode,
)


def _run_cli(config: UniteExtractionConfig, args: Any, tokenizer, load_source: Callable[[], Any],
             **inputs: Any) -> UniteGene:
    """``unite-hf extract``: with a local checkpoint folder and nothing to calibrate (``--importance``, or
    fusion uniform), stream the experts from its shards instead of loading the model."""
    from pathlib import Path

    importance = inputs.pop("importance", None)
    if importance is not None:
        importance = donor_importance(importance)
    streamable = config.fused_width is None and not config.activation_aware
    if streamable and Path(args.source).is_dir() and (importance is not None or config.fusion == "uniform"):
        return extract_from_config(config, args.source, importance=importance, trust_remote_code=args.trust_remote_code,
                                   **inputs)
    inputs.pop("spill_dir", None)  # only streaming spills
    return extract_from_config(config, load_source(), tokenizer, importance=importance, **inputs)


register_method(UniteExtractionConfig, UniteGene, extract_from_config, run_cli=_run_cli)

__all__ = ["UniteExtractionConfig", "extract_from_config", "extract_universal_knowledge"]
