"""Plain Llama targets of any width and depth, their FFNs filled from a gene's small matrices.

The target side that every method with gene matrices shares (MASA's, XPERT's, ``unite-hf finetune
--init masa``). A gene that can fill such a target exposes, per source layer and projection, one small
matrix ``M`` (``r_out x r_in``, :class:`ScalableGene`):

- a MASA gene: its trained ``r x r`` gene matrices (:meth:`~unite_hf.methods.masa.MasaGene.gene_matrix`);
- an XPERT gene: the layer's common experts side by side (:meth:`~unite_hf.methods.xpert.XpertGene.gene_matrix`).

**Scalings** bring a layer's gate, up and down matrices together to the target's ``(intermediate, hidden)``
shapes. They form a registry (:data:`FFN_SCALINGS`, :func:`register_scaling`): each method registers the
scaling it brings from its own folder, so this module depends on none of them:

- ``"adaptive"`` (MASA, ``unite_hf.methods.masa.scaling``): each matrix on its own, rows and columns
  kept or duplicated by their Σ-weighted SVD norms;
- ``"coupled"`` (XPERT, ``unite_hf.methods.xpert.scaling``): one neuron set and one channel set per layer
  for all three matrices;
- ``"truncate"`` (here, the ablation without scaling): the top-left block, zero padding.

Rows and columns are ranked and kept or duplicated by :func:`ranked_indices` (top-``p`` in their
original order when shrinking; all, then the top ones again, when growing).

**Layer mapping**: :func:`unite_hf.layer_map.map_layers`, the one map UNITE targets use too: target
layer ``j`` of ``L'`` takes source layer ``floor(j * (L - 1) / (L' - 1) + 1/2)`` (uniform stretch,
halves rounded up: first to first, last to last; layers skipped for ``L' < L``, repeated for ``L' > L``).

:func:`masa_init` (named after MASA, where the scheme comes from) fills the FFN weights (gate, up, down)
of a standard ``LlamaFor*`` model; all other weights keep the standard random init, so the result is a
plain Llama checkpoint that loads with ``AutoModel*`` and no custom code. :func:`llama_target_config`
makes the config of such a target from the source's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn

from .layer_map import map_layers

__all__ = ["FFN_SCALINGS", "LLAMA_FFN", "ScalableGene", "ScaledMatrix", "llama_target_config", "masa_init",
           "ranked_indices", "register_scaling", "scale_each", "truncate_or_pad"]

# target FFN projection -> (Linear name in a Llama MLP, which target dims are (out, in))
LLAMA_FFN: dict[str, tuple[str, tuple[str, str]]] = {
    "gate": ("gate_proj", ("intermediate_size", "hidden_size")),
    "up": ("up_proj", ("intermediate_size", "hidden_size")),
    "down": ("down_proj", ("hidden_size", "intermediate_size")),
}


class ScalableGene(Protocol):
    """What :func:`masa_init` needs from a gene (``default_scaling``, a name in :data:`FFN_SCALINGS`, optional)."""

    @property
    def matrix_layers(self) -> list[int]: ...  # source layers that hold gene matrices, in order

    def gene_matrix(self, layer: int, proj: str) -> torch.Tensor: ...  # (r_out, r_in)


@dataclass
class ScaledMatrix:
    """A matrix brought to a target size, with the choices behind it for inspection."""

    weight: torch.Tensor  # (p, q)
    rows: torch.Tensor  # (p,) row of M behind each target row
    cols: torch.Tensor  # (q,) column of M behind each target column
    singular_values: torch.Tensor  # Σ of M, unchanged


def ranked_indices(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of ``size`` rows ranked by ``scores``: the top ``size`` kept in their original order when
    shrinking; all of them, then the top ones again (cycling through the ranking), when growing."""
    if size < 1:
        raise ValueError(f"a target dimension must be at least 1, got {size}")
    ranking = torch.argsort(scores, descending=True, stable=True)
    r = scores.numel()
    if size <= r:
        return torch.sort(ranking[:size]).values
    extra = ranking.repeat((size - r) // r + 1)[: size - r]
    return torch.cat([torch.arange(r), extra])


def truncate_or_pad(matrix: torch.Tensor, p: int, q: int) -> ScaledMatrix:
    """The ablation without adaptive scaling: keep the top-left ``p x q`` block, zero-pad beyond ``r``."""
    if p < 1 or q < 1:
        raise ValueError(f"a target dimension must be at least 1, got {(p, q)}")
    weight = matrix.new_zeros(p, q)
    rp, rq = min(p, matrix.shape[0]), min(q, matrix.shape[1])
    weight[:rp, :rq] = matrix[:rp, :rq]
    return ScaledMatrix(weight, torch.arange(rp), torch.arange(rq), torch.linalg.svdvals(matrix.double()).to(matrix.dtype))


def scale_each(matrices: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
               scale: Callable[[torch.Tensor, int, int], ScaledMatrix]) -> dict[str, torch.Tensor]:
    """Every projection's matrix scaled on its own by ``scale(matrix, p, q)``."""
    return {proj: scale(matrices[proj], *shapes[proj]).weight for proj in matrices}


FfnScaling = Callable[[dict[str, torch.Tensor], dict[str, tuple[int, int]]], dict[str, torch.Tensor]]
# name -> (matrices {proj: (out, in)}, target shapes {proj: (p, q)}) -> scaled weights
FFN_SCALINGS: dict[str, FfnScaling] = {}


def register_scaling(name: str) -> Callable[[FfnScaling], FfnScaling]:
    """Decorator: make ``scaling(matrices, shapes) -> weights`` available to :func:`masa_init` as ``name``."""

    def decorator(scaling: FfnScaling) -> FfnScaling:
        FFN_SCALINGS[name] = scaling
        return scaling

    return decorator


register_scaling("truncate")(lambda matrices, shapes: scale_each(matrices, shapes, truncate_or_pad))


def _llama_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    mlp = getattr(layers[0], "mlp", None) if isinstance(layers, nn.ModuleList) and len(layers) else None
    if mlp is None or not all(isinstance(getattr(mlp, name, None), nn.Linear) for name, _ in LLAMA_FFN.values()):
        raise TypeError(f"{type(model).__name__} is not a Llama-style model (model.layers[i].mlp with gate_proj, "
                        "up_proj, down_proj); masa_init fills LlamaFor* models.")
    return layers


def masa_init(
    llama_config_or_model: Any,
    gene: ScalableGene,
    *,
    scaling: str | None = None,
    model_class: type | None = None,
) -> nn.Module:
    """Fill the FFN weights of a standard Llama model of any width and depth from ``gene``.

    Args:
        llama_config_or_model: a ``LlamaConfig`` (a ``model_class``, default ``LlamaForCausalLM``, is
            built with the standard random init) or an existing ``LlamaFor*`` model (filled in place).
        gene: a MASA or XPERT gene, or anything with ``matrix_layers`` and ``gene_matrix(layer, proj)``.
        scaling: a name in :data:`FFN_SCALINGS` (``"adaptive"``, ``"coupled"``, ``"truncate"``);
            default: the gene's ``default_scaling`` (MASA: adaptive, XPERT: coupled).

    Each target layer takes the source layer given by :func:`map_layers`; gate, up and down are the
    gene matrices of that layer, scaled to the target's ``(intermediate, hidden)`` shapes. Biases and
    every non-FFN weight keep their init. Returns the model.
    """
    if not hasattr(gene, "gene_matrix") or not hasattr(gene, "matrix_layers"):
        raise TypeError(f"{type(gene).__name__} has no gene matrices; pass a MASA or XPERT gene")
    scaling = scaling or getattr(gene, "default_scaling", "adaptive")
    if scaling not in FFN_SCALINGS:
        raise ValueError(f"scaling must be one of {sorted(FFN_SCALINGS)}, got {scaling!r}")
    projections = list(getattr(getattr(gene, "config", None), "projections", LLAMA_FFN))
    if set(projections) != set(LLAMA_FFN):
        raise ValueError(f"the gene has projections {projections}: a Llama FFN needs gate, up and down "
                         "(non-gated sources cannot fill a gated Llama MLP)")
    if isinstance(llama_config_or_model, nn.Module):
        model = llama_config_or_model
    else:
        config = llama_config_or_model
        for dim in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(config, dim, 0) < 1:
                raise ValueError(f"target {dim}={getattr(config, dim, None)} must be at least 1")
        if model_class is None:
            from transformers import LlamaForCausalLM as model_class  # noqa: N813
        model = model_class(config)
    layers = _llama_layers(model)
    gene_layers = gene.matrix_layers
    scale = FFN_SCALINGS[scaling]
    with torch.no_grad():
        for target_idx, gene_idx in enumerate(map_layers(len(gene_layers), len(layers))):
            linears = {proj: getattr(layers[target_idx].mlp, name) for proj, (name, _) in LLAMA_FFN.items()}
            matrices = {proj: gene.gene_matrix(gene_layers[gene_idx], proj).detach().float().cpu() for proj in LLAMA_FFN}
            shapes = {proj: (lin.out_features, lin.in_features) for proj, lin in linears.items()}
            for proj, weight in scale(matrices, shapes).items():
                linears[proj].weight.copy_(weight.to(linears[proj].weight.dtype))
    return model


def llama_target_config(source_config: Any, *, hidden_size: int, intermediate_size: int | None = None,
                        num_hidden_layers: int = 2, head_dim: int | None = None, **overrides: Any):
    """A ``LlamaConfig`` of the given width and depth that keeps the source's vocabulary, positions,
    norms and rope settings (so the source's tokenizer fits). ``intermediate_size`` defaults to the
    source's intermediate / hidden ratio (8/3 for a MoE source); heads keep the source's head size."""
    from transformers import LlamaConfig

    for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
                        ("num_hidden_layers", num_hidden_layers), ("head_dim", head_dim)):
        if value is not None and value < 1:
            raise ValueError(f"target {name} must be at least 1, got {value}")
    source = source_config.to_dict() if hasattr(source_config, "to_dict") else dict(source_config)
    src_hidden = source["hidden_size"]
    is_moe = any(source.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts"))
    # a MoE's expert width is not a dense FFN's: use the SwiGLU convention 8/3 there
    ratio = 8 / 3 if is_moe or not source.get("intermediate_size") else source["intermediate_size"] / src_hidden
    if intermediate_size is None:
        intermediate_size = max(1, round(hidden_size * ratio))
    if head_dim is None:
        head_dim = source.get("head_dim") or src_hidden // source["num_attention_heads"]
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of the head size {head_dim}; pass head_dim=")
    heads = hidden_size // head_dim
    kv_ratio = max(1, source["num_attention_heads"] // (source.get("num_key_value_heads") or source["num_attention_heads"]))
    kv_heads = heads // kv_ratio if heads % kv_ratio == 0 else heads
    keep = ("vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta", "hidden_act",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
    kwargs = {k: source[k] for k in keep if source.get(k) is not None}
    kwargs.update(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)
