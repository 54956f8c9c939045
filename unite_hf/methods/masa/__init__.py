"""MASA (ICLR 2026): small square gene matrices, trained by output and spectral alignment.

``config.py`` holds :class:`MasaExtractionConfig` (the recipe), ``extract.py`` the gene matrices, the gene
class and the alignment, ``scaling.py`` the adaptive scaling that brings gene matrices to a target's size
(registered as ``"adaptive"`` with :func:`unite_hf.llama_targets.masa_init`). ``unite_hf.methods.masa`` keeps every name it had as a single module.
"""

from __future__ import annotations

from .. import register_method
from .config import DEFAULT_CORPORA, MasaExtractionConfig
from .extract import (  # noqa: F401  (the module's names before it became a folder)
    SINGULAR_VALUE_FLOOR, UNIT_SELECTIONS, FFNUnit, MasaGene, _activation, _alignment_text, _dense_units,
    _frequent_units, _is_moe, _mlp_linears, _mlp_unit, _resolve_selection, _shared_units, _spectral_loss,
    _validate_rank, effective_weight, extract_from_config, extract_masa_gene, fold_input, kronecker_init,
    masa_forward, pooling_matrix, unfold_output,
)

from .scaling import adaptive_scale  # registers the "adaptive" scaling

register_method(MasaExtractionConfig, MasaGene, extract_from_config)

__all__ = ["DEFAULT_CORPORA", "MasaExtractionConfig", "MasaGene", "adaptive_scale", "extract_from_config", "extract_masa_gene",
           "effective_weight", "fold_input", "kronecker_init", "masa_forward", "pooling_matrix", "unfold_output"]
