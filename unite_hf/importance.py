"""Expert importance: the exact per-sequence Fisher of UNITE (paper Eq. 2) and routing frequency.

For expert i of MoE layer l the Fisher is

    F[l, i] = 1/N * sum_n || d/d theta_{l,i}  log p(y_n | x_n) ||^2

where the sample unit is one calibration sequence: ``log p(y_n|x_n)`` is the sum of its next-token
log-likelihoods, and ``theta_{l,i}`` are all of the expert's parameters (gate, up, down and biases).
``y_n`` is the observed next tokens ("empirical" labels) or tokens sampled from the model's own
predictive distribution ("sampled" labels, the true Fisher).

How it is computed without a backward pass per sequence: every expert projection is a linear map,
``out = x @ W.T``, so sequence n's weight gradient is ``G_n.T @ X_n`` (output gradients times
inputs, over the tokens of n routed to the expert). A custom autograd function sees ``X`` in the
forward and ``G`` in the backward of one ordinary batched pass, and reduces them to per-sequence
squared norms on the spot; the expert weights never receive a ``.grad``. Sequences in a batch do not
interact (attention is causal within a sequence, routing is per token), so summing the per-sequence
losses and back-propagating once gives every sequence's gradient separately.

Hook points: each expert layout owns its probe (:meth:`unite_hf.sources.MoEBlock.probe`), which sends
every expert linear map through :meth:`_BlockProbe.linear`:

- fused 3D experts: a registered ``ExpertsInterface`` implementation (``"unite_probe"``) runs the
  experts as transformers' ``grouped_mm`` forward does, each projection of all experts one probed
  grouped map (:meth:`_BlockProbe.grouped_linear`, :mod:`unite_hf.sources.fused`), so the sink sees
  one call per (layer, projection) and batch. On a GPU, bf16/fp16 models then reduce every
  (expert, sequence) gradient of the call at once, without a host sync (:data:`GROUPED_KERNEL`: a fused
  Triton kernel, :mod:`unite_hf.triton_sq_norms`, by default): 1.26x a plain forward and backward on
  an H200 (PERF.md section 5). CPUs and float32 models take the per-expert kernels below;
- ``nn.ModuleList`` experts: each expert's ``nn.Linear`` forward is routed through the probe. These
  experts only see gathered token rows, which cannot be traced back to their sequence, so this
  layout runs one sequence per pass (``multi_sequence = False``; exact, slower).

The per-sequence squared norms (issue 15; measurements in benchmarks/PERF.md, "GPU"). Per token group
(the tokens of one sequence routed to one expert) the cheaper of two exact forms, by flop count:

- the token Grams, ``sum_{s,t} (x_s.x_t)(g_s.g_t)``, ``2 T^2 (in + out)`` flops, while
  ``T (in + out) < in * out``. At Mixtral widths (2048 and 5632 or 11264) that is T < ~1500, so the
  routed groups (~256 tokens of a 1024-token sequence at top-2 of 8) take it with 6x to 7x fewer flops;
- otherwise the gradient ``G.T X`` itself, ``2 T in out`` flops, in float32 as autograd computes it.

The Grams used to be float64: on tokens with a shared component the terms of the float32 sum cancel
(measured relative errors of 1e-4 at a 100x common offset, 0.01 at 1000x, 0.6 at 10000x). They are
float32 now, made safe in three steps. (1) Each group is centred first, its mean and sums moved into
two extra rows so that the identity stays exact (:func:`_augmented_rows`): the Grams of centred tokens
hardly cancel (errors at most 2e-6 on offsets, outlier channels, heavy tails; float32 autograd errs by
up to 1e-5 on the same data). (2) What cancellation is left is estimated from the float32 Grams
themselves and those groups are recomputed in float64 from the raw rows (tokens and gradients along
orthogonal directions, gradients summing to zero under a large offset, heavy-tailed tokens at
T = 1024). (3) The products run in full float32 even under
``torch.set_float32_matmul_precision("high" / "medium")``, which would otherwise use TF32 or bf16. Why float32: a CPU multiplies float32 twice as fast (~300 against ~150 GFLOP/s
here), most GPUs 32x to 64x; the A100/H100 class has full-rate float64, where the gain is the halved
bytes of the padded copies. All groups of a call go through one zero-padded batch: few, large kernels
(an accelerator launches little; a busy CPU pays little per parallel region).
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSet
from .sources import LAYOUTS, MoEBlock, MoESource, get_source
from .sources.base import RoutedRows, blocks_by_layout
from .sources.fused import PROBE_IMPLEMENTATION  # noqa: F401 (public here since the probe was written)

LABEL_MODES: tuple[str, ...] = ("empirical", "sampled")


@dataclass
class ExpertImportance:
    """Per-expert statistics of one calibration pass; rows follow ``moe_layers``."""

    moe_layers: list[int]
    fisher: torch.Tensor  # (len(moe_layers), E) float64, mean over sequences of squared grad norms
    frequency: torch.Tensor  # (len(moe_layers), E) float64, share of routed (token, slot) pairs
    num_sequences: int
    labels: str = "empirical"
    # (layer, proj) -> (E, out, in) elementwise mean squared gradient; only when asked for
    fisher_diag: dict[tuple[int, str], torch.Tensor] | None = None
    fisher_diag_bias: dict[tuple[int, str], torch.Tensor] | None = None
    # (len(moe_layers), E) float64 raw routed (token, slot) counts: what several processes add up
    routed: torch.Tensor | None = None
    # (len(moe_layers), E) float64 sum of the routing weights each expert's output was scaled by, over
    # its routed (token, slot) pairs; divide by the token count for the mean router weight per token.
    # None when a block's router output could not be read (ModuleList: see module_list.ROUTER_OUTPUT_READERS).
    routing_mass: torch.Tensor | None = None

    def row(self, layer: int) -> int:
        return self.moe_layers.index(layer)


# -- per-sequence gradient statistics of one linear map -------------------------------------------------

class _GradientSink:
    """Accumulates what one expert's linear maps contribute to the Fisher statistics."""

    def __init__(self, fisher: torch.Tensor, diag: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]] | None):
        self.fisher = fisher  # (E,) float64 running sum over sequences
        self.diag = diag
        self.calls = 0  # backward calls seen: zero after a Fisher pass means autograd never reached the experts

    def __call__(self, expert: int, x: torch.Tensor, grad: torch.Tensor, seq_ids: torch.Tensor, has_bias: bool) -> None:
        """One expert's rows ``x`` and output gradients ``grad``, ``seq_ids`` the sequence of each row."""
        self.calls += 1
        if self.diag is None and _tensor_core_direct(x, grad):
            self.fisher[expert] += _direct_sq_norms_low_precision(x, grad, seq_ids, bias=has_bias)
            return
        x, grad = x.float(), grad.float()
        with _ieee_float32_matmul():
            if self.diag is None:
                self.fisher[expert] += _sum_per_sequence_sq_norms(x, grad, seq_ids, bias=has_bias)
            else:
                self._diagonal(expert, x, grad, seq_ids, has_bias)

    def grouped(self, x: torch.Tensor, grad: torch.Tensor, rows: RoutedRows, has_bias: bool) -> None:
        """All experts' rows at once, sorted by expert (:class:`~unite_hf.sources.base.RoutedRows`).

        bf16/fp16 on a GPU: every (expert, sequence) gradient of the call at once, by the kernel
        :func:`_grouped_kernel` picks, with no host sync but for ``"padded_bmm"``. Otherwise (CPUs,
        float32 models, the diagonal Fisher) each expert's rows go through :meth:`__call__`, the kernels
        of a per-expert probe.
        """
        num_experts, per_expert = rows.expert_counts.numel(), rows.num_sequences
        # group (expert, sequence); sentinel rows (sorted last) form one extra group, dropped at the end
        group = torch.where(rows.valid, rows.expert * per_expert + rows.seq, num_experts * per_expert)
        kernel = _grouped_kernel(x, grad) if self.diag is None else None
        if kernel in ("triton", "grouped_mm"):
            self.calls += 1
            norms = _grouped_direct_sq_norms(x, grad, group, num_experts * per_expert + 1, bias=has_bias, kernel=kernel)
            self.fisher += norms[:-1].view(num_experts, per_expert).sum(1)
        elif kernel == "padded_bmm":
            self.calls += 1
            ids, counts = torch.unique_consecutive(group, return_counts=True)
            norms = _padded_direct_group_sq_norms(x, grad, counts.tolist(), bias=has_bias)
            self.fisher += torch.zeros(num_experts + 1, dtype=norms.dtype, device=norms.device
                                       ).index_add_(0, ids // per_expert, norms)[:num_experts]
        else:
            start = 0
            for expert, count in enumerate(rows.expert_counts.tolist()):
                if count:
                    self(expert, x[start:start + count], grad[start:start + count], rows.seq[start:start + count],
                         has_bias)
                    start += count

    def _diagonal(self, expert: int, x: torch.Tensor, grad: torch.Tensor, seq_ids: torch.Tensor, has_bias: bool) -> None:
        weight_acc, bias_acc = self.diag(expert)
        for seq in torch.unique(seq_ids):
            rows = seq_ids == seq
            weight_grad = grad[rows].T @ x[rows]  # (out, in): this sequence's weight gradient
            weight_acc += weight_grad.square()
            total = weight_grad.square().sum()
            if has_bias:
                bias_grad = grad[rows].sum(0)
                if bias_acc is not None:
                    bias_acc += bias_grad.square()
                total = total + bias_grad.square().sum()
            self.fisher[expert] += total.double()


_GRAM_LIMIT = 4096  # longest token group that may take the Gram form (its Grams hold tokens^2 entries)
_F32_UNIT_ROUNDOFF = 2.0 ** -24
# A Gram-form group whose estimated float32 rounding error, relative to its result, exceeds this is
# recomputed in float64 (see _gram_sq_norms: the groups kept erred by at most 2e-6 in the measurements).
_F32_GRAM_RTOL = 5e-6


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Full-precision float32 products whatever ``torch.set_float32_matmul_precision`` says: with
    "high" or "medium", CUDA (TF32) and oneDNN CPUs (bf16) round the inputs to 10 or 8 mantissa bits,
    which the error estimate of the float32 Gram form does not allow for."""
    backends = [b for b in (torch.backends.cuda.matmul, getattr(torch.backends.mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    previous: list[str] | str
    if backends:
        previous = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
    else:  # torch < 2.9: the legacy switch
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if backends:
            for b, value in zip(backends, previous):
                b.fp32_precision = value
        else:
            torch.set_float32_matmul_precision(previous)


def _sum_per_sequence_sq_norms(x: torch.Tensor, grad: torch.Tensor, seq_ids: torch.Tensor,
                               bias: bool = False) -> torch.Tensor:
    """``sum_n ||G_n.T @ X_n||_F^2`` over the token groups n of ``seq_ids`` as a float64 scalar, plus
    ``sum_n ||sum_{t in n} g_t||^2`` (the bias gradients) with ``bias``. ``x``, ``grad``: float32 or
    float64 rows.

    Each group takes whichever costs fewer flops: the token-Gram form (:func:`_gram_sq_norms`,
    ``2 T_n^2 (in + out)``) or its gradient ``G_n.T X_n`` itself (``2 T_n in out``, in the inputs'
    dtype like autograd's weight gradient; squares summed per row, then over rows in float64).
    """
    x, grad, counts = _sequence_groups(x, grad, seq_ids)
    d_in, d_out = x.shape[1], grad.shape[1]
    gram = [c <= _GRAM_LIMIT and c * (d_in + d_out) < d_in * d_out for c in counts]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for xs, gs, use_gram in zip(x.split(counts), grad.split(counts), gram):
        if not use_gram:
            total += (gs.T @ xs).square().sum(1).double().sum()
            if bias:
                total += gs.sum(0).double().square().sum()
    if any(gram):
        # one zero-padded batch of all groups: few, large kernels (one group at a time was faster on an
        # idle CPU thread but several times slower on a busy one: many small parallel regions)
        x_rows, g_rows = (x, grad) if all(gram) else _rows_of_groups((x, grad), counts, gram)
        gram_counts = [c for c, use_gram in zip(counts, gram) if use_gram]
        x_aug, g_aug = _augmented_rows(x_rows, g_rows, gram_counts)
        sq_norms, error = _gram_sq_norms(x_aug, g_aug)
        redo = (error > _F32_GRAM_RTOL * sq_norms.abs()).nonzero().flatten()
        if redo.numel():  # a device sync per call: the price of float32 with the error bounded
            x_aug, g_aug = _augmented_rows(x_rows.double(), g_rows.double(), gram_counts)
            sq_norms[redo] = _gram_sq_norms(x_aug[redo], g_aug[redo])[0]
        total += sq_norms.sum()
        if bias:  # row -2 of g_aug holds each group's gradient sum
            total += g_aug[:, -2].double().square().sum()
    return total


_LOW_PRECISION = (torch.bfloat16, torch.float16)
_DIRECT_CHUNK_BYTES = 1 << 30  # float32 per-sequence gradients held at once by the tensor-core path


def _tensor_core_direct(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether a bf16/fp16 probe takes :func:`_direct_sq_norms_low_precision`: on CUDA, where the
    matrix units multiply such inputs exactly and accumulate in float32 (``out_dtype``, torch >= 2.8)."""
    return (x.device.type == "cuda" and x.dtype in _LOW_PRECISION and grad.dtype == x.dtype
            and hasattr(torch.ops.aten.bmm, "dtype"))


def _direct_sq_norms_low_precision(x: torch.Tensor, grad: torch.Tensor, seq_ids: torch.Tensor,
                                   bias: bool = False) -> torch.Tensor:
    """``sum_n ||G_n.T @ X_n||_F^2`` (plus the bias term) for bf16/fp16 rows, as a float64 scalar.

    Each sequence's gradient ``G_n.T X_n`` is formed whole, in one batched product of the zero-padded
    groups, from the bf16/fp16 inputs themselves with float32 accumulation: the products of two such
    numbers are exact in float32, so this is autograd's own weight gradient before its final rounding
    to the model dtype, and its squares are summed without cancellation (unlike the token-Gram form,
    whose float32 terms cancel and need centring, an error estimate and float64 re-dos: many small
    kernels and a device sync). On an H200 this took the Fisher of a bf16 Mixtral-like model from 4.5x
    to 2.4x a plain backward (PERF.md section 5; a fused Triton form that never writes the gradients
    out was no faster there, so it was not kept: per-call overheads, not bytes, dominate). On CPUs (no float32-output bf16 product) the inputs are upcast: this function is then only a
    reference, and the float32 kernels of :func:`_sum_per_sequence_sq_norms` are used instead.
    """
    x, grad, counts = _sequence_groups(x, grad, seq_ids)
    return _padded_direct_group_sq_norms(x, grad, counts, bias).sum()


def _padded_direct_group_sq_norms(x: torch.Tensor, grad: torch.Tensor, counts: list[int], bias: bool = False
                                  ) -> torch.Tensor:
    """Per group of consecutive rows (sizes ``counts``, all > 0): ``||G_n.T X_n||^2`` (plus the bias
    term) as ``(groups,)`` float64, through zero-padded batched products (:func:`_direct_sq_norms_low_precision`)."""
    longest, d_in, d_out = max(counts), x.shape[1], grad.shape[1]
    device = x.device
    group, pos, _ = _group_positions(counts, device)
    x_pad, g_pad = x.new_zeros(len(counts), longest, d_in), grad.new_zeros(len(counts), longest, d_out)
    x_pad[group, pos], g_pad[group, pos] = x, grad
    sq_norms = torch.zeros(len(counts), dtype=torch.float64, device=device)
    if bias:
        sq_norms += g_pad.float().sum(1).double().square().sum(1)
    per_chunk = max(1, _DIRECT_CHUNK_BYTES // (4 * d_in * d_out))
    for start in range(0, len(counts), per_chunk):
        xs, gs = x_pad[start:start + per_chunk], g_pad[start:start + per_chunk]
        if xs.dtype in _LOW_PRECISION and xs.device.type == "cuda":  # callers checked _tensor_core_direct
            weight_grads = torch.bmm(gs.mT, xs, out_dtype=torch.float32)
        else:
            weight_grads = torch.bmm(gs.mT.float(), xs.float())
        # float32 norms (accumulated without materialising the squares), squared in float64
        sq_norms[start:start + per_chunk] += torch.linalg.vector_norm(weight_grads.flatten(1), dim=1).double().square()
    return sq_norms


_GROUPED_DIRECT_BYTES = 3 << 30  # bf16 per-group gradients held at once by the grouped path
# How a bf16/fp16 model's (expert, sequence) gradient norms are formed on a GPU, best first; each falls
# back to the next where it cannot run (PERF.md section 5 times all three side by side):
# - "triton": a fused Triton kernel that squares each gradient tile in float32 as it is formed and never
#   writes it out (unite_hf.triton_sq_norms; Triton ships with CUDA builds of torch);
# - "grouped_mm": one grouped GEMM splitting the token axis (bf16 on Hopper), gradients written out in
#   bf16 (autograd's own rounding of them) and read back for the norms;
# - "padded_bmm": one zero-padded batched product with float32 output, a host sync per call.
GROUPED_KERNEL = "triton"
_GROUPED_KERNELS = ("triton", "grouped_mm", "padded_bmm")


def _grouped_kernel(x: torch.Tensor, grad: torch.Tensor) -> str | None:
    """The grouped probe's kernel for these rows: :data:`GROUPED_KERNEL` or the first after it that runs;
    None where none does (CPUs, float32 rows: the per-expert kernels)."""
    from . import triton_sq_norms

    if not _tensor_core_direct(x, grad):
        return None
    runs = {"triton": triton_sq_norms.available(x), "grouped_mm": _grouped_direct(x, grad), "padded_bmm": True}
    return next(k for k in _GROUPED_KERNELS[_GROUPED_KERNELS.index(GROUPED_KERNEL):] if runs[k])


def _k_grouped_mm() -> Callable[..., torch.Tensor] | None:
    """torch's grouped GEMM (``torch.nn.functional.grouped_mm``, torch >= 2.10, else ``torch._grouped_mm``)."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_direct(x: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether the rows take :func:`_grouped_direct_sq_norms`: bf16 on a CUDA GPU of compute capability 9+
    (Hopper), where torch's grouped GEMM has its bf16 kernel that needs no host sync (elsewhere it is a
    loop over the groups), and widths whose rows are 16-byte aligned, as that kernel requires."""
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
            and _k_grouped_mm() is not None and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.shape[1] % 8 == 0 and grad.shape[1] % 8 == 0)


def _grouped_direct_sq_norms(x: torch.Tensor, grad: torch.Tensor, group: torch.Tensor, num_groups: int,
                             bias: bool = False, kernel: str = "grouped_mm") -> torch.Tensor:
    """``||G_n.T @ X_n||_F^2`` (plus ``||sum_t g_t||^2`` with ``bias``) of each group ``n`` of
    ``num_groups``, as ``(num_groups,)`` float64; rows sorted by ``group`` (an empty group gives 0).

    Every group's gradient comes out of one grouped GEMM that splits the contraction (token) axis at
    the group boundaries: the product autograd forms for the whole batch's weight gradient, cut per
    sequence, with float32 accumulation and the bf16 rounding of autograd's own gradient (unbiased, so
    the squared norms err by ~1e-6 relative, far inside the 1e-4 the tests ask). No host sync, one
    kernel per call where the per-expert path took a padded batch per expert and a sync each
    (issue 15, PERF.md section 5). The norms are reduced in float32 from the bf16 gradients. With
    ``kernel="triton"`` the fused kernel of :mod:`unite_hf.triton_sq_norms` forms and squares each
    gradient tile in float32 instead, never writing it out (no bf16 rounding either).
    """
    counts = torch.bincount(group, minlength=num_groups)
    if kernel == "triton":
        from .triton_sq_norms import grouped_sq_norms

        sq_norms = grouped_sq_norms(x, grad, counts).double()
    else:
        sq_norms = _grouped_mm_sq_norms(x, grad, counts)
    if bias:
        sums = torch.zeros(num_groups, grad.shape[1], dtype=torch.float32, device=x.device).index_add_(0, group, grad.float())
        sq_norms += sums.double().square().sum(1)
    return sq_norms


def _grouped_mm_sq_norms(x: torch.Tensor, grad: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The ``"grouped_mm"`` kernel of :func:`_grouped_direct_sq_norms` (weights only), float64."""
    num_groups = counts.numel()
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    d_in, d_out = x.shape[1], grad.shape[1]
    per_chunk = max(1, _GROUPED_DIRECT_BYTES // (2 * d_in * d_out))
    grouped_mm, grad_t = _k_grouped_mm(), grad.mT  # (out, rows): column-major, as the kernel accepts
    if per_chunk >= num_groups:
        weight_grads = grouped_mm(grad_t, x, offs=offsets)  # (groups, out, in)
        norms = torch.linalg.vector_norm(weight_grads.flatten(1), dim=1, dtype=torch.float32)
    else:  # bounded memory: the row ranges of each chunk of groups (one host sync)
        bounds = [0, *offsets.tolist()]
        norms = torch.empty(num_groups, dtype=torch.float32, device=x.device)
        for first in range(0, num_groups, per_chunk):
            last = min(first + per_chunk, num_groups)
            lo, hi = bounds[first], bounds[last]
            weight_grads = grouped_mm(grad_t[:, lo:hi], x[lo:hi], offs=offsets[first:last] - lo)
            norms[first:last] = torch.linalg.vector_norm(weight_grads.flatten(1), dim=1, dtype=torch.float32)
    # an empty group's slice of the output is not written by the kernel: never read it
    return torch.where(counts > 0, norms.double().square(), 0.0)


def _sequence_groups(x: torch.Tensor, grad: torch.Tensor, seq_ids: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Rows ordered by sequence (the probes' rows already are) and the group sizes, in one device sync."""
    groups, counts = torch.stack(torch.unique_consecutive(seq_ids, return_counts=True)).tolist()
    if any(b <= a for a, b in zip(groups, groups[1:])):  # a sequence's rows are not all adjacent
        order = torch.argsort(seq_ids, stable=True)
        return _sequence_groups(x[order], grad[order], seq_ids[order])
    return x, grad, counts


def _group_positions(counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows in consecutive groups of ``counts``: each row's group, its position in the group, and the
    counts as a tensor (what zero-padding the groups into a ``(groups, longest, d)`` stack needs)."""
    counts_t = torch.tensor(counts, device=device)
    rows = int(sum(counts))
    group = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t, output_size=rows)
    pos = torch.arange(rows, device=device) - (torch.cumsum(counts_t, 0) - counts_t)[group]
    return group, pos, counts_t


def _rows_of_groups(tensors: tuple[torch.Tensor, ...], counts: list[int], keep: list[bool]) -> tuple[torch.Tensor, ...]:
    device = tensors[0].device
    rows = torch.repeat_interleave(torch.tensor(keep, device=device), torch.tensor(counts, device=device),
                                   output_size=sum(counts))
    return tuple(t[rows] for t in tensors)


def _augmented_rows(x: torch.Tensor, grad: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive row groups as ``(G, T + 2, d)`` "token" stacks whose Gram form gives ``||G_n.T X_n||^2``
    with little cancellation.

    With ``mu``, ``nu`` a group's float32 means, ``z_t = x_t - mu``, ``h_t = g_t - nu``, ``b = sum_t z_t``
    (zero but for rounding) and ``p = T nu + sum_t h_t`` (``sum_t g_t``):

        G.T X = H.T Z + p mu.T + nu b.T = [H; p; nu].T [Z; mu; b]

    up to the rounding of ``z_t`` and ``h_t``, relative to ``H.T Z``. Group n becomes the rows
    ``[z_t..., 0 (padding to the longest group)..., mu, b]`` of ``x`` and ``[h_t..., 0..., p, nu]`` of
    ``grad``: the tokens' shared component leaves the Grams, where it made the terms of
    ``sum_{s,t} (x_s.x_t)(g_s.g_t)`` cancel, for two rows whose products do not. ``b`` and ``p`` are
    float32 sums of centred rows, so their rounding scales with the rows' spread, not with their mean;
    where ``mu`` or ``nu`` is large enough to make even that matter, :func:`_gram_sq_norms` says so.
    (Summing in float64 instead costs a CPU ~40% of this kernel, for its float64 conversions.)
    """
    n, longest, dtype = len(counts), max(counts), x.dtype
    if n == 1:  # no padding, nothing to index
        x_aug, g_aug = x.new_empty(1, longest + 2, x.shape[1]), grad.new_empty(1, longest + 2, grad.shape[1])
        mu, nu = x.mean(0, keepdim=True), grad.mean(0, keepdim=True)
        torch.sub(x, mu, out=x_aug[0, :longest])
        torch.sub(grad, nu, out=g_aug[0, :longest])
        size: float | torch.Tensor = float(longest)
    else:
        device = x.device
        group, pos, counts_t = _group_positions(counts, device)
        x_aug, g_aug = x.new_zeros(n, longest + 2, x.shape[1]), grad.new_zeros(n, longest + 2, grad.shape[1])
        x_aug[group, pos], g_aug[group, pos] = x, grad
        size = counts_t.to(dtype)[:, None]
        mu, nu = x_aug.sum(1) / size, g_aug.sum(1) / size  # segment means: padding is 0
        valid = (torch.arange(longest, device=device) < counts_t[:, None]).to(dtype)[..., None]
        x_aug[:, :longest].addcmul_(valid, mu[:, None], value=-1)  # centred; padding rows stay 0
        g_aug[:, :longest].addcmul_(valid, nu[:, None], value=-1)
    # sums of the centred rows: small, so their rounding is too (u over the spread, not over the mean)
    x_aug[:, -2], x_aug[:, -1] = mu, x_aug[:, :longest].sum(1)
    g_aug[:, -2], g_aug[:, -1] = (size * nu.double() + g_aug[:, :longest].sum(1).double()).to(dtype), nu
    return x_aug, g_aug


def _gram_sq_norms(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``||G_n.T X_n||^2 = sum_{s,t} (x_s.x_t)(g_s.g_t)`` per stack of rows ``(G, T, d)``, and an estimate
    of its rounding error (both float64; the estimate is 0 for float64 inputs).

    In float32 the token Grams take half the float64 time on a CPU, and a 32nd to a 64th on GPUs without
    full-rate float64 (all but the A100/H100 class). The error of a float32 Gram entry is about
    ``u |x_s||x_t|`` (u the unit roundoff), so that of the sum about
    ``u (sum |g_s.g_t| |x_s||x_t| + sum |x_s.x_t| |g_s||g_t|)``, read off the Grams themselves, plus the
    rounding of the sums in the two last rows. Measured on 300 adversarial groups (PERF.md): the actual
    error is a median 0.12x this estimate and at most 3.5x, where the estimate sits at its floor of
    about 2u; no group it kept (estimate <= ``_F32_GRAM_RTOL``) erred by more than 2e-6.
    """
    gram_x, gram_g = x @ x.mT, grad @ grad.mT
    sq_norms = (gram_x * gram_g).sum((1, 2), dtype=torch.float64)
    if x.dtype == torch.float64:
        return sq_norms, torch.zeros_like(sq_norms)
    norms_x = gram_x.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()[..., None]
    norms_g = gram_g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()[..., None]
    error = ((gram_g.abs() @ norms_x) * norms_x).sum((1, 2), dtype=torch.float64) \
        + ((gram_x.abs() @ norms_g) * norms_g).sum((1, 2), dtype=torch.float64)
    # the last rows, [mu; b] and [p; nu] (_augmented_rows): p and b sum T centred rows in float32, off
    # by at most 0.19 u sqrt(T) |rows| as measured (T = 8 to 4096); u sqrt(T) |rows| is taken, an error
    # that mu and nu multiply and the cross terms double
    spread_x, spread_g = (n[:, :-2].double().square().sum((1, 2)).sqrt() for n in (norms_x, norms_g))
    error += 2 * (x.shape[1] - 2) ** 0.5 * sq_norms.abs().sqrt() \
        * (spread_g * norms_x[:, -2, 0].double() + spread_x * norms_g[:, -1, 0].double())
    return sq_norms, error * _F32_UNIT_ROUNDOFF


class _ProbedLinear(torch.autograd.Function):
    """``x @ W.T + b`` whose backward hands (x, grad_out) to a sink and gives W no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_ids, expert, sink):
        ctx.save_for_backward(x, weight, seq_ids)
        ctx.expert, ctx.sink, ctx.has_bias = expert, sink, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, seq_ids = ctx.saved_tensors
        ctx.sink(ctx.expert, x, grad_out, seq_ids, ctx.has_bias)
        return grad_out @ weight.to(grad_out.dtype), None, None, None, None, None


def _grouped_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: RoutedRows,
                     transposed: bool) -> torch.Tensor:
    """``x[r] @ W[e_r].T + b_r`` for rows sorted by expert; rows of other processes' experts are 0."""
    from .compat import grouped_mm

    out = grouped_mm(x, weight if transposed else weight.mT, rows.offsets)  # weight as (E, in, out)
    if bias is not None:
        out = out + bias
    return out.masked_fill(~rows.valid[:, None], 0)  # rows past the last group are not written


class _ProbedGroupedLinear(torch.autograd.Function):
    """:func:`_grouped_forward` whose backward hands all experts' (x, grad_out) to a sink in one call
    (:meth:`_GradientSink.grouped`) and gives the weights no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, transposed, sink):
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.transposed, ctx.sink, ctx.has_bias = rows, transposed, sink, bias is not None
        return _grouped_forward(x, weight, bias, rows, transposed)

    @staticmethod
    def backward(ctx, grad_out):
        from .compat import grouped_mm

        x, weight = ctx.saved_tensors
        rows = ctx.rows
        grad_out = grad_out.masked_fill(~rows.valid[:, None], 0)  # other processes' rows: not this sink's
        ctx.sink.grouped(x, grad_out, rows, ctx.has_bias)
        # d x_r = g_r @ W[e_r]: the weight as (E, out, in)
        grad_x = grouped_mm(grad_out, (weight.mT if ctx.transposed else weight).to(grad_out.dtype), rows.offsets)
        return grad_x.masked_fill(~rows.valid[:, None], 0), None, None, None, None, None


class _BlockProbe:
    """The statistics of one MoE block during a calibration pass: the :class:`~unite_hf.sources.base.ExpertProbe`
    its layout's :meth:`~unite_hf.sources.MoEBlock.probe` sends every expert linear map through."""

    def __init__(self, block: MoEBlock, diagonal: bool) -> None:
        self.block = block
        num_experts = block.num_experts
        # accumulators live with the experts (a GPU or a device_map shard); moved to CPU at the end
        device = block.expert(0).up.device
        self.fisher = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.routed = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.mass = torch.zeros(num_experts, dtype=torch.float64, device=device)  # routing-weight sums
        # routed counts as read from a router's output (ModuleList), checked against ``routed``
        self.mass_counts: torch.Tensor | None = None
        self.mass_unreadable = False  # a router output no reader understood: no routing mass
        self.seq_ids: torch.Tensor | None = None  # token row -> sequence, set per batch
        self.num_sequences = 0  # sequences in the batch, set per batch
        self.diag_weights: dict[str, torch.Tensor] = {}
        self.diag_biases: dict[str, torch.Tensor] = {}
        self.sinks: dict[str, _GradientSink] = {}
        # Accumulators take the shapes of the linear maps the layout's forward runs, so the layout's own
        # view logic (expert_from_linears) turns them into per-projection matrices exactly as it does weights.
        for name, (shape, bias_shape) in block.probed_linears().items():
            diag = None
            if diagonal:
                self.diag_weights[name] = torch.zeros((num_experts, *shape), dtype=torch.float32, device=device)
                if bias_shape is not None:
                    self.diag_biases[name] = torch.zeros((num_experts, *bias_shape), dtype=torch.float32, device=device)
                diag = functools.partial(self._diag_views, name)
            self.sinks[name] = _GradientSink(self.fisher, diag)

    def _diag_views(self, name: str, expert: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.diag_biases[name][expert] if name in self.diag_biases else None
        return self.diag_weights[name][expert], bias

    def linear(self, name: str, expert: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               seq_ids: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference-only pass: routing statistics
            return F.linear(x, weight, bias)
        return _ProbedLinear.apply(x, weight, bias, seq_ids, expert, self.sinks[name])

    def grouped_linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       rows: RoutedRows, transposed: bool) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference-only pass: routing statistics
            return _grouped_forward(x, weight, bias, rows, transposed)
        return _ProbedGroupedLinear.apply(x, weight, bias, rows, transposed, self.sinks[name])

    def route(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        num_experts = self.block.num_experts
        valid = top_k_index < num_experts  # expert-parallel sentinels carry index num_experts
        self.routed += torch.bincount(top_k_index[valid].flatten(), minlength=num_experts).double()
        # detached: in a Fisher pass the weights carry a graph that must not outlive the batch
        self.mass.index_add_(0, top_k_index[valid].flatten(), top_k_weights[valid].detach().flatten().double())

    def token_sequences(self, hidden_states: torch.Tensor) -> torch.Tensor:
        seq_ids, block = self.seq_ids, self.block
        if seq_ids is None or seq_ids.numel() != hidden_states.shape[0]:
            raise RuntimeError(
                f"{block.name}.{block.experts_attr} received {hidden_states.shape[0]} token rows, but the calibration "
                f"batch has {0 if seq_ids is None else seq_ids.numel()} tokens; cannot attribute tokens to sequences."
            )
        return seq_ids.to(hidden_states.device)  # device_map="auto" spreads blocks over devices

    def diagonal(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-projection ``(E, out, in)`` and ``(E, out)`` diagonal-Fisher sums."""
        block = self.block
        weights: dict[str, list[torch.Tensor]] = {p: [] for p in block.projection_names()}
        biases: dict[str, list[torch.Tensor]] = {p: [] for p in block.projection_names()}
        for e in range(block.num_experts):
            views = block.expert_from_linears({name: self._diag_views(name, e) for name in self.diag_weights})
            for p in block.projection_names():
                weights[p].append(views.projection(p))
                if block.has_bias:
                    biases[p].append(views.bias(p))
        return ({p: torch.stack(v) for p, v in weights.items()},
                {p: torch.stack(v) for p, v in biases.items() if v})


# -- deprecated names ------------------------------------------------------------------------------------------

def __getattr__(name: str) -> object:
    """``PROBES``, the table of probes keyed by layout name, is gone: each layout owns its probe
    (:meth:`MoEBlock.probe`, :attr:`MoEBlock.multi_sequence`). Kept as a FutureWarning alias."""
    if name == "PROBES":
        warnings.warn("unite_hf.importance.PROBES is deprecated: each expert layout owns its probe "
                      "(MoEBlock.probe and MoEBlock.multi_sequence)", FutureWarning, stacklevel=2)
        return {layout: (lambda block, probe: block.probe(probe), cls.multi_sequence) for layout, cls in LAYOUTS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the calibration pass -----------------------------------------------------------------------------------

@contextlib.contextmanager
def _calibration_mode(model: nn.Module, need_grad: bool, train_mode: bool = False) -> Iterator[None]:
    """Freeze every parameter and, for Fisher, make activations require grad from the embeddings on,
    so one backward reaches every expert without allocating a single weight gradient."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {module: module.training for module in model.modules()}
    handle = None
    model.eval()  # no dropout or router jitter: the Fisher of the deployed model
    if train_mode:  # the train-mode code path, still without dropout
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if need_grad:
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        for module, training in modes.items():
            module.training = training


def _sequence_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor, labels: str,
                             generator: torch.Generator | None) -> torch.Tensor:
    """Sum over sequences of sum over positions of log p(y_t | x_<t); targets per ``labels``."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if labels == "empirical":
        targets = input_ids[:, 1:]
    else:
        probs = log_probs.detach().exp().reshape(-1, log_probs.shape[-1])
        targets = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(input_ids[:, 1:].shape)
        targets = targets.to(input_ids.device)
    return log_probs.gather(-1, targets.unsqueeze(-1)).sum()


def compute_expert_importance(
    model: nn.Module,
    calibration: CalibrationSet | torch.Tensor,
    *,
    source: MoESource | None = None,
    fisher: bool = True,
    labels: str = "empirical",
    diagonal: bool = False,
    batch_size: int = 8,
    seed: int = 0,
    train_mode: bool = False,
    show_progress: bool = True,
) -> ExpertImportance:
    """Fisher scores (exact, per calibration sequence) and routing frequencies of every expert.

    Args:
        model: a MoE causal LM (any layout :func:`unite_hf.sources.get_source` reads).
        calibration: a :class:`CalibrationSet` or an input_ids tensor ``[N, T]``.
        fisher: compute the Fisher (one forward and backward per batch); with ``False`` only routing
            frequencies are collected, in inference mode.
        labels: ``"empirical"`` (observed next tokens) or ``"sampled"`` (drawn from the model, the
            true Fisher; seeded by ``seed``).
        diagonal: also accumulate the elementwise diagonal Fisher per projection (memory: one
            float32 copy of all expert weights).
        batch_size: sequences per pass. ModuleList experts always use one sequence per pass.
        train_mode: run the forward in train mode (dropout still off). Needed by remote-code MoEs
            whose eval path runs the experts under ``torch.no_grad`` (DeepSeek-MoE-16B); mind
            train-only behaviour such as router jitter noise.
    """
    from .progress import progress_enabled

    show_progress = progress_enabled(show_progress)  # off with HF_HUB_DISABLE_PROGRESS_BARS / TQDM_DISABLE
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    input_ids = calibration.input_ids if isinstance(calibration, CalibrationSet) else calibration
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ValueError(f"calibration input_ids must be a non-empty [N, T] tensor, got shape {tuple(input_ids.shape)}")
    source = source or get_source(model)
    if not all(block.multi_sequence for block in source.blocks):
        batch_size = 1
    probes = [_BlockProbe(block, diagonal and fisher) for block in source.blocks]
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    num_sequences, seq_len = input_ids.shape

    with contextlib.ExitStack() as stack:
        stack.enter_context(_calibration_mode(model, need_grad=fisher, train_mode=train_mode))
        for block, probe in zip(source.blocks, probes):
            stack.enter_context(block.probe(probe))
        for layout, blocks in blocks_by_layout(source.blocks).items():  # model-wide switches (fused experts)
            stack.enter_context(layout.probe_model(model, blocks))
        if not fisher:
            stack.enter_context(torch.inference_mode())
        # unit "seq": tqdm shows sequences/s; tokens/s is added as a postfix
        bar = tqdm(total=num_sequences, desc="Fisher" if fisher else "Routing", unit="seq", disable=not show_progress)
        started = time.perf_counter()
        for start in range(0, num_sequences, batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            seq_ids = torch.arange(batch.shape[0], device=device).repeat_interleave(seq_len)
            for probe in probes:
                probe.seq_ids, probe.num_sequences = seq_ids, batch.shape[0]
            logits = model(input_ids=batch, use_cache=False).logits
            if fisher:
                _sequence_log_likelihood(logits, batch, labels, generator).backward()
            bar.update(batch.shape[0])
            if show_progress:
                done = min(start + batch_size, num_sequences)
                bar.set_postfix(tok_per_s=f"{done * seq_len / max(time.perf_counter() - started, 1e-9):.0f}")
        bar.close()

    if fisher:
        _check_gradients_reached(probes)
    routed = torch.stack([p.routed.cpu() for p in probes])
    importance = ExpertImportance(
        moe_layers=source.moe_layers,
        fisher=torch.stack([p.fisher.cpu() for p in probes]) / num_sequences,
        frequency=routed / routed.sum(dim=1, keepdim=True).clamp_min(1),
        num_sequences=num_sequences,
        labels=labels,
        routed=routed,
        routing_mass=_routing_mass(probes),
    )
    if diagonal and fisher:
        importance.fisher_diag, importance.fisher_diag_bias = {}, {}
        for block, probe in zip(source.blocks, probes):
            weights, biases = probe.diagonal()
            for proj, value in weights.items():
                importance.fisher_diag[(block.layer_idx, proj)] = value.cpu() / num_sequences
            for proj, value in biases.items():
                importance.fisher_diag_bias[(block.layer_idx, proj)] = value.cpu() / num_sequences
    return importance


def _routing_mass(probes: list[_BlockProbe]) -> torch.Tensor | None:
    """Stacked routing-weight sums; None when a block's router output could not be read, or gave counts
    that disagree with the tokens its experts actually received (then the weights are not trustworthy
    either). Callers that need the mass say so; a Fisher pass does not care."""
    for probe in probes:
        if probe.mass_unreadable:
            return None
        if probe.mass_counts is not None and not torch.equal(probe.mass_counts, probe.routed):
            return None
    return torch.stack([p.mass.cpu() for p in probes])


def _check_gradients_reached(probes: list[_BlockProbe]) -> None:
    """A block that routed tokens but whose probe saw no backward ran its experts without autograd
    (remote code such as DeepSeek-MoE-16B runs eval-mode experts under ``torch.no_grad``): its
    Fisher would be silently zero."""
    for probe in probes:
        if probe.routed.sum() > 0 and not any(sink.calls for sink in probe.sinks.values()):
            block = probe.block
            raise RuntimeError(
                f"{block.name}.{block.experts_attr}: experts ran without autograd, so their Fisher cannot be "
                "measured (the module's eval path probably runs under torch.no_grad). Pass train_mode=True (the "
                "train-mode path, dropout still off), or use fusion='frequency' / 'uniform', which need no gradients."
            )


def compute_routing_frequency(model: nn.Module, calibration: CalibrationSet | torch.Tensor, **kwargs) -> torch.Tensor:
    """Inference-only routing statistics: ``(len(moe_layers), E)`` share of routed (token, slot) pairs."""
    return compute_expert_importance(model, calibration, fisher=False, **kwargs).frequency
