"""UNITE target model configuration.

A target reuses its source family's own transformers stack (attention, norms, RoPE, multipliers),
so its configuration is the source family's configuration at the target's depth
(``text_config``), plus the few fields that describe the factorized FFNs grown from a gene.

This file is self-contained (transformers only) so that a saved target loads with
``trust_remote_code=True`` where unite_hf is not installed.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

CORE_INITS = ("random", "tucker")
LAYER_SELECTIONS = ("first", "uniform")
SHARED_EXPERT_MODES = ("keep", "fuse", "drop")
# tags of every target: the model card, and Trainer's card through model.model_tags (here, not in
# modeling_unite, so that cards.py reads them without importing the modeling code that imports cards)
UNITE_MODEL_TAGS = ("unite", "learngene", "unite_hf")


class UniteConfig(PreTrainedConfig):
    r"""Configuration of a UNITE target model.

    Args:
        text_config: the source family's config (e.g. ``MixtralConfig``) with ``num_hidden_layers``
            and any per-layer lists already cut to the target's layers. It builds the backbone.
        ffn_layers: target layer indices whose FFN is a factorized UNITE FFN (the others keep the
            family's dense MLP, e.g. DeepSeek-V3's first layers).
        source_layers: for each target layer, the source layer it was grown from.
        projections: ``["gate", "up", "down"]`` (gated experts) or ``["up", "down"]``.
        ranks: ``{proj: [r_out, r_in]}`` of every factorized projection.
        expert_intermediate_size: width of the fused expert (the source's expert width).
        expert_activation: activation name in ``transformers.activations.ACT2FN``.
        expert_bias: whether the fused projections carry biases.
        tie_bases: one set of bases ``U_out, U_in`` per projection shared by all layers (``True``) or
            a copy per layer (``False``, the paper's parameter counts, the default).
        fold_full_rank_bases: a side of a projection at full rank (``r == d``) stores no basis; the core
            absorbs it (exact: the basis is orthonormal and square), so that side costs no parameters.
            ``True`` for targets grown now; ``False`` (targets saved before) keeps a basis on every side.
        shared_experts: ``"keep"`` the source's shared experts as a dense branch, ``"fuse"`` them onto
            the gene's bases (their own small cores, the scalar gate kept), or ``"drop"`` them.
        shared_expert_names: the MoE block's children that are shared experts (or their gates), as the
            source's layout found them at extraction (recorded in the gene); ``None`` (targets saved
            before they were recorded): found by the structural rule of ``model_structure.py``.
        core_init, layer_selection: how the target was grown (provenance; see ``from_gene``).
        gene: the gene's own Hub repo id or folder (``None`` for a gene never saved); ``gene_revision``:
            the commit of the gene's Hub repo the target was grown from (``None`` for a folder, or a target
            grown before it was recorded); ``gene_source``: the id of the model the gene was extracted from.
        card_info: what the model card says beyond the architecture, kept in ``config.json`` so that
            a reloaded target publishes the same card: ``license`` (default: the source's),
            ``datasets`` (Hub ids), ``eval_results`` and extra ``tags``. Set it with
            ``model.set_card_info``.
    """

    model_type = "unite"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="mixtral")}

    text_config: dict | PreTrainedConfig | None = None
    ffn_layers: list[int] | None = None
    source_layers: list[int] | None = None
    projections: list[str] | None = None
    ranks: dict[str, list[int]] | None = None
    expert_intermediate_size: int = 0
    expert_activation: str = "silu"
    expert_bias: bool = False
    tie_bases: bool = False
    fold_full_rank_bases: bool = False
    shared_experts: str = "keep"
    shared_expert_names: list[str] | None = None
    core_init: str = "random"
    layer_selection: str = "first"
    gene: str | None = None
    gene_revision: str | None = None
    gene_source: str | None = None
    card_info: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projections is None:
            self.projections = ["gate", "up", "down"]
        if self.ranks is None:
            self.ranks = {}
        if self.ffn_layers is None:
            self.ffn_layers = []
        if self.core_init not in CORE_INITS:
            raise ValueError(f"core_init must be one of {CORE_INITS}, got {self.core_init!r}")
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ValueError(f"layer_selection must be one of {LAYER_SELECTIONS}, got {self.layer_selection!r}")
        if self.shared_experts not in SHARED_EXPERT_MODES:
            raise ValueError(f"shared_experts must be one of {SHARED_EXPERT_MODES}, got {self.shared_experts!r}")
        missing = [p for p in self.projections if p not in self.ranks] if self.ffn_layers else []
        if missing:
            raise ValueError(f"ranks are missing for projections {missing}")
        # generation and caches read the family's fields through get_text_config(); mirrored here for
        # the heads and for users. Token ids given to the target win over the source's.
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            setattr(self, name, getattr(self.text_config, name))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(self.text_config, name, None))
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["UniteConfig"]
