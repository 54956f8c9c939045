"""Dense -> Mixture-of-Experts conversion ("moefy"), in the style of MoEfication and LLaMA-MoE.

No pretrained MoE can be downloaded everywhere, but pretrained dense Llama-family models can. This
module turns one into a transformers ``MixtralForCausalLM`` by splitting every layer's FFN neurons
(its ``intermediate_size`` units) into ``E`` equal groups, one expert each:

* **Experts** are an exact partition of the dense neurons. Expert ``e`` holding neurons ``S_e`` gets the
  gate and up rows ``W_gate[S_e], W_up[S_e]`` (fused as Mixtral's ``gate_up_proj[e]``, gate first) and
  the down columns ``W_down[:, S_e] * down_scale`` (``down_proj[e]``). Because the FFN is a sum over
  neurons, ``sum_e W_down[:, S_e] @ (act(W_gate[S_e] x) * W_up[S_e] x)`` *is* the dense FFN.
* **Scaling convention.** Mixtral renormalises the top-k routing weights to sum to 1, so a token's FFN
  output is ``sum_{e in topk} w_e * down_scale * y_e`` with ``y_e`` the dense contribution of expert e's
  neurons. ``down_scale`` defaults to ``top_k``: when the weights of the chosen experts are equal
  (``1/top_k``) each chosen expert contributes exactly its dense share, and the unchosen neurons are
  dropped. In particular ``top_k = E`` with ``router="uniform"`` (zero router weights: softmax gives
  ``1/E`` to every expert) reproduces the dense model exactly, up to float rounding.
* **Grouping** (``grouping=``): ``"coactivation"`` (default when calibrating; balanced k-means on the
  neurons' centred activation magnitudes over calibration tokens: neurons that fire on the same tokens
  share an expert, so the router can find them and a token's top-k experts hold more of its activation
  mass), ``"balanced_kmeans"`` (default without data; balanced spherical k-means on each neuron's
  normalised gate and up rows) and ``"contiguous"`` (neurons ``[e*I/E, (e+1)*I/E)``, the naive
  baseline).
* **Router** (``router=``): ``"fit"`` (default) regresses each expert's log activation mass
  ``log sum_{n in S_e} |act(g_n) u_n|`` on the MLP's input hidden states (ridge least squares; Mixtral's
  router has no bias and softmax ignores per-token shifts, so targets are centred per token), then picks
  one temperature per layer that minimises the MLP output error on the calibration tokens.
  ``"centroid"`` uses the mean gate row of each expert (no data needed; temperature fitted when
  calibration is given). ``"uniform"`` uses zero weights (only meaningful with ``top_k = E``).

Calibration hidden states are captured from the *dense* model (the input of each layer's MLP) in one
pass, with forward pre-hooks; they take ``layers * N * T * hidden * 4`` bytes.

On SmolLM2-135M-Instruct (E=8) the exact conversion matches the dense WikiText-2 perplexity to 6 digits;
top-2 without further training does not give a usable LM (top-6 does): see ``benchmarks/MOEFY.md``.

A tool beside the library (``tools/``, not installed with ``unite_hf``): ``unite-hf moefy`` runs it from a
source checkout; ``unite_hf.moefy`` and ``from unite_hf import moefy`` forward here with a FutureWarning.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unite_hf.calibration import DEFAULT_CALIBRATION, CalibrationSet, load_calibration

if TYPE_CHECKING:  # pragma: no cover
    from transformers import MixtralForCausalLM

__all__ = [
    "GROUPINGS",
    "ROUTERS",
    "MoefyError",
    "add_arguments",
    "balanced_kmeans",
    "expert_activation_mass",
    "moefy",
    "routing_agreement",
    "run",
]

GROUPINGS = ("balanced_kmeans", "coactivation", "contiguous")
ROUTERS = ("fit", "centroid", "uniform")
#: model types whose decoder layer is exactly Mixtral's minus the MoE block (same norms, attention, RoPE).
#: Others with the same parameter names (e.g. Gemma: (1 + w) norms, scaled embeddings) would convert silently wrong.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
#: router temperatures tried per layer (multipliers of the fitted router weight); 1e-3 keeps the ranking
#: but makes the chosen experts' weights almost equal (each then adds its dense share, see down_scale)
_TEMPERATURES = (1e-3, 0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
#: ridge penalty of the router fit, relative to the mean diagonal of X^T X
_RIDGE = 1e-3
#: at most this many calibration tokens are used per layer for k-means features (keeps it fast)
_MAX_FEATURE_TOKENS = 4096


class MoefyError(ValueError):
    """The model or the options cannot be converted (raised before any calibration work)."""


@dataclass
class _LayerStats:
    """Held-out routing quality of one converted layer (stored in ``config.moefy["layers"]``)."""

    routing_agreement: float | None = None  # |router top-k ∩ oracle top-k| / k on held-out tokens
    captured_mass: float | None = None  # activation mass in the router's top-k / total mass
    relative_error: float | None = None  # ||MoE MLP out - dense MLP out|| / ||dense MLP out||
    temperature: float | None = None


# ---------------------------------------------------------------------------------------------------
# public helpers
# ---------------------------------------------------------------------------------------------------

def balanced_kmeans(features: torch.Tensor, num_clusters: int, *, seed: int = 0, n_iter: int = 30) -> torch.Tensor:
    """Balanced spherical k-means: split ``n`` rows into ``num_clusters`` groups of exactly ``n / k`` rows.

    Rows are L2-normalised (cosine similarity), centroids start from a seeded k-means++ draw, and every
    assignment step is a capacity-constrained greedy auction (each round, every unassigned row proposes
    to its most similar non-full cluster; a cluster keeps its most similar proposers up to capacity).

    Args:
        features: ``[n, d]`` float tensor, ``n`` divisible by ``num_clusters``.
        num_clusters: ``k``.
        seed: seed of the initial centroid draw (same seed, same groups).
        n_iter: maximum Lloyd iterations (stops early when assignments stop changing).

    Returns:
        ``LongTensor [k, n / k]``: the row indices of each group, each row sorted ascending, groups
        ordered by their smallest index (so the result does not depend on cluster numbering).
    """
    n = features.shape[0]
    if n % num_clusters:
        raise MoefyError(f"{n} rows cannot be split into {num_clusters} equal groups")
    if num_clusters == 1:
        return torch.arange(n).unsqueeze(0)
    x = F.normalize(features.float(), dim=1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++ init: spread the starting centroids so clusters do not collapse
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, num_clusters):
        probs = dist.cpu() + 1e-12
        nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
        centroids.append(x[nxt])
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp_min(0))
    c = torch.stack(centroids)
    labels = None
    for _ in range(n_iter):
        new = _balanced_assign(x @ c.T, n // num_clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        c = F.normalize(torch.zeros_like(c).index_add_(0, labels, x), dim=1)
    return _groups_from_labels(labels, num_clusters)


def expert_activation_mass(experts: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Per-token activation mass of each expert: ``sum_{n in expert} |act(gate_n) * up_n|``.

    Args:
        experts: a Mixtral-style fused experts module (``gate_up_proj`` ``(E, 2I, H)``, gate first).
        hidden_states: ``[tokens, H]`` MLP inputs.

    Returns:
        ``[tokens, E]`` float32.
    """
    x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(experts.gate_up_proj.dtype)
    gate, up = torch.einsum("th,eih->eti", x, experts.gate_up_proj).chunk(2, dim=-1)
    return (experts.act_fn(gate) * up).abs().sum(-1).T.float()


def routing_agreement(router_weight: torch.Tensor, hidden_states: torch.Tensor, mass: torch.Tensor,
                      top_k: int) -> float:
    """Mean ``|router top-k ∩ oracle top-k| / k`` over tokens, the oracle ranking experts by ``mass``.

    A random router scores about ``k / E``; a perfect one scores 1.
    """
    x = hidden_states.reshape(-1, hidden_states.shape[-1]).float()
    chosen = (x @ router_weight.float().T).topk(top_k, dim=-1).indices
    oracle = mass.float().topk(top_k, dim=-1).indices
    hits = (chosen.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).float().sum(-1)
    return float(hits.mean() / top_k)


# ---------------------------------------------------------------------------------------------------
# moefy
# ---------------------------------------------------------------------------------------------------

def moefy(
    dense_model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    calibration: Any = None,
    tokenizer: Any = None,
    *,
    grouping: str | None = None,
    router: str = "fit",
    down_scale: float | None = None,
    seed: int = 0,
    num_sequences: int = 16,
    seq_len: int = 256,
    batch_size: int = 4,
    show_progress: bool = True,
) -> MixtralForCausalLM:
    """Convert a pretrained dense Llama-family causal LM into a ``MixtralForCausalLM``.

    Embeddings, attention, norms and ``lm_head`` are copied exactly (ties kept); each FFN becomes
    ``num_experts`` experts that partition its neurons (see the module docstring).

    Args:
        dense_model: a ``LlamaForCausalLM`` or ``MistralForCausalLM`` (SmolLM2, TinyLlama, Llama 2/3, ...)
            with bias-free ``mlp.gate_proj/up_proj/down_proj``. It is not modified.
        num_experts: ``E``; must divide ``intermediate_size``.
        top_k: experts per token (``num_experts_per_tok``), ``1 <= top_k <= E``.
        calibration: corpus for ``grouping="coactivation"`` and for ``router="fit"`` (and the temperature
            of ``router="centroid"``): anything :func:`unite_hf.load_calibration` reads (a corpus alias,
            a text file, a list of strings, a ``datasets.Dataset``, an input_ids tensor ``[N, T]``).
            ``None`` means ``"wikitext2"`` when calibration is needed, and no calibration otherwise.
        tokenizer: needed for text calibration.
        grouping: ``"balanced_kmeans"`` | ``"coactivation"`` | ``"contiguous"``; ``None`` (default) means
            ``"coactivation"`` when calibration is used (``router="fit"`` or ``calibration`` given) and
            ``"balanced_kmeans"`` otherwise. On SmolLM2-135M co-activation grouping gave 14x lower top-2
            perplexity than weight k-means (benchmarks/MOEFY.md).
        router: ``"fit"`` | ``"centroid"`` | ``"uniform"``.
        down_scale: factor applied to every expert's ``down_proj``; ``None`` means ``top_k``.
            **Exactness:** ``moefy(m, E, top_k=E, router="uniform")`` (so ``down_scale = E`` and every
            routing weight is ``1/E``) has the same logits as ``m`` up to float rounding.
        seed: seeds k-means and the calibration windows; the same seed gives the same model.
        num_sequences, seq_len: calibration windows ``N x T`` (ignored for an input_ids tensor).
        batch_size: sequences per calibration forward pass.
        show_progress: tqdm bars over calibration batches and layers.

    Returns:
        a ``MixtralForCausalLM`` in eval mode, on the dense model's device and dtype. Its
        ``config.moefy`` records the options, the calibration set and per-layer held-out routing
        statistics (routing agreement with the activation-mass oracle, captured mass, MLP output error).

    Raises:
        MoefyError (a ``ValueError``): bad ``num_experts``/``top_k``/``grouping``/``router``/``down_scale``,
            a model that is not a dense Llama-family causal LM, ``intermediate_size`` not divisible by
            ``num_experts``, NaN/Inf weights, or text calibration without a tokenizer. All are checked
            before calibration starts.
    """
    from unite_hf.progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    if grouping is None:  # co-activation groups are much better, but only data can reveal them
        grouping = "coactivation" if (router == "fit" or calibration is not None) else "balanced_kmeans"
    layers = _validate(dense_model, num_experts, top_k, grouping, router, down_scale)
    scale = float(top_k if down_scale is None else down_scale)
    dense_cfg = dense_model.config
    config = _mixtral_config(dense_cfg, num_experts, top_k)
    with no_init_weights():  # every tensor is overwritten below: skip the random init
        moe = MixtralForCausalLM(config)
    _check_same_non_ffn_keys(dense_model, moe)

    needs_data = router == "fit" or grouping == "coactivation"
    calib: CalibrationSet | None = None
    captured: list[torch.Tensor] | None = None
    if needs_data or calibration is not None:
        if needs_data and calibration is None:
            calibration = DEFAULT_CALIBRATION
        if not isinstance(calibration, (torch.Tensor, CalibrationSet)) and tokenizer is None:
            raise MoefyError(f"calibration {calibration!r} is text: pass tokenizer= (or an input_ids tensor [N, T])")
        calib = load_calibration(calibration, tokenizer, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                 show_progress=show_progress)
        vocab = dense_model.get_input_embeddings().weight.shape[0]
        if int(calib.input_ids.max()) >= vocab or int(calib.input_ids.min()) < 0:
            raise MoefyError(f"calibration token ids must lie in [0, {vocab}), got max {int(calib.input_ids.max())}")
        captured = _capture_mlp_inputs(dense_model, layers, calib.input_ids, batch_size, show_progress)

    # expert and router tensors, layer by layer; everything else is copied as is
    state = {k: v for k, v in dense_model.state_dict().items() if ".mlp." not in k}
    stats: list[_LayerStats] = []
    gen = torch.Generator().manual_seed(seed)
    for idx, layer in enumerate(tqdm(layers, desc="moefy layers", unit="layer", disable=not show_progress)):
        x = None if captured is None else captured[idx]
        gate_up, down, router_w, layer_stats = _convert_layer(
            layer.mlp, x, num_experts, top_k, grouping, router, scale, seed + idx, gen, dense_cfg.hidden_act)
        prefix = f"model.layers.{idx}.mlp."
        dtype = layer.mlp.gate_proj.weight.dtype
        state[prefix + "experts.gate_up_proj"] = gate_up.to(dtype)
        state[prefix + "experts.down_proj"] = down.to(dtype)
        state[prefix + "gate.weight"] = router_w.to(dtype)
        stats.append(layer_stats)
        if captured is not None:
            captured[idx] = None  # type: ignore[call-overload]  # free as we go

    device = next(dense_model.parameters()).device
    moe.to(device=device, dtype=dense_model.get_input_embeddings().weight.dtype)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    # tied lm_head may be absent from either side; anything else missing is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"moefy internal error: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    moe.config.moefy = {
        "source": getattr(dense_cfg, "_name_or_path", None) or None,
        "source_model_type": dense_cfg.model_type,
        "num_experts": num_experts, "top_k": top_k, "grouping": grouping, "router": router,
        "down_scale": scale, "seed": seed,
        "calibration": None if calib is None else {"name": calib.name, "num_sequences": calib.num_sequences,
                                                     "seq_len": calib.seq_len, "seed": calib.seed},
        "layers": [vars(s) for s in stats],
    }
    return moe.eval()


# ---------------------------------------------------------------------------------------------------
# validation and config
# ---------------------------------------------------------------------------------------------------

def _validate(model: nn.Module, num_experts: int, top_k: int, grouping: str, router: str,
              down_scale: float | None) -> nn.ModuleList:
    """Every check that needs no data, so a bad call fails in milliseconds."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise MoefyError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise MoefyError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_k > num_experts:
        raise MoefyError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if grouping not in GROUPINGS:
        raise MoefyError(f"unknown grouping {grouping!r}; choose one of {GROUPINGS}")
    if router not in ROUTERS:
        raise MoefyError(f"unknown router {router!r}; choose one of {ROUTERS}")
    if router == "uniform" and top_k < num_experts:
        # equal logits make topk pick experts 0..k-1 for every token: never what anyone wants
        raise MoefyError(f"router='uniform' needs top_k == num_experts ({num_experts}), got top_k={top_k}")
    valid_scale = isinstance(down_scale, (int, float)) and math.isfinite(down_scale) and down_scale > 0
    if down_scale is not None and not valid_scale:
        raise MoefyError(f"down_scale must be a positive finite number, got {down_scale!r}")

    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    config = getattr(model, "config", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or getattr(model, "lm_head", None) is None:
        raise MoefyError(f"{type(model).__name__} is not a causal LM with model.layers and lm_head "
                         "(pass e.g. a LlamaForCausalLM)")
    for idx, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "experts"):
            raise MoefyError(f"model.layers.{idx}.mlp already has experts: {type(model).__name__} is a MoE, "
                             "not a dense model")
        if mlp is None or not all(isinstance(getattr(mlp, p, None), nn.Linear) for p in _FFN_PROJS):
            raise MoefyError(f"model.layers.{idx}.mlp ({type(mlp).__name__}) has no nn.Linear "
                             "gate_proj/up_proj/down_proj: not a dense Llama-family FFN")
        if any(getattr(mlp, p).bias is not None for p in _FFN_PROJS):
            raise MoefyError(f"model.layers.{idx}.mlp has biases; Mixtral experts have none")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MoefyError(f"model_type {model_type!r} is not supported: moefy converts {SUPPORTED_MODEL_TYPES} "
                         "models, whose layers are Mixtral's minus the MoE block")
    intermediate = layers[0].mlp.gate_proj.out_features
    if any(layer.mlp.gate_proj.out_features != intermediate for layer in layers):
        raise MoefyError("layers have different intermediate sizes")
    if intermediate % num_experts:
        raise MoefyError(f"intermediate_size {intermediate} is not divisible by num_experts={num_experts}")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            bad = "NaN" if torch.isnan(tensor).any() else "Inf"
            raise MoefyError(f"weight {name!r} contains {bad}")
    return layers


def _mixtral_config(dense_cfg: Any, num_experts: int, top_k: int):
    """The Mixtral config with the dense model's attention/norm/RoPE fields and I/E per expert."""
    from transformers import MixtralConfig

    head_dim = getattr(dense_cfg, "head_dim", None) or dense_cfg.hidden_size // dense_cfg.num_attention_heads
    return MixtralConfig(
        vocab_size=dense_cfg.vocab_size,
        hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size // num_experts,
        num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads,
        num_key_value_heads=dense_cfg.num_key_value_heads or dense_cfg.num_attention_heads,
        head_dim=head_dim,
        hidden_act=dense_cfg.hidden_act,
        max_position_embeddings=dense_cfg.max_position_embeddings,
        initializer_range=dense_cfg.initializer_range,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        pad_token_id=dense_cfg.pad_token_id,
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        tie_word_embeddings=dense_cfg.tie_word_embeddings,
        sliding_window=getattr(dense_cfg, "sliding_window", None),
        attention_dropout=dense_cfg.attention_dropout,
        rope_parameters=dict(dense_cfg.rope_parameters) if dense_cfg.rope_parameters else None,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        dtype=getattr(dense_cfg, "dtype", None),
    )


def _check_same_non_ffn_keys(dense: nn.Module, moe: nn.Module) -> None:
    """Attention, norms and embeddings must map 1:1 (catches attention biases, q/k norms, ...)."""
    def non_ffn(model: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if ".mlp." not in k and k != "lm_head.weight"}

    d, m = non_ffn(dense), non_ffn(moe)
    if d != m:
        only_dense = sorted(set(d) - set(m))[:5]
        only_moe = sorted(set(m) - set(d))[:5]
        shapes = sorted(k for k in set(d) & set(m) if d[k] != m[k])[:5]
        raise MoefyError(f"{type(dense).__name__} does not map onto Mixtral: only in the dense model {only_dense}, "
                         f"only in Mixtral {only_moe}, different shapes {shapes}")


# ---------------------------------------------------------------------------------------------------
# calibration and per-layer conversion
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def _capture_mlp_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                        show_progress: bool) -> list[torch.Tensor]:
    """One dense forward pass over the calibration windows, recording every MLP's input ``[N*T, H]``."""
    chunks: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: chunks[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="moefy calibration", unit="batch",
                          disable=not show_progress):
            model(input_ids=input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [torch.cat(c) for c in chunks]


@torch.no_grad()
def _convert_layer(mlp: nn.Module, x: torch.Tensor | None, num_experts: int, top_k: int, grouping: str, router: str,
                   scale: float, seed: int, gen: torch.Generator, hidden_act: str):
    """Group one FFN's neurons, build its fused expert tensors and its router, and measure them."""
    from transformers.activations import ACT2FN

    act = ACT2FN[hidden_act]
    w_gate = mlp.gate_proj.weight.float()  # (I, H)
    w_up = mlp.up_proj.weight.float()  # (I, H)
    w_down = mlp.down_proj.weight.float()  # (H, I)
    n_neurons = w_gate.shape[0]

    fit_x = held_x = None
    if x is not None:
        # seeded 80/20 token split: the router is fitted on one part and measured on the other
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        n_fit = max(1, int(0.8 * x.shape[0])) if x.shape[0] > 1 else 1
        fit_x, held_x = x[perm[:n_fit]], x[perm[n_fit:]]

    if grouping == "contiguous":
        groups = torch.arange(n_neurons).reshape(num_experts, -1)
    elif grouping == "balanced_kmeans":
        groups = balanced_kmeans(torch.cat([F.normalize(w_gate, dim=1), F.normalize(w_up, dim=1)], 1).cpu(),
                                 num_experts, seed=seed)
    else:  # coactivation: correlate neurons' |activation| over tokens
        feats = (act(fit_x[:_MAX_FEATURE_TOKENS] @ w_gate.T) * (fit_x[:_MAX_FEATURE_TOKENS] @ w_up.T)).abs().T
        feats = feats - feats.mean(1, keepdim=True)
        groups = balanced_kmeans(feats.cpu(), num_experts, seed=seed)
    groups = groups.to(w_gate.device)

    # (E, 2*I_e, H) with gate first, as MixtralExperts chunks it; (E, H, I_e)
    gate_up = torch.cat([w_gate[groups], w_up[groups]], dim=1)
    down = w_down[:, groups].permute(1, 0, 2) * scale

    stats = _LayerStats()
    if router == "uniform":
        router_w = torch.zeros(num_experts, w_gate.shape[1], device=w_gate.device)
    elif router == "centroid":
        router_w = w_gate[groups].mean(1)  # mean gate pre-activation of the expert's neurons
    else:
        mass = _mass(fit_x, w_gate, w_up, groups, act)
        router_w = _fit_router(fit_x, mass)
    if fit_x is not None and router != "uniform":
        stats.temperature = _fit_temperature(fit_x, router_w, gate_up, down, w_gate, w_up, w_down, top_k, act)
        router_w = router_w * stats.temperature
    if held_x is not None and held_x.shape[0] > 0:
        mass = _mass(held_x, w_gate, w_up, groups, act)
        stats.routing_agreement = routing_agreement(router_w, held_x, mass, top_k)
        chosen = (held_x @ router_w.T).topk(top_k, -1).indices
        stats.captured_mass = float(mass.gather(1, chosen).sum() / mass.sum().clamp_min(1e-30))
        dense_out = (act(held_x @ w_gate.T) * (held_x @ w_up.T)) @ w_down.T
        moe_out = _moe_out(held_x, router_w, gate_up, down, top_k, act)
        stats.relative_error = float((moe_out - dense_out).norm() / dense_out.norm().clamp_min(1e-30))
    return gate_up, down, router_w, stats


def _mass(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, groups: torch.Tensor, act) -> torch.Tensor:
    """[tokens, E]: each expert's summed |act(gate) * up| (how strongly its neurons fire)."""
    a = (act(x @ w_gate.T) * (x @ w_up.T)).abs()  # (T, I)
    return a[:, groups].sum(-1)  # (T, E)


def _fit_router(x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Ridge regression of per-token-centred log mass on x: ``W (E, H)`` with ``x @ W.T ~ log mass``."""
    target = mass.clamp_min(1e-12).log()
    target = target - target.mean(1, keepdim=True)  # softmax is shift-invariant per token; no bias to absorb it
    xtx = x.T @ x
    ridge = _RIDGE * xtx.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
    return torch.linalg.solve(xtx.double() + (ridge * eye).double(), (x.T @ target).double()).T.float()


def _moe_out(x: torch.Tensor, router_w: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int, act,
             per_expert: torch.Tensor | None = None) -> torch.Tensor:
    """The Mixtral MLP on ``x`` (softmax, top-k, renormalise, weighted sum of experts)."""
    if per_expert is None:
        per_expert = _per_expert_out(x, gate_up, down, act)
    probs = torch.softmax(x @ router_w.T, dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    chosen = per_expert.gather(1, idx.unsqueeze(-1).expand(-1, -1, per_expert.shape[-1]))  # (T, k, H)
    return (weights.unsqueeze(-1) * chosen).sum(1)


def _per_expert_out(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    gate, up = torch.einsum("th,eih->tei", x, gate_up).chunk(2, dim=-1)
    return torch.einsum("tei,ehi->teh", act(gate) * up, down)  # (T, E, H)


def _fit_temperature(x, router_w, gate_up, down, w_gate, w_up, w_down, top_k, act) -> float:
    """The router-weight multiplier (from :data:`_TEMPERATURES`) with the least MLP output error on x."""
    x = x[:_MAX_FEATURE_TOKENS]
    dense_out = (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    per_expert = _per_expert_out(x, gate_up, down, act)
    errors = {t: float((_moe_out(x, router_w * t, gate_up, down, top_k, act, per_expert) - dense_out).pow(2).sum())
              for t in _TEMPERATURES}
    return min(errors, key=errors.get)


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to one column, each column taking exactly ``capacity`` rows (greedy auction)."""
    n, k = sim.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), capacity, dtype=torch.long)
    sim = sim.cpu()
    while (labels < 0).any():
        free = (labels < 0).nonzero().squeeze(1)
        s = sim[free].clone()
        s[:, room == 0] = -math.inf
        best_val, best = s.max(1)
        for col in best.unique().tolist():
            cand = free[best == col]
            if len(cand) > room[col]:
                # keep the most similar proposers; stable sort keeps ties in index order (determinism)
                order = torch.sort(best_val[best == col], descending=True, stable=True).indices
                cand = cand[order[: room[col]]]
            labels[cand] = col
            room[col] -= len(cand)
    return labels


def _groups_from_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    groups = [torch.sort((labels == c).nonzero().squeeze(1)).values for c in range(k)]
    groups.sort(key=lambda g: int(g[0]))
    return torch.stack(groups)


# ---------------------------------------------------------------------------------------------------
# CLI: `unite-hf moefy`
# ---------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``unite-hf moefy``, defined with the torch-free CLI parser."""
    from unite_hf_cli import _moefy_arguments

    _moefy_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load, convert, save; print one JSON line with the per-layer mean routing statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    load_kw = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, **load_kw)
    tok_kw = load_kw if args.tokenizer is None else {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, **tok_kw)
    top_k = args.num_experts if args.exact else args.top_k
    router = "uniform" if args.exact else args.router
    # calibrate only when the conversion uses data (a uniform router with weight-space groups does not)
    uses_data = router != "uniform" or args.grouping == "coactivation"
    calibration = args.calibration if uses_data else None
    moe = moefy(model, args.num_experts, top_k, calibration, tokenizer, grouping=args.grouping, router=router,
                down_scale=args.down_scale, seed=args.seed, num_sequences=args.num_sequences, seq_len=args.seq_len)
    from unite_hf.io import save_model_folder

    save_model_folder(args.out, moe, tokenizer)  # all or nothing: an interrupted save keeps the old folder
    layers = moe.config.moefy["layers"]

    def mean(key: str) -> float | None:
        values = [s[key] for s in layers if s[key] is not None]
        return round(sum(values) / len(values), 4) if values else None

    print(json.dumps({"out": str(args.out), "num_experts": args.num_experts, "top_k": top_k,
                      "grouping": moe.config.moefy["grouping"],
                      "router": router, "routing_agreement": mean("routing_agreement"),
                      "captured_mass": mean("captured_mass"), "relative_error": mean("relative_error")}))
    return 0
