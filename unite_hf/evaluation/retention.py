"""How much of the source's function a gene keeps, measured on held-out text.

For a UNITE-shaped gene (UNITE or XPERT) and the MoE it came from, on fixed held-out windows that
calibration never saw (by default the last 20% of SimpleBooks-92's valid file; calibration uses
WikiText-2):

- **Swap gap** of MoE layer ``l``: the source with only that layer's routed experts replaced by
  the gene's rebuilt FFN, against the source with them replaced by nothing. With ``KL(m)`` the mean
  per-token ``KL(source || m)`` over the held-out tokens,

      gap_l = 1 - KL(swap_l) / KL(zero_l)

  1 means the layer is intact, 0 no better than deleting its experts, below 0 worse than deleting
  them. Shared experts (Qwen2-MoE, DeepSeek) stay in both, so the gap judges the routed part only.
  The standard error treats each window as one sample: the KLs of one window are paired, and the
  ratio's error is propagated with the delta method from their covariance.
- **Relative output error** of each MoE layer's rebuilt routed FFN against the routed experts' real
  output, ``||y_hat - y||_F / ||y||_F``, on that layer's own held-out input hidden states.
- **Perplexity** of the source, of the source with every MoE block's routed experts replaced by the
  gene's fused FFN *before* decomposition (re-fused from the source with the gene's statistics: what
  fusion alone loses), and of the full-depth ``core_init="tucker"`` target at the requested ranks
  (what fusion and compression lose together).
- **FFN parameter fraction**: the target's factorized FFN parameters (bases, cores, biases; untied
  bases, as targets are grown by default) over the source's routed expert parameters.

The rebuilt FFN is the real target's :class:`~unite_hf.modeling_unite.UniteFFN`, so what is scored is
what ``from_gene`` grows.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import find_local_data_dir
from ..gene import UniteGene
from ..sources import MoESource, UnsupportedSourceError, get_source

#: held-out text: a file under the data dir and the fraction at its end that is used
DEFAULT_HELD_OUT = ("simplebooks/simplebooks92_valid.txt", 0.2)


@dataclass
class LayerRetention:
    """Swap gap and its parts for one MoE layer (KLs are mean nats per token)."""

    layer: int
    swap_gap: float
    swap_gap_se: float
    kl_swap: float
    kl_swap_se: float
    kl_zero: float
    kl_zero_se: float
    kl_difference_se: float  # paired: standard error of mean(KL_zero - KL_swap) over windows


@dataclass
class RetentionReport:
    """What :func:`measure_retention` measured; ``to_json()`` gives the CLI's one line."""

    gene: str | None
    source: str | None
    fusion: str
    decomposition: str
    ranks: dict[str, list[int]]
    num_windows: int
    seq_len: int
    held_out: str
    layers: list[LayerRetention]
    mean_swap_gap: float
    relative_error: dict[int, float]
    perplexity: dict[str, float | None]
    ffn_parameter_fraction: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["relative_error"] = {str(k): v for k, v in self.relative_error.items()}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def held_out_windows(tokenizer, text: str | os.PathLike | torch.Tensor | None = None, *, num_windows: int = 8,
                     seq_len: int = 256, tail_fraction: float | None = None,
                     data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, str]:
    """``num_windows`` consecutive, non-overlapping windows of ``seq_len`` tokens from held-out text.

    ``text``: a text file, an input_ids tensor ``[N, T]``, or ``None`` for the default (the last 20% of
    SimpleBooks-92 valid in ``data_dir`` / ``$UNITE_HF_DATA_DIR``). Only the windows' share of the text
    is tokenized. Raises ``ValueError`` when the text is shorter than the windows asked for.
    """
    if num_windows < 2 or seq_len < 2:
        raise ValueError(f"need at least 2 windows of at least 2 tokens (standard errors), got {num_windows} x {seq_len}")
    if isinstance(text, torch.Tensor):
        if text.ndim != 2 or text.shape[0] < num_windows or text.shape[1] < seq_len:
            raise ValueError(f"input_ids of shape {tuple(text.shape)} hold fewer than {num_windows} x {seq_len} tokens")
        return text[:num_windows, :seq_len].long(), "input_ids"
    if text is None:
        root = Path(data_dir) if data_dir is not None else find_local_data_dir()
        if root is None:
            raise FileNotFoundError("no local data dir for the default held-out text; pass text=PATH or set "
                                    "UNITE_HF_DATA_DIR")
        path = root / DEFAULT_HELD_OUT[0]
        tail_fraction = DEFAULT_HELD_OUT[1] if tail_fraction is None else tail_fraction
    else:
        path = Path(text)
        tail_fraction = 1.0 if tail_fraction is None else tail_fraction
    if not path.is_file():
        raise FileNotFoundError(f"held-out text {path} does not exist")
    if not 0 < tail_fraction <= 1:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to read held-out text (the gene carries none)")
    content = path.read_text(encoding="utf-8")
    content = content[int(len(content) * (1 - tail_fraction)):]
    needed = num_windows * seq_len
    ids: list[int] = []
    chunk = max(needed * 8, 4096)  # characters; tokens are rarely shorter than 1 character on average
    start = 0
    while len(ids) < needed and start < len(content):  # tokenize only what the windows need
        ids.extend(tokenizer(content[start:start + chunk], add_special_tokens=False)["input_ids"])
        start += chunk
    if len(ids) < needed:
        raise ValueError(f"{path} (last {tail_fraction:.0%}) holds {len(ids)} tokens, fewer than the "
                         f"{num_windows} x {seq_len} = {needed} asked for")
    label = f"{path.name} (last {tail_fraction:.0%})" if tail_fraction < 1 else path.name
    return torch.tensor(ids[:needed]).view(num_windows, seq_len), label


class _DenseRoutedFFN(nn.Module):
    """``down(act(gate x) * up x)`` with plain matrices: the fused FFN before decomposition."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]], activation) -> None:
        super().__init__()
        self.weights = weights
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..fusion import fused_intermediate, fused_projection

        return fused_projection(self.weights, "down", fused_intermediate(self.weights, self.activation, x))


@contextmanager
def _replaced(model: nn.Module, replacements: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Replace the output of the named modules by ``fn(input)`` (forward hooks, removed on exit)."""
    handles = []
    for name, fn in replacements.items():
        def hook(module, args, output, fn=fn):
            new = fn(args[0] if args else None)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        yield torch.log_softmax(model(input_ids=batch).logits.float(), -1)


def _kl_per_window(model: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Mean per-token KL(reference || model) of each window, float64 ``[N]``."""
    out = []
    for ref, logp in zip(reference, _log_probs(model, windows, batch_size)):
        out.append((ref.exp() * (ref - logp)).sum(-1).mean(-1).double().cpu())
    return torch.cat(out)


def _perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int,
                log_probs: Iterator[torch.Tensor] | None = None) -> float:
    """Perplexity of ``model`` on ``windows`` (from already computed per-batch ``log_probs`` if given)."""
    nll, count = 0.0, 0
    batches = _log_probs(model, windows, batch_size) if log_probs is None else log_probs
    for start, logp in zip(range(0, len(windows), batch_size), batches):
        targets = windows[start:start + batch_size, 1:].to(logp.device)
        nll -= float(logp[:, :-1].gather(-1, targets.unsqueeze(-1)).double().sum())
        count += targets.numel()
    return math.exp(nll / count)


def _ratio_with_se(swap: torch.Tensor, zero: torch.Tensor) -> tuple[float, float]:
    """``1 - mean(swap) / mean(zero)`` and its delta-method standard error from paired windows."""
    n = len(swap)
    a, b = float(swap.mean()), float(zero.mean())
    cov = torch.cov(torch.stack([swap, zero])) / n  # covariance of the two means
    var = cov[0, 0] / b ** 2 + a ** 2 * cov[1, 1] / b ** 4 - 2 * a * cov[0, 1] / b ** 3
    return 1 - a / b, float(var.clamp_min(0).sqrt())


def _se(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values)))


def _check_match(gene: UniteGene, source: MoESource, model: nn.Module) -> None:
    """A gene and a source that do not belong together fail here, before any forward pass."""
    gc = gene.config
    problems = []
    if source.moe_layers != gc.moe_layers:
        problems.append(f"MoE layers {source.moe_layers} vs the gene's {gc.moe_layers}")
    if source.num_layers != gc.num_layers:
        problems.append(f"{source.num_layers} layers vs the gene's {gc.num_layers}")
    hidden = source.blocks[0].expert(0).down.shape[0]
    if hidden != gc.hidden_size:
        problems.append(f"hidden size {hidden} vs the gene's {gc.hidden_size}")
    vocab = model.get_input_embeddings().num_embeddings
    gene_vocab = gc.source_config.get("vocab_size")
    if gene_vocab is not None and vocab != gene_vocab:
        problems.append(f"vocabulary {vocab} vs the gene's {gene_vocab}")
    if source.num_experts != gc.num_experts:
        problems.append(f"{source.num_experts} experts per layer vs the gene's {gc.num_experts}")
    if problems:
        raise ValueError("the gene was not extracted from this source: " + "; ".join(problems))


def _default_layers(moe_layers: list[int], count: int = 3) -> list[int]:
    if len(moe_layers) <= count:
        return list(moe_layers)
    return sorted({moe_layers[round(i * (len(moe_layers) - 1) / (count - 1))] for i in range(count)})


def _check_growable(gene: UniteGene) -> None:
    """Retention scores the target that from_gene grows, which is the source family's own stack built from
    the gene's config: a family whose config builds no MoE blocks (per-expert ModuleList experts patched into
    a dense family's layers, for instance) has no slot for the UNITE FFN, whatever its expert layout."""
    from ..targets import _meta_source

    try:
        _meta_source(gene)
    except UnsupportedSourceError as err:
        raise ValueError("retention scores the target that from_gene grows, and no target can be grown from this "
                         f"source: its family's config builds no MoE blocks (e.g. ModuleList experts patched into a "
                         f"dense family): {err}") from err


def measure_retention(
    gene: UniteGene | str | os.PathLike,
    source: nn.Module | str | os.PathLike,
    *,
    tokenizer=None,
    text: str | os.PathLike | torch.Tensor | None = None,
    num_windows: int = 8,
    seq_len: int = 256,
    rank: int | tuple[int, int] | None = None,
    layers: list[int] | None = None,
    batch_size: int = 4,
    data_dir: str | os.PathLike | None = None,
    measure_fused: bool = True,
    baseline: dict | None = None,
    show_progress: bool = True,
) -> RetentionReport:
    """Measure how much of ``source``'s function ``gene`` keeps (see the module docstring).

    Args:
        gene: a UNITE-shaped gene (UNITE or XPERT), or its folder / Hub id.
        source: the MoE it was extracted from (a loaded causal LM, or a folder / Hub id to load).
        tokenizer: reads ``text``; defaults to the gene's tokenizer.
        text, num_windows, seq_len, data_dir: the held-out windows (:func:`held_out_windows`).
        rank: target ranks (an int or ``(r_out, r_in)``, at most the gene's); default the gene's.
        layers: MoE layers whose swap gap is measured (default: 3 spread over depth). The relative
            error is measured for every MoE layer.
        batch_size: windows per forward pass.
        measure_fused: re-fuse the source to measure the uncompressed row (it does not depend on the
            rank: a caller sweeping ranks measures it once).
        baseline: a dict shared by calls on one loaded source (a sweep over genes and ranks): what
            depends only on the source, the windows and the layers (its log-probs and perplexity, and
            the no-experts KLs when the target has no shared experts) is computed on the first call,
            kept in it and reused, so that the numbers are those of separate calls. Start one dict
            per source.
    """
    from ..progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    from ..modeling_unite import UniteForCausalLM
    from ..targets import _resolve_target_ranks

    name = None if isinstance(gene, UniteGene) else str(gene)
    if not isinstance(gene, UniteGene):
        gene = UniteGene.from_pretrained(gene)
    source_name = None
    if not isinstance(source, nn.Module):
        from transformers import AutoModelForCausalLM

        source_name = str(source)
        source = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    source_name = source_name or gene.config.source_id
    model = source.eval()
    moe = get_source(model)
    # cheap checks first: the pair, the ranks, the layers, the text
    _check_match(gene, moe, model)
    _check_growable(gene)
    ranks = _resolve_target_ranks(gene, rank)
    layers = _default_layers(gene.moe_layers) if layers is None else list(layers)
    bad = [layer for layer in layers if layer not in gene.moe_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} hold no experts; choose from the MoE layers {gene.moe_layers}")
    windows, held_out = held_out_windows(tokenizer if tokenizer is not None else gene.tokenizer, text,
                                         num_windows=num_windows, seq_len=seq_len, data_dir=data_dir)
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.max()) >= vocab:
        raise ValueError(f"held-out token id {int(windows.max())} is outside the source's vocabulary ({vocab}); wrong tokenizer?")

    notes: list[str] = []
    steps = 4 + 2 * len(layers) + int(measure_fused)
    bar = tqdm(total=steps, desc="Retention", unit="pass", disable=not show_progress)
    target = UniteForCausalLM.from_gene(gene, rank=rank, core_init="tucker").eval()
    device = next(model.parameters()).device
    target.to(device)
    ffns = {s: target.model.ffn(i) for i, s in enumerate(target.config.source_layers) if s in gene.moe_layers}
    blocks = {block.layer_idx: block for block in moe.blocks}

    def shared_only(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: ffns[layer].combine(torch.zeros_like(x), x)

    def rebuilt(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: ffns[layer](x)

    # what depends only on the source, the windows and the layers: computed once per baseline dict
    cached = baseline if baseline is not None else {}
    key = (id(model), tuple(windows.shape), hash(windows.cpu().numpy().tobytes()), batch_size)
    if cached.get("key") not in (None, key):
        raise ValueError("baseline= holds another source's or other windows' reference; start one dict per source")
    cached["key"] = key
    no_shared = {layer: ffns[layer].shared_cores is None and not ffns[layer].shared_mlps for layer in layers}
    with torch.no_grad():
        if "reference" not in cached:
            cached["reference"] = list(_log_probs(model, windows, batch_size))
            cached["source_ppl"] = _perplexity(model, windows, batch_size, log_probs=iter(cached["reference"]))
        reference, source_ppl = cached["reference"], cached["source_ppl"]
        bar.update()
        results = _layer_gaps(model, blocks, windows, reference, layers, rebuilt, shared_only, no_shared,
                              cached.setdefault("kl_zero", {}), batch_size, bar)
        relative_error = {}
        captured: dict[int, torch.Tensor] = {}
        handles = [model.get_submodule(blocks[layer].name).register_forward_pre_hook(
            lambda module, args, layer=layer: captured.setdefault(layer, args[0].detach())) for layer in gene.moe_layers]
        try:
            model(input_ids=windows[:1].to(device))  # every layer's inputs from one window, in one pass
        finally:
            for handle in handles:
                handle.remove()
        for layer in gene.moe_layers:
            x = captured[layer]
            true_routed = _block_output(model.get_submodule(blocks[layer].name), x) - ffns[layer].combine(torch.zeros_like(x), x)
            error = torch.linalg.vector_norm((ffns[layer].routed(x) - true_routed).double()) \
                / torch.linalg.vector_norm(true_routed.double()).clamp_min(1e-30)
            relative_error[layer] = float(error)
        bar.update()
        fused_ppl = None
        try:
            fused = _fused_routed(gene, moe) if measure_fused else None
        except ValueError as err:  # e.g. a fusion that needs statistics the gene does not store
            notes.append(f"fused perplexity not measured: {err}")
        else:
            if fused is not None:
                with _replaced(model, {blocks[s].name: (lambda x, s=s: ffns[s].combine(fused[s](x), x)) for s in fused}):
                    fused_ppl = _perplexity(model, windows, batch_size)
                bar.update()
        target_ppl = _perplexity(target, windows, batch_size)
        bar.update()
    bar.close()
    if gene.config.num_layers > len(ffns):
        notes.append("dense layers of the source are copied unchanged")
    return RetentionReport(
        gene=name or gene.config.source_id, source=source_name, fusion=gene.config.fusion,
        decomposition=gene.config.decomposition, ranks=ranks, num_windows=num_windows, seq_len=seq_len,
        held_out=held_out, layers=results, mean_swap_gap=sum(r.swap_gap for r in results) / len(results),
        relative_error=relative_error,
        perplexity={"source": source_ppl, "fused": fused_ppl, "target": target_ppl},
        ffn_parameter_fraction=_ffn_parameter_fraction(target, moe), notes=notes,
    )


def _layer_gaps(model: nn.Module, blocks: dict, windows: torch.Tensor, reference: list[torch.Tensor], layers: list[int],
                swap: Callable[[int], Callable], zero: Callable[[int], Callable], no_shared: dict[int, bool],
                zero_kls: dict[int, torch.Tensor], batch_size: int, bar) -> list[LayerRetention]:
    """Each layer's swap gap: its block replaced by ``swap(layer)`` against ``zero(layer)`` (shared experts
    only); the no-experts KLs of layers without shared experts are kept in ``zero_kls`` and reused."""
    results = []
    for layer in layers:
        with _replaced(model, {blocks[layer].name: swap(layer)}):
            kl_swap = _kl_per_window(model, windows, reference, batch_size)
        bar.update()
        if no_shared[layer] and layer in zero_kls:  # nothing of the replacement in the zeroed layer
            kl_zero = zero_kls[layer]
        else:
            with _replaced(model, {blocks[layer].name: zero(layer)}):
                kl_zero = _kl_per_window(model, windows, reference, batch_size)
            if no_shared[layer]:
                zero_kls[layer] = kl_zero
        bar.update()
        gap, gap_se = _ratio_with_se(kl_swap, kl_zero)
        results.append(LayerRetention(layer, gap, gap_se, float(kl_swap.mean()), _se(kl_swap), float(kl_zero.mean()),
                                      _se(kl_zero), _se(kl_zero - kl_swap)))
    return results


def measure_routed_replacement(
    source: nn.Module,
    routed: dict[int, Callable[[torch.Tensor], torch.Tensor]],
    *,
    tokenizer,
    text: str | os.PathLike | torch.Tensor | None = None,
    num_windows: int = 8,
    seq_len: int = 256,
    layers: list[int] | None = None,
    batch_size: int = 4,
    data_dir: str | os.PathLike | None = None,
    baseline: dict | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Swap gaps and full-depth perplexity of any replacement of the routed experts, for controls that are
    not genes (a linear map ``y = A x``, say): ``routed[layer](x)`` gives the routed output of every MoE
    layer from its input ``x`` (tokens, hidden); the source's shared experts stay. The same windows,
    definitions and ``baseline`` sharing as :func:`measure_retention`.

    Returns ``{"layers": [LayerRetention], "mean_swap_gap", "perplexity": {"source", "replaced"}}``.
    """
    from ..refit.base import shared_output

    model = source.eval()
    moe = get_source(model)
    blocks = {block.layer_idx: block for block in moe.blocks}
    missing = sorted(set(blocks) - set(routed))
    if missing:
        raise ValueError(f"no replacement given for the MoE layers {missing}")
    layers = _default_layers(moe.moe_layers) if layers is None else list(layers)
    windows, _ = held_out_windows(tokenizer, text, num_windows=num_windows, seq_len=seq_len, data_dir=data_dir)

    def replaced(layer: int, with_routed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            out = routed[layer](flat).reshape(x.shape).to(x.dtype) if with_routed else torch.zeros_like(x)
            shared = shared_output(blocks[layer], x)
            return out if shared is None else out + shared
        return fn

    cached = baseline if baseline is not None else {}
    key = (id(model), tuple(windows.shape), hash(windows.cpu().numpy().tobytes()), batch_size)
    if cached.get("key") not in (None, key):
        raise ValueError("baseline= holds another source's or other windows' reference; start one dict per source")
    cached["key"] = key
    no_shared = {layer: not blocks[layer].shared_experts for layer in layers}
    bar = tqdm(total=2 * len(layers) + 1, desc="Replacement", unit="pass", disable=not show_progress)
    with torch.no_grad():
        if "reference" not in cached:
            cached["reference"] = list(_log_probs(model, windows, batch_size))
            cached["source_ppl"] = _perplexity(model, windows, batch_size, log_probs=iter(cached["reference"]))
        results = _layer_gaps(model, blocks, windows, cached["reference"], layers,
                              lambda layer: replaced(layer, True), lambda layer: replaced(layer, False), no_shared,
                              cached.setdefault("kl_zero", {}), batch_size, bar)
        with _replaced(model, {block.name: replaced(layer, True) for layer, block in blocks.items()}):
            replaced_ppl = _perplexity(model, windows, batch_size)
        bar.update()
    bar.close()
    return {"layers": results, "mean_swap_gap": sum(r.swap_gap for r in results) / len(results),
            "perplexity": {"source": cached["source_ppl"], "replaced": replaced_ppl}}


def _block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _fused_routed(gene: UniteGene, moe: MoESource) -> dict[int, _DenseRoutedFFN]:
    """Each MoE layer's fused FFN before decomposition, re-fused from the source with the gene's statistics."""
    from ..fusion import fuse_block, get_fusion

    if not gene.config.fusion:
        raise ValueError(f"a {gene.method} gene's fused FFNs come from no fusion of every expert (see its method_config)")
    strategy = get_fusion(gene.config.fusion)
    if strategy.requires == "fisher_diag":
        raise ValueError(f"fusion {gene.config.fusion!r} needs the diagonal Fisher, which genes do not store")
    importance = gene.expert_importance()
    width = gene.config.expert_intermediate_size if strategy.variable_width else None
    return {block.layer_idx: _DenseRoutedFFN(fuse_block(block, importance, gene.config.fusion, width=width),
                                             block.activation) for block in moe.blocks}


def _ffn_parameter_fraction(target: nn.Module, moe: MoESource) -> float:
    breakdown = target.unite_parameter_breakdown()
    target_ffn = breakdown.get("bases", 0) + breakdown.get("cores", 0) + breakdown.get("ffn_bias", 0)
    source_ffn = sum(p.numel() for block in moe.blocks for p in block.expert_parameters())
    return target_ffn / source_ffn
