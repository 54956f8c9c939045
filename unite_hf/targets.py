"""Growing UNITE targets from a gene (paper §3.3): depth, rank, core init, layer selection, bases.

Defaults follow the paper:

- ``core_init="random"``: the cores ``G_l`` start random and everything is fine-tuned (with a
  ``tucker_hidden`` gene, each layer's own neuron-axis factor is re-drawn too: it belongs to the
  layer's coordinates, not to the shared gene). ``"tucker"``
  inherits the Tucker core slice of each source layer (``G_l = sum_k U_L[l, k] G[k]``), which goes
  beyond the paper (its listed limitation is random ``G_l``); at full depth and rank the target then
  reproduces the fused source exactly.
- ``layer_selection="first"``: target layer i takes attention, norms and its core from source layer
  i. ``"uniform"`` spreads the L' target layers evenly over the source's L layers with
  :func:`unite_hf.layer_map.map_layers` (``floor(i * (L - 1) / (L' - 1) + 1/2)``, halves up; MASA's map).
- ``tie_bases=False``: each factorized layer holds its own copy of ``U_out, U_in`` (initialised from
  the gene, free to drift during fine-tuning), which is what the paper's parameter counts imply.
  ``True`` shares one set of bases across all layers.
- ``rank``: the gene's ranks; a smaller rank keeps the leading columns of the bases (and the leading
  block of the core), which is the best rank-r truncation for orthonormal Tucker factors.
- ``shared_experts="keep"``: the source's shared experts stay as a dense branch. ``"fuse"``
  re-expresses them on the gene's bases with cores ``S = U_out.T @ W_shared @ U_in`` (exact at full
  rank; needs shared experts as wide as the routed ones, e.g. DeepSeek, not Qwen2-MoE), ``"drop"``
  removes them. Which children of a MoE block are shared experts is what the source's layout said at
  extraction (``gene.config.shared_experts``, :func:`shared_expert_names`); the target's config carries
  it (``shared_expert_names``), so the target code, also as remote code, keeps exactly those. Anything
  else in a MoE block besides its experts (a router's input norm, say) is routing, replaced by the
  fused FFN like the router itself.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from .configuration_unite import UniteConfig
from .gene import UniteGene
from .layer_map import map_layers
from .model_structure import is_shared_gate, mlp_linear_names, shared_expert_children
from .sources import get_source


def _load_gene(gene: UniteGene | str | os.PathLike, revision: str | None, **loading: Any) -> tuple[UniteGene, str | None]:
    """The gene and its own name (Hub repo id or folder; ``None`` for a gene never saved), which the
    target records as ``config.gene``: never the gene's *source* id. A Hub gene also knows the commit it
    was loaded from (``gene.revision``: ``revision`` resolved), which the target records beside it."""
    if isinstance(gene, UniteGene):
        return gene, gene.name_or_path
    return UniteGene.from_pretrained(gene, revision=revision, **loading), str(gene)


def select_layers(source_layers: int, target_layers: int, selection: str) -> list[int]:
    """Source layer index of each target layer."""
    if not 1 <= target_layers <= source_layers:
        raise ValueError(f"num_hidden_layers={target_layers} is out of range: the source has {source_layers} layers "
                         f"(choose 1..{source_layers}).")
    if selection == "first":
        return list(range(target_layers))
    if selection == "uniform":
        return map_layers(source_layers, target_layers)
    raise ValueError(f"layer_selection must be 'first' or 'uniform', got {selection!r}")


def _is_head(cls: type, name: str) -> bool:
    """Whether ``cls`` is (a subclass of) the target class called ``name``. By name, because this module
    does not import ``modeling_unite``: that module imports this one for ``from_gene`` (no import cycle)."""
    return any(base.__name__ == name and base.__module__.endswith("modeling_unite") for base in cls.__mro__)


def _source_config(gene: UniteGene) -> PreTrainedConfig:
    data = dict(gene.config.source_config)
    model_type = data.pop("model_type", gene.config.source_model_type)
    return AutoConfig.for_model(model_type, **data)


def _target_text_config(source_config: PreTrainedConfig, selected: list[int], dense_layers: list[int]) -> PreTrainedConfig:
    """The family config at the target depth, with every per-layer setting cut to ``selected``."""
    num_layers = source_config.num_hidden_layers
    data = source_config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, list) and len(value) == num_layers and key != "mlp_only_layers":
            data[key] = [value[s] for s in selected]  # layer_types, layers_block_type, ...
    data["num_hidden_layers"] = len(selected)
    dense_positions = [i for i, s in enumerate(selected) if s in dense_layers]
    if "mlp_only_layers" in data or "decoder_sparse_step" in data:  # Qwen2/3-MoE
        data["mlp_only_layers"] = dense_positions
        data["decoder_sparse_step"] = 1
    if data.get("first_k_dense_replace") is not None:  # DeepSeek
        if dense_positions != list(range(len(dense_positions))):
            raise ValueError(
                f"{source_config.model_type} keeps dense layers only as a prefix (first_k_dense_replace); the selected "
                f"source layers {selected} put dense layers at target positions {dense_positions}. Use layer_selection='first'."
            )
        data["first_k_dense_replace"] = len(dense_positions)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def _resolve_target_ranks(gene: UniteGene, rank) -> dict[str, list[int]]:
    ranks = {}
    for proj, (_, gene_out, gene_in) in gene.ranks.items():
        if rank is None:
            wanted = (gene_out, gene_in)
        elif isinstance(rank, int) and not isinstance(rank, bool):
            wanted = (rank, rank)
        elif isinstance(rank, (tuple, list)) and len(rank) == 2:
            wanted = tuple(rank)
        else:
            raise TypeError(f"rank must be an int or (r_out, r_in), got {rank!r}")
        if min(wanted) < 1:
            raise ValueError(f"rank {wanted} for {proj} must be positive")
        if wanted[0] > gene_out or wanted[1] > gene_in:
            raise ValueError(f"rank {wanted} for {proj} is above the gene's ranks ({gene_out}, {gene_in}); "
                             "a target can only truncate the gene's bases.")
        ranks[proj] = [int(wanted[0]), int(wanted[1])]
    return ranks


def _expert_activation(block, source_config: PreTrainedConfig) -> str:
    """Name in ACT2FN of the source experts' activation (preferring the config's own name)."""
    from transformers.activations import ACT2CLS, ACT2FN

    act = block.activation
    names = [n for n in ACT2CLS if type(ACT2FN[n]) is type(act)]
    for preferred in (getattr(source_config, "mlp_hidden_act", None), getattr(source_config, "hidden_act", None)):
        if preferred in names:
            return preferred
    if not names:
        raise ValueError(f"{block.name}: the experts' activation {type(act).__name__} is not in ACT2FN")
    return names[0]


def build_target_config(
    gene: UniteGene,
    *,
    num_hidden_layers: int | None = None,
    rank: int | tuple[int, int] | None = None,
    core_init: str = "random",
    layer_selection: str = "first",
    tie_bases: bool = False,
    shared_experts: str = "keep",
    gene_name: str | None = None,
    gene_revision: str | None = None,
    source=None,
    **config_kwargs: Any,
) -> UniteConfig:
    """The :class:`UniteConfig` of a target grown from ``gene`` (validated, nothing built yet);
    ``gene_name`` and ``gene_revision`` (the commit of its Hub repo) are what the target records of the gene."""
    gc = gene.config
    if gc.custom_gating:
        raise ValueError("the source's experts use family-specific gating (e.g. gpt-oss); UNITE targets rebuild "
                         "act(gate) * up and cannot reproduce it.")
    source_config = _source_config(gene)
    depth = num_hidden_layers if num_hidden_layers is not None else gc.num_layers
    selected = select_layers(gc.num_layers, depth, layer_selection)
    text_config = _target_text_config(source_config, selected, gc.dense_layers)
    ffn_layers = [i for i, s in enumerate(selected) if s in gc.moe_layers]
    if tie_bases and not gene.decompositions[gc.projections[0]].shared_bases:
        raise ValueError(f"the gene's {gc.decomposition!r} decomposition has per-layer bases; tie_bases=True needs "
                         "bases shared on both sides (tucker or cp).")
    source = source or _meta_source(gene)  # the source's structure, for free: where experts live, their activation
    activation = _expert_activation(source.blocks[0], source_config)
    shared_names = shared_expert_names(gene, source)
    if shared_experts == "fuse":
        for s_layer in (s for s in selected if s in gc.moe_layers):
            for proj, weight in shared_expert_weights(gene, s_layer, source).items():
                routed = gene.fused_weight(s_layer, proj).shape
                if tuple(weight.shape) != tuple(routed):
                    raise ValueError(
                        f"shared_experts='fuse' needs shared experts as wide as the routed experts: layer {s_layer} "
                        f"{proj} is {tuple(weight.shape)}, the routed expert {tuple(routed)}. Use 'keep' or 'drop'.")
    return UniteConfig(
        text_config=text_config,
        ffn_layers=ffn_layers,
        source_layers=selected,
        projections=list(gc.projections),
        ranks=_resolve_target_ranks(gene, rank),
        expert_intermediate_size=gc.expert_intermediate_size,
        expert_activation=activation,
        expert_bias=gc.has_bias,
        tie_bases=tie_bases,
        fold_full_rank_bases=True,
        shared_experts=shared_experts,
        shared_expert_names=shared_names,
        core_init=core_init,
        layer_selection=layer_selection,
        gene=gene_name,
        gene_revision=gene_revision,
        gene_source=gc.source_id,
        card_info=_card_info(gc, gene_name),
        **config_kwargs,
    )


def _card_info(gc, gene_name: str | None) -> dict[str, Any]:
    """What the target's card takes from the gene: the source's license, and ``base_model`` decided
    now, while a local gene folder can still be told from a Hub id (later, elsewhere, the same
    relative name could pass for one): the gene's Hub id, else the source's, else none."""
    from .cards import hub_id

    info: dict[str, Any] = {"base_model": hub_id(gene_name) or hub_id(gc.source_id)}
    if getattr(gc, "source_license", None):
        info["license"] = gc.source_license
    return info


def target_state_dict(model: nn.Module, gene: UniteGene, source=None) -> dict[str, torch.Tensor]:
    """The gene's tensors under the target's parameter names: copied non-FFN weights for the selected
    source layers, truncated bases, and (for ``core_init="tucker"``) the inherited cores."""
    config: UniteConfig = model.config
    prefix = model.base_model_prefix + "." if hasattr(model, model.base_model_prefix) else ""
    source = source or _meta_source(gene)
    layers_path = source.layers_path  # e.g. "model.layers"
    base_prefix = layers_path.rsplit(".", 1)[0] + "." if "." in layers_path else ""
    position = {s: i for i, s in enumerate(config.source_layers)}
    names = config.shared_expert_names if config.shared_expert_names is not None else shared_expert_names(gene, source)
    # the roles of the shared experts the gene recorded (the names differ between families and layouts)
    shared_roles = {b.layer_idx: {n: "gate" if is_shared_gate(m) else "mlp" for n, m in shared_expert_children(b.block, names)}
                    for b in source.blocks}
    block_names = {b.layer_idx: b.name for b in source.blocks}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in gene.source_state_dict.items():
        if name.startswith(layers_path + "."):
            layer, rest = name[len(layers_path) + 1:].split(".", 1)
            if int(layer) not in position:
                continue
            block_name = block_names.get(int(layer))
            if block_name is not None and name.startswith(block_name + "."):
                role = shared_roles[int(layer)].get(name[len(block_name) + 1:].split(".", 1)[0])
                if role is None:
                    continue  # neither a shared expert nor its gate: routing, which the fused FFN replaces
                if config.shared_experts == "drop" or (config.shared_experts == "fuse" and role != "gate"):
                    continue  # "fuse" keeps only the scalar gate; the MLP becomes cores below
            name = f"{layers_path[len(base_prefix):]}.{position[int(layer)]}.{rest}"
        elif base_prefix and name.startswith(base_prefix):
            name = name[len(base_prefix):]
        else:  # the source's head (an untied lm_head): only a causal LM target has one
            if hasattr(model, name.split(".")[0]):
                state[name] = tensor
            continue
        state[f"{prefix}backbone.{name}"] = tensor
    unite_model = getattr(model, model.base_model_prefix, model)
    for i in config.ffn_layers:
        ffn = unite_model.ffn(i)
        row = gene.moe_layers.index(config.source_layers[i])
        ffn_name = next(n for n, m in model.named_modules() if m is ffn)
        for proj in config.projections:
            decomposition = gene.decompositions[proj]
            r_out, r_in = config.ranks[proj]
            out_basis = decomposition.layer_out_factor(row)[:, :r_out]
            in_basis = decomposition.layer_in_factor(row)[:, :r_in]
            core = decomposition.layer_core(row)[:r_out, :r_in]
            # a full-rank side is folded into the core (its basis is orthonormal and square: exact)
            fold_out = config.fold_full_rank_bases and r_out == out_basis.shape[0]
            fold_in = config.fold_full_rank_bases and r_in == in_basis.shape[0]
            core = out_basis @ core if fold_out else core
            core = core @ in_basis.T if fold_in else core
            sides = [(side, basis, shared) for side, basis, shared, fold in (
                ("out", out_basis, decomposition.shared_out, fold_out), ("in", in_basis, decomposition.shared_in, fold_in))
                if not fold]
            if config.tie_bases:
                for side, basis, _ in sides:
                    state[f"{prefix}unite_bases.{proj}.{side}_basis"] = basis
            else:
                for side, basis, shared in sides:
                    # a per-layer factor beside a shared one (tucker_hidden) is part of the layer's own
                    # coordinates: inherited with its core, re-drawn (orthogonal init) with random cores
                    if shared or not decomposition.mixed_bases or config.core_init == "tucker":
                        state[f"{ffn_name}.{proj}.bases.{side}_basis"] = basis
            if config.core_init == "tucker":
                state[f"{ffn_name}.{proj}.core"] = core
            bias = gene.fused_bias(config.source_layers[i], proj)
            if bias is not None:
                state[f"{ffn_name}.{proj}.bias"] = bias
        if ffn.shared_cores is not None:
            if any(gene.decompositions[p].mixed_bases for p in config.projections):
                raise ValueError("shared_experts='fuse' needs bases of one kind on both sides; the gene's "
                                 f"{gene.config.decomposition!r} decomposition mixes shared and per-layer bases. "
                                 "Use 'keep' or 'drop'.")
            for proj, weight in shared_expert_weights(gene, config.source_layers[i], source).items():
                where = f"{prefix}unite_bases.{proj}" if config.tie_bases else f"{ffn_name}.{proj}.bases"
                out_basis, in_basis = state.get(f"{where}.out_basis"), state.get(f"{where}.in_basis")  # None: folded
                core = weight.float() if out_basis is None else out_basis.T @ weight.float()
                state[f"{ffn_name}.shared_cores.{proj}"] = core if in_basis is None else core @ in_basis
    return {name: tensor.contiguous() for name, tensor in state.items()}


def shared_expert_weights(gene: UniteGene, source_layer: int, source=None) -> dict[str, torch.Tensor]:
    """The shared expert MLP's ``proj -> (out, in)`` weights of a source layer, from the gene. The MLP and
    its linears are found by structure on the source's (meta) block, as the layout reports them."""
    source = source or _meta_source(gene)
    block = source.block(source_layer)
    mlps = [(n, m) for n, m in shared_expert_children(block.block, shared_expert_names(gene, source))
            if not is_shared_gate(m)]
    if not mlps:
        return {}
    name, mlp = mlps[0]
    linears = mlp_linear_names(mlp) or {}
    weights = {}
    for proj in gene.config.projections:
        key = f"{block.name}.{name}.{linears[proj]}.weight" if proj in linears else None
        if key not in gene.source_state_dict:
            looked_for = key or f"a {proj} linear in {type(mlp).__name__} {block.name}.{name}"
            raise ValueError(f"the gene holds no {proj} weight for the shared expert of layer {source_layer} "
                             f"(looked for {looked_for})")
        weights[proj] = gene.source_state_dict[key]
    return weights


def shared_expert_names(gene: UniteGene, source=None) -> list[str]:
    """The children of the source's MoE blocks that are shared experts or their gates: as the gene recorded
    them at extraction (``gene.config.shared_experts``, what the source's layout found with
    ``MoEBlock.find_shared_experts``). A gene that records none (none found, or a gene written when shared
    experts were found by a list of names) gets what the layout finds on the source's structure now."""
    if gene.config.shared_experts:
        return list(gene.config.shared_experts)
    source = source or _meta_source(gene)
    return [name for name, _ in source.blocks[0].shared_experts]


def __getattr__(name: str) -> object:
    """``SHARED_LINEAR_NAMES`` is deprecated: shared-expert linears are found by structure, with the one
    naming table of :data:`unite_hf.model_structure.MLP_LINEAR_NAMES`."""
    if name == "SHARED_LINEAR_NAMES":
        warnings.warn("unite_hf.targets.SHARED_LINEAR_NAMES is deprecated: see unite_hf.model_structure.MLP_LINEAR_NAMES",
                      FutureWarning, stacklevel=2)
        return {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _meta_source(gene: UniteGene):
    with torch.device("meta"):
        return get_source(AutoModelForCausalLM.from_config(_source_config(gene)))


def grow_from_gene(
    cls,
    gene: UniteGene | str | os.PathLike,
    *,
    num_hidden_layers: int | None = None,
    rank: int | tuple[int, int] | None = None,
    core_init: str = "random",
    layer_selection: str = "first",
    tie_bases: bool = False,
    shared_experts: str = "keep",
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    dtype: torch.dtype | str | None = None,
    device_map: str | int | torch.device | None = None,
    **config_kwargs: Any,
):
    """Build a ``UniteFor*`` target from a gene (object, folder or Hub id); see the module docstring.

    Loading arguments work as in ``from_pretrained`` and are never written to the config:
    ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download`` (for a Hub gene),
    ``dtype`` (``torch_dtype`` is accepted with a deprecation warning; ``"auto"`` keeps float32) and
    ``device_map`` (one device: ``"cpu"``, ``"cuda:0"``, an index, or ``"auto"`` for the first
    accelerator if any). Every other keyword argument must be a config field (``num_labels``,
    ``id2label``, ``pad_token_id``, ...); anything else is an error, so a typo is not silently kept.
    Classifiers require ``num_labels`` (or ``id2label``). The gene's tokenizer, if it holds one, becomes
    ``model.tokenizer``, which the target's ``save_pretrained`` and ``push_to_hub`` write beside it.
    """
    if "torch_dtype" in config_kwargs:
        warnings.warn("torch_dtype is deprecated, use dtype", FutureWarning, stacklevel=3)
        torch_dtype = config_kwargs.pop("torch_dtype")
        dtype = dtype if dtype is not None else torch_dtype
    dtype = _resolve_dtype(dtype)
    device = _resolve_device(device_map)
    _check_config_kwargs(config_kwargs)
    if _is_head(cls, "UniteForSequenceClassification") and "num_labels" not in config_kwargs and "id2label" not in config_kwargs:
        raise ValueError(f"{cls.__name__}.from_gene needs num_labels (or id2label): how many classes does the task have?")
    if "num_labels" in config_kwargs:
        num_labels = config_kwargs["num_labels"]
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if _is_head(cls, "UniteForMultipleChoice") and "num_labels" in config_kwargs:
        warnings.warn("num_labels is ignored by UniteForMultipleChoice: the number of choices comes from the input.")
    gene, name = _load_gene(gene, revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                            force_download=force_download)
    source = _meta_source(gene)  # built once: config validation and weight mapping both read it
    config = build_target_config(gene, num_hidden_layers=num_hidden_layers, rank=rank, core_init=core_init,
                                 layer_selection=layer_selection, tie_bases=tie_bases, shared_experts=shared_experts,
                                 gene_name=name, gene_revision=gene.revision, source=source, **config_kwargs)
    model = cls(config)
    # Trainer's card names config.name_or_path as the base model: the gene. model.name_or_path (what
    # peft records as an adapter's base) stays empty until the target is saved or pushed somewhere.
    model.config.name_or_path = name or ""
    state = target_state_dict(model, gene, source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"gene tensors without a place in the target (a mapping bug): {unexpected[:5]}")
    allowed = ("core", "score.weight", "lm_head.weight", "rotary_emb")
    mixed = any(d.mixed_bases for d in gene.decompositions.values())
    if core_init == "random" and mixed:  # re-drawn per-layer neuron factors of tucker_hidden
        allowed += ("bases.out_basis", "bases.in_basis")
    lost = [k for k in missing if not k.endswith(allowed) and "rotary" not in k]
    if lost:
        raise ValueError(f"target weights the gene does not provide: {lost[:5]}")
    if dtype is not None:
        model = model.to(dtype)
        model.config.dtype = dtype  # in memory too, not only in the saved file
    if device is not None:
        model = model.to(device)
    model.tokenizer = gene.tokenizer  # saved and pushed with the target (a gene made with a tokenizer holds one)
    return model


# from_pretrained-style arguments that steer loading and never belong in a saved config
LOADING_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "dtype", "torch_dtype",
                  "device_map")
# config arguments PreTrainedConfig accepts that are not dataclass fields
_EXTRA_CONFIG_KWARGS = ("num_labels",)


def _check_config_kwargs(config_kwargs: dict[str, Any]) -> None:
    import dataclasses

    fields = {f.name for f in dataclasses.fields(UniteConfig)} | set(_EXTRA_CONFIG_KWARGS)
    # fields from_gene sets itself from the gene and its options
    owned = {"text_config", "ffn_layers", "source_layers", "projections", "ranks", "expert_intermediate_size",
             "expert_activation", "expert_bias", "gene", "gene_revision", "gene_source", "card_info", "tie_bases",
             "shared_experts",
             "shared_expert_names", "core_init",
             "layer_selection"}
    unknown = sorted(k for k in config_kwargs if k not in fields or k in owned)
    if unknown:
        raise TypeError(f"from_gene got unexpected keyword arguments {unknown}: they are neither loading arguments "
                        f"{list(LOADING_KWARGS)} nor UniteConfig fields a caller may set (e.g. num_labels, id2label, "
                        "label2id, pad_token_id, problem_type).")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":  # a gene is stored in float32; "auto" keeps it
        return None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def _resolve_device(device_map) -> torch.device | None:
    """One device for the whole target (targets are small: no multi-device dispatch)."""
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device(torch.accelerator.current_accelerator() or "cpu") if torch.accelerator.is_available() \
            else torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map places a target on one device; got several: {sorted(map(str, devices))}")
        device_map = devices.pop()
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device_map {device_map!r} is not a device: {err}") from err
