"""XPERT (2026): common experts found across domains, consolidated by Tucker, reused at any scale.

``config.py`` holds :class:`XpertExtractionConfig` (the recipe), ``extract.py`` the gene class and the
extraction, ``analysis.py`` the cross-domain routing analysis (``unite-hf analyze-experts``), ``scaling.py``
the coupled scaling of its gene matrices (registered as ``"coupled"`` with :func:`unite_hf.llama_targets.masa_init`).
"""

from __future__ import annotations

from .. import register_method
from .config import XpertExtractionConfig
from .extract import XpertGene, extract_from_config, extract_xpert_gene
from .scaling import coupled_scale  # registers the "coupled" scaling

register_method(XpertExtractionConfig, XpertGene, extract_from_config)

__all__ = ["XpertExtractionConfig", "XpertGene", "coupled_scale", "extract_from_config", "extract_xpert_gene"]
