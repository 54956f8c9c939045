"""Tensor decompositions of stacked per-layer weight matrices: where the "gene" comes from.

UNITE fuses the experts of each MoE layer into one matrix per projection (gate / up / down) and
stacks the ``L`` fused matrices of one projection into a third-order tensor

    X  with shape (L, d_out, d_in),   X[l] = fused weight matrix of layer l.

Every method in this module writes its result in one common *Tucker form*

    X_hat = G x_1 U_L x_2 U_out x_3 U_in,
    X_hat[l] = U_out @ G_l @ U_in.T,    G_l = sum_k U_L[l, k] * G[k]          (r_out x r_in)

with core ``G`` (r_L, r_out, r_in), layer factor ``U_L`` (L, r_L), output basis ``U_out`` and
input basis ``U_in``.  The shared bases ``U_out`` / ``U_in`` are the gene; a target layer is grown
from them and its own small core ``G_l``.  The three methods are defined exactly as follows.

``"tucker"`` (the UNITE method)
    Rank-(r_L, r_out, r_in) Tucker decomposition computed by higher-order orthogonal iteration
    (HOOI), initialised with the truncated higher-order SVD (HOSVD).  It (locally) minimises
    ``||X - G x_1 U_L x_2 U_out x_3 U_in||_F`` over factors with orthonormal columns; for such
    factors the optimal core is ``G = X x_1 U_L^T x_2 U_out^T x_3 U_in^T``.  ``U_out`` (d_out, r_out)
    and ``U_in`` (d_in, r_in) are shared by all layers.

``"cp"`` (CANDECOMP/PARAFAC baseline)
    Rank-R CP decomposition with a single rank ``R = r_out`` (so r_L = r_out = r_in = R):

        X[l] ~= sum_{r<R} lambda_r * U_L[l, r] * outer(U_out[:, r], U_in[:, r]),

    fitted by alternating least squares (``tensorly.decomposition.parafac``, ``init="svd"``,
    fixed ``random_state``).  Columns of ``U_L``, ``U_out``, ``U_in`` have unit norm (they are *not*
    orthogonal), ``lambda >= 0`` sorted in decreasing order, and the Tucker-form core is the
    superdiagonal tensor ``G[r, r, r] = lambda_r`` (zero elsewhere).  Because CP ranks are not bounded
    by the mode sizes, ``R`` may exceed ``L``; it must not exceed ``d_out`` or ``d_in``.  Note that
    the dense (R, R, R) core costs ``4 R^3`` bytes (512 MiB at R = 512).

``"svd"`` (per-layer baseline, no sharing across layers)
    Independent truncated SVD of every layer with one rank ``r = r_out = r_in``:

        X[l] ~= U_l @ diag(s_l) @ V_l.T,   U_l (d_out, r), s_l the r largest singular values, V_l (d_in, r),

    the best rank-r approximation of each layer (Eckart-Young).  In Tucker form: ``out_factor``
    (L, d_out, r) with ``out_factor[l] = U_l``, ``in_factor`` (L, d_in, r) with ``in_factor[l] = V_l``,
    ``core`` (L, r, r) with ``core[l] = diag(s_l)`` and ``layer_factor = I_L`` (r_L = L), so that
    ``G_l = core[l]`` and the bases are per layer (``shared_bases`` is False).

``"tucker_hidden"`` (bases shared along the hidden axis only; beyond the paper)
    The residual stream is one space for every layer, but FFN neuron indices do not correspond
    across layers, so a neuron-axis basis shared by all layers keeps little of each layer. This
    method shares one orthonormal basis ``U_h`` only along the hidden (residual-stream) axis given
    by ``hidden_mode`` (``"in"`` for gate/up, ``"out"`` for down) and gives every layer its own
    orthonormal factor ``A_l`` along the neuron axis (for ``hidden_mode="in"``):

        X[l] ~= A_l @ G_l @ U_h.T,   A_l (d_out, r_out) per layer, U_h (d_in, r_in) shared,

    fitted by alternating least squares on orthonormal factors: ``U_h`` = top-r_in eigenvectors of
    ``sum_l X_l^T A_l A_l^T X_l`` (initially ``sum_l X_l^T X_l``), then per layer the rank-r_out
    truncated SVD ``X_l U_h = A_l S_l B_l^T``, ``G_l = S_l B_l^T`` (the optimal per-layer fit for
    the given ``U_h``); ``||X - X_hat||`` never increases. ``r_L = L`` (no compression across
    layers: ``layer_factor = I_L``). ``X_l U_h`` has rank at most ``r_hidden``, so neuron-axis
    columns past it only complete an orthonormal basis (zero rows of ``G_l``). In Tucker form the shared factor is 2D
    and the per-layer one 3D (``out_factor`` (L, d_out, r_out) here). At full ranks it is exact.

**Activation-aware bases** (``input_weight=S``, any method): the kept subspace should be the one
the layer's inputs occupy, not the one that fits the weights best (SVD-LLM, ASVD). With ``S`` a
square root of the inputs' second moment ``E[x x^T]`` (``(d_in, d_in)`` for all layers, or
``(L, d_in, d_in)`` per layer), ``||W x - W_hat x||`` averaged over inputs is ``||(W - W_hat) S||_F``,
so the method runs on ``X_l S`` and the input factor is un-weighted afterwards
(``U_in <- S^{-1} U_in``, no longer orthonormal). A shared input factor needs one shared ``S``.
``relative_error`` is then measured on the un-weighted ``X``; ``spectral_energy`` describes ``X S``.

Ranks are ``(r_L, r_out, r_in)``; an integer ``r`` means ``(L, r, r)`` (no compression across
layers; for "cp" it means ``(r, r, r)``).  Factor columns are sign-normalised (the entry of largest
magnitude of each column is positive) so results are reproducible across runs.

``spectral_energy[mode]`` is the cumulative fraction of squared singular values of the mode-n
unfolding of X (mode "layer" = rows indexed by l, "out" = by output row, "in" = by input column):
entry ``k - 1`` is the fraction of ``||X||_F^2`` captured by the top-k singular vectors of that
mode.  It describes X, not the fit, and is the same for every method.
"""

from __future__ import annotations

import contextvars
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "DECOMPOSITIONS",
    "DEFAULT_RANK",
    "MODES",
    "Decomposition",
    "decompose",
    "decompose_streaming",
    "NEEDS_HIDDEN_MODE",
    "input_axis_is_per_layer",
    "input_weight_from_moment",
    "register_decomposition",
    "resolve_ranks",
]

#: Rank used for the output / input modes when ``rank=None``.
DEFAULT_RANK = 512
#: Names of the three modes of X, in order (layer, output rows, input columns).
MODES: tuple[str, str, str] = ("layer", "out", "in")

_T = TypeVar("_T")
# Label for progress bars ("gate", "up", ...), set by decompose() so that registered
# functions keep the documented signature.
_PROGRESS_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("_PROGRESS_LABEL", default="")


# --------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------


@dataclass
class Decomposition:
    """A decomposition of X (L, d_out, d_in) in the common Tucker form (see the module docstring).

    Attributes:
        method: "tucker", "cp" or "svd" (or another registered name).
        core: G, shape (r_L, r_out, r_in).
        layer_factor: U_L, shape (L, r_L).
        out_factor: U_out, (d_out, r_out) when shared by all layers, or (L, d_out, r_out) per layer.
        in_factor: U_in, (d_in, r_in) when shared, or (L, d_in, r_in) per layer.
        spectral_energy: ``{"layer", "out", "in"}`` -> float32 cumulative energy of that mode's
            unfolding of X, length ``min(dim, prod(other dims))``; entry k-1 = energy of the top k.
        relative_error: ``||X - X_hat||_F / ||X||_F``.
        ranks: (r_L, r_out, r_in).
    """

    method: str
    core: torch.Tensor
    layer_factor: torch.Tensor
    out_factor: torch.Tensor
    in_factor: torch.Tensor
    spectral_energy: dict[str, torch.Tensor]
    relative_error: float
    ranks: tuple[int, int, int]

    def __post_init__(self) -> None:
        # Catch inconsistent pieces (e.g. a corrupted checkpoint) here, not deep inside a matmul.
        if self.core.ndim != 3:
            raise ValueError(f"core must be 3D (r_L, r_out, r_in), got shape {tuple(self.core.shape)}")
        r_l, r_out, r_in = (int(s) for s in self.core.shape)
        self.ranks = (r_l, r_out, r_in)
        if self.layer_factor.ndim != 2 or self.layer_factor.shape[1] != r_l:
            raise ValueError(
                f"layer_factor must be (L, {r_l}), got shape {tuple(self.layer_factor.shape)}"
            )
        n_layers = self.layer_factor.shape[0]
        for label, factor, rank in (("out_factor", self.out_factor, r_out), ("in_factor", self.in_factor, r_in)):
            ok = (factor.ndim == 2 and factor.shape[1] == rank) or (
                factor.ndim == 3 and factor.shape[0] == n_layers and factor.shape[2] == rank
            )
            if not ok:
                raise ValueError(
                    f"{label} must be (d, {rank}) or ({n_layers}, d, {rank}), got shape {tuple(factor.shape)}"
                )
        missing = set(MODES) - set(self.spectral_energy)
        if missing:
            raise ValueError(f"spectral_energy is missing modes {sorted(missing)}")

    # -- shapes -----------------------------------------------------------------------------

    @property
    def shared_bases(self) -> bool:
        """True when U_out and U_in are both shared by all layers (tucker, cp); False for per-layer
        svd and for tucker_hidden (one shared hidden-axis factor, one per-layer neuron-axis factor)."""
        return self.out_factor.ndim == 2 and self.in_factor.ndim == 2

    @property
    def shared_out(self) -> bool:
        """True when U_out is one (d_out, r_out) basis for all layers."""
        return self.out_factor.ndim == 2

    @property
    def shared_in(self) -> bool:
        """True when U_in is one (d_in, r_in) basis for all layers."""
        return self.in_factor.ndim == 2

    @property
    def mixed_bases(self) -> bool:
        """True when one side is shared and the other per layer (tucker_hidden)."""
        return self.shared_out != self.shared_in

    @property
    def num_layers(self) -> int:
        return int(self.layer_factor.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (L, d_out, d_in) of the decomposed tensor."""
        return (self.num_layers, int(self.out_factor.shape[-2]), int(self.in_factor.shape[-2]))

    def _check_layer(self, layer: int) -> int:
        n = self.num_layers
        if not -n <= layer < n:
            raise IndexError(f"layer {layer} out of range for a decomposition of {n} layers")
        return layer % n

    # -- per-layer pieces ---------------------------------------------------------------------

    def layer_core(self, layer: int) -> torch.Tensor:
        """G_l = sum_k U_L[l, k] G[k], shape (r_out, r_in): the layer's coordinates in the gene."""
        layer = self._check_layer(layer)
        return torch.tensordot(self.layer_factor[layer], self.core, dims=([0], [0]))

    def layer_out_factor(self, layer: int) -> torch.Tensor:
        """The (d_out, r_out) output basis used by ``layer``."""
        layer = self._check_layer(layer)
        return self.out_factor if self.shared_out else self.out_factor[layer]

    def layer_in_factor(self, layer: int) -> torch.Tensor:
        """The (d_in, r_in) input basis used by ``layer``."""
        layer = self._check_layer(layer)
        return self.in_factor if self.shared_in else self.in_factor[layer]

    def reconstruct_layer(self, layer: int) -> torch.Tensor:
        """W_l = U_out @ G_l @ U_in.T, shape (d_out, d_in)."""
        return self.layer_out_factor(layer) @ self.layer_core(layer) @ self.layer_in_factor(layer).T

    def reconstruct(self) -> torch.Tensor:
        """X_hat, shape (L, d_out, d_in)."""
        cores = torch.tensordot(self.layer_factor, self.core, dims=([1], [0]))  # (L, r_out, r_in)
        # Broadcasting matmul covers both the shared (2D) and the per-layer (3D) bases.
        return self.out_factor @ cores @ self.in_factor.transpose(-1, -2)

    def retained_energy(self) -> dict[str, float]:
        """Spectral energy of X at the chosen rank of each mode (ranks past the spectrum -> 1.0).

        For "tucker" this is the energy kept by the HOSVD subspaces; for "cp" and "svd" it is the
        reference energy of a shared basis of the same size, not what those methods retain.
        """
        out: dict[str, float] = {}
        for mode, rank in zip(MODES, self.ranks):
            energy = self.spectral_energy[mode]
            out[mode] = float(energy[min(rank, energy.numel()) - 1])
        return out

    # -- serialisation ------------------------------------------------------------------------

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat dict of contiguous tensors (safe for safetensors), keys ``f"{prefix}.core"`` etc."""
        tensors = {
            "core": self.core,
            "layer_factor": self.layer_factor,
            "out_factor": self.out_factor,
            "in_factor": self.in_factor,
        }
        tensors.update({f"spectral_energy.{mode}": self.spectral_energy[mode] for mode in MODES})
        # clone(): safetensors refuses tensors that share storage or are views of a larger one.
        return {_key(prefix, k): v.detach().contiguous().clone() for k, v in tensors.items()}

    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, torch.Tensor], prefix: str, method: str, relative_error: float
    ) -> Decomposition:
        """Inverse of :meth:`state_dict` (method and error are stored as metadata by the caller)."""
        names = ["core", "layer_factor", "out_factor", "in_factor"] + [f"spectral_energy.{m}" for m in MODES]
        missing = [_key(prefix, n) for n in names if _key(prefix, n) not in tensors]
        if missing:
            raise KeyError(f"decomposition tensors missing from state dict: {missing}")
        core = tensors[_key(prefix, "core")]
        return cls(
            method=method,
            core=core,
            layer_factor=tensors[_key(prefix, "layer_factor")],
            out_factor=tensors[_key(prefix, "out_factor")],
            in_factor=tensors[_key(prefix, "in_factor")],
            spectral_energy={m: tensors[_key(prefix, f"spectral_energy.{m}")] for m in MODES},
            relative_error=float(relative_error),
            ranks=tuple(int(s) for s in core.shape),  # type: ignore[arg-type]
        )


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------
# Registry and rank rules
# --------------------------------------------------------------------------------------------

DecompositionFn = Callable[..., Decomposition]
#: name -> fn(tensor, ranks, *, n_iter_max, tol, show_progress) -> Decomposition.
#: ``tensor`` arrives validated, finite, float32/float64; ``ranks`` already resolved.
DECOMPOSITIONS: dict[str, DecompositionFn] = {}


#: methods that need to know which axis is the hidden (residual-stream) one: ``fn(..., hidden_mode=)``
NEEDS_HIDDEN_MODE: set[str] = set()


def register_decomposition(name: str, *, needs_hidden_mode: bool = False) -> Callable[[DecompositionFn], DecompositionFn]:
    """Decorator adding ``fn(tensor, ranks, *, n_iter_max, tol, show_progress)`` to the registry
    (``needs_hidden_mode``: the method also takes ``hidden_mode="in"|"out"``)."""

    def decorator(fn: DecompositionFn) -> DecompositionFn:
        if needs_hidden_mode:
            NEEDS_HIDDEN_MODE.add(name)
        existing = DECOMPOSITIONS.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ValueError(f"decomposition {name!r} is already registered (by {existing.__qualname__})")
        DECOMPOSITIONS[name] = fn
        return fn

    return decorator


def _check_method(method: str) -> None:
    if method not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition method {method!r}; registered: {sorted(DECOMPOSITIONS)}")


def _as_int_rank(value: object, what: str) -> int:
    # bool is an Integral but rank=True is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def resolve_ranks(
    shape: tuple[int, int, int], method: str, rank: int | tuple[int, int, int] | None
) -> tuple[int, int, int]:
    """Turn a user rank into (r_L, r_out, r_in) for ``method`` on a tensor of ``shape`` (L, d_out, d_in).

    * ``None`` -> the default ``DEFAULT_RANK`` (512) for the out / in modes, clipped to the
      dimensions with a warning naming the clipped mode.
    * ``int r`` -> ``(L, r, r)`` for tucker and svd, ``(r, r, r)`` for cp.
    * ``(r_L, r_out, r_in)`` -> used as given (svd needs ``r_L == L`` and ``r_out == r_in``;
      cp needs all three equal).

    Explicit ranks are never clipped: a rank <= 0 or larger than its dimension raises ValueError.
    Bounds: tucker ``r_n <= dim_n``; svd ``r <= min(d_out, d_in)``; cp ``R <= d_out`` and
    ``R <= d_in`` (R may exceed L).
    """
    _check_method(method)
    if len(shape) != 3:
        raise ValueError(f"shape must be (L, d_out, d_in), got {tuple(shape)}")
    n_layers, d_out, d_in = (int(s) for s in shape)
    dims = {"layer": n_layers, "out": d_out, "in": d_in}

    if rank is None:
        label = _PROGRESS_LABEL.get()
        where = f" of {label!r}" if label else ""
        r = DEFAULT_RANK
        bounds = {"out": d_out, "in": d_in}
        if method not in ("cp", "svd"):
            # Tucker-like: r_out and r_in are clipped independently.
            for mode, dim in bounds.items():
                if r > dim:
                    warnings.warn(
                        f"default rank {r} exceeds the {mode} dimension {dim}{where}; "
                        f"clipped the {mode} rank to {dim}",
                        stacklevel=3,
                    )
            return (n_layers, min(r, d_out), min(r, d_in))
        # cp and svd tie r_out and r_in to one rank, bounded by both matrix dimensions.
        clipped = min(r, d_out, d_in)
        if clipped < r:
            modes = [m for m, dim in bounds.items() if r > dim]
            warnings.warn(
                f"default rank {r} exceeds the {' and '.join(modes)} dimension "
                f"{' and '.join(str(bounds[m]) for m in modes)}{where}; clipped {method} rank to {clipped}",
                stacklevel=3,
            )
        return (clipped, clipped, clipped) if method == "cp" else (n_layers, clipped, clipped)

    if isinstance(rank, (tuple, list)):
        if len(rank) != 3:
            raise ValueError(f"rank tuple must be (r_L, r_out, r_in), got {tuple(rank)}")
        ranks = tuple(_as_int_rank(r, f"rank for mode {m!r}") for m, r in zip(MODES, rank))
        if method == "svd" and (ranks[0] != n_layers or ranks[1] != ranks[2]):
            raise ValueError(
                f"svd is per layer with one rank r: rank tuple must be (L={n_layers}, r, r), got {ranks}"
            )
        if method == "cp" and len(set(ranks)) != 1:
            raise ValueError(f"cp uses a single rank R = r_L = r_out = r_in, got {ranks}")
    else:
        r = _as_int_rank(rank, "rank")
        ranks = (r, r, r) if method == "cp" else (n_layers, r, r)

    for mode, r in zip(MODES, ranks):
        if r <= 0:
            raise ValueError(f"rank for mode {mode!r} must be positive, got {r}")
        if method == "cp" and mode == "layer":
            continue  # CP ranks may exceed the number of layers
        if r > dims[mode]:
            raise ValueError(
                f"rank {r} for mode {mode!r} exceeds its dimension {dims[mode]} "
                f"(tensor shape {(n_layers, d_out, d_in)}, method {method!r})"
            )
    return ranks  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def decompose(
    tensor: torch.Tensor,
    method: str = "tucker",
    rank: int | tuple[int, int, int] | None = None,
    *,
    n_iter_max: int = 25,
    tol: float = 1e-6,
    show_progress: bool = False,
    name: str = "",
    hidden_mode: str | None = None,
    input_weight: torch.Tensor | None = None,
) -> Decomposition:
    """Decompose X (L, d_out, d_in) with a registered method; see the module docstring.

    Args:
        tensor: 3D floating tensor, non-empty, finite, not all zero.  Computation runs in float64
            when given float64 and in float32 otherwise; returned factors are float32.
        method: "tucker" (HOOI), "cp" (PARAFAC ALS) or "svd" (per layer), or any registered name.
        rank: None (default 512, clipped), int r, or (r_L, r_out, r_in); see :func:`resolve_ranks`.
        n_iter_max: maximum iterations (HOOI sweeps for tucker, ALS sweeps for cp; unused by svd).
        tol: stop when the relative change of the core norm (tucker) / the absolute change of the
            relative reconstruction error (cp, tensorly's criterion) drops below it.
        show_progress: tqdm bar over the iterations.
        name: label for warnings and the progress bar (e.g. "gate").
        hidden_mode: ``"in"`` or ``"out"``: which matrix axis is the hidden (residual-stream) one;
            required by methods that share bases only along it (``tucker_hidden``), ignored otherwise.
        input_weight: activation-aware bases: ``S`` with ``S S^T = E[x x^T]`` of the layer inputs,
            ``(d_in, d_in)`` or per layer ``(L, d_in, d_in)``, symmetric positive definite (see
            :func:`input_weight_from_moment`); the module docstring says what changes.

    Raises:
        TypeError: non-tensor or non-floating input, non-int rank.
        ValueError: bad shape, empty, NaN/Inf or all-zero input, bad rank, unknown method.
    """
    _check_method(method)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 3:
        raise ValueError(f"tensor must be 3D (L, d_out, d_in), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be floating point, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"tensor is empty (shape {tuple(tensor.shape)})")
    n_iter_max = _as_int_rank(n_iter_max, "n_iter_max")
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max must be >= 0, got {n_iter_max}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")

    label = f" {name!r}" if name else ""
    if torch.isnan(tensor).any():
        raise ValueError(f"tensor{label} contains NaN values")
    if torch.isinf(tensor).any():
        raise ValueError(f"tensor{label} contains infinite values")

    token = _PROGRESS_LABEL.set(name)
    try:
        ranks = resolve_ranks(tuple(tensor.shape), method, rank)  # type: ignore[arg-type]
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        x = tensor.detach().to(dtype)
        if _sq_norm(x) == 0.0:
            raise ValueError(f"tensor{label} is all zeros; its decomposition is undefined")
        if input_weight is not None:
            return _activation_aware(x, method, ranks, input_weight, n_iter_max=n_iter_max, tol=float(tol),
                                     show_progress=show_progress, hidden_mode=hidden_mode)
        options = {}
        if method in NEEDS_HIDDEN_MODE:
            if hidden_mode not in ("in", "out"):
                raise ValueError(f"decomposition {method!r} needs hidden_mode='in' (gate/up) or 'out' (down), "
                                 f"got {hidden_mode!r}")
            options["hidden_mode"] = hidden_mode
        return DECOMPOSITIONS[method](x, ranks, n_iter_max=n_iter_max, tol=float(tol), show_progress=show_progress,
                                      **options)
    finally:
        _PROGRESS_LABEL.reset(token)


def decompose_streaming(
    layer_fn: Callable[[int], torch.Tensor],
    num_layers: int,
    shape: tuple[int, int],
    method: str = "tucker",
    rank: int | tuple[int, int, int] | None = None,
    *,
    n_iter_max: int = 25,
    tol: float = 1e-6,
    init: str = "auto",
    solver: str = "auto",
    power_iters: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    name: str = "",
) -> Decomposition:
    """Decompose X (L, d_out, d_in) given one layer at a time, never materialising X.

    ``layer_fn(l)`` returns layer ``l`` (d_out, d_in) (read from disk, fused on the fly, generated...);
    it is called a few times per layer (``1 + 2 * sweeps`` for tucker), so it should be cheap or
    read a spill file. Peak memory for tucker is one layer plus ``X U_in`` (L, d_out, r_in) and
    ``U_out^T X`` (L, r_out, d_in) plus the factors. Same :class:`Decomposition` as :func:`decompose`,
    which runs the same HOOI code in memory.

    Args:
        init: ``"hosvd"`` (exact truncated HOSVD from the out/in Gram matrices; one read of X at
            ``L d_out d_in (d_out + d_in)`` flops, what :func:`decompose` uses), ``"random"`` (a seeded
            Gaussian sketch of the in-mode range, ``L d_out d_in r_in`` flops), or ``"auto"``:
            hosvd when both matrix dimensions are at most 4096.
        solver: factor updates by exact Gram + eigh (``"eigh"``), by a warm-started block subspace
            iteration with Rayleigh-Ritz (``"subspace"``, ``power_iters`` products per sweep), or
            ``"auto"`` (eigh for modes up to ``EIGH_LIMIT``).
        dtype, device: compute dtype (float32 or float64) and device (e.g. "cuda") of the layers.

    Notes:
        ``relative_error`` is ``sqrt(1 - ||G||^2 / ||X||^2)``, exact for orthonormal factors and the
        projected core (accurate to ~1e-3 absolute in float32). ``spectral_energy`` is exact for the
        out and in modes with ``init="hosvd"``; otherwise (and for the layer mode) it is computed
        within the subspaces found (a lower bound of the true cumulative energy, truncated to
        the computed ranks).
        Methods other than tucker stack the layers in memory and call :func:`decompose`.
    """
    _check_method(method)
    num_layers = _as_int_rank(num_layers, "num_layers")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (d_out, d_in) of one layer, got {tuple(shape)}")
    d_out, d_in = (_as_int_rank(s, "shape entry") for s in shape)
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"shape must be positive, got {(d_out, d_in)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if init not in ("auto", "hosvd", "random"):
        raise ValueError(f"init must be 'auto', 'hosvd' or 'random', got {init!r}")
    if solver not in ("auto", "eigh", "subspace"):
        raise ValueError(f"solver must be 'auto', 'eigh' or 'subspace', got {solver!r}")
    n_iter_max = _as_int_rank(n_iter_max, "n_iter_max")
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max must be >= 0, got {n_iter_max}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if method in NEEDS_HIDDEN_MODE:
        raise ValueError(f"decomposition {method!r} does not stream yet; extract from a loaded model instead")
    if method != "tucker":
        read = _Layers(layer_fn, num_layers, (d_out, d_in), dtype, device, None)
        stacked = torch.stack([read(layer) for layer in range(num_layers)])
        return decompose(stacked, method, rank, n_iter_max=n_iter_max, tol=tol, show_progress=show_progress, name=name)
    token = _PROGRESS_LABEL.set(name)
    try:
        ranks = resolve_ranks((num_layers, d_out, d_in), method, rank)
        if init == "auto":
            init = "hosvd" if max(d_out, d_in) <= 4096 else "random"
        core, u_l, u_out, u_in, energies, error = _streaming_hooi(
            layer_fn, num_layers, (d_out, d_in), ranks, n_iter_max=n_iter_max, tol=float(tol), init=init,
            solver=solver, power_iters=power_iters, dtype=dtype, device=device, show_progress=show_progress,
        )
        return _finalise("tucker", None, core, u_l, u_out, u_in, energies, relative_error=error)
    finally:
        _PROGRESS_LABEL.reset(token)


# --------------------------------------------------------------------------------------------
# Linear-algebra helpers
# --------------------------------------------------------------------------------------------


def _sq_norm(x: torch.Tensor) -> float:
    # Accumulate in float64: float32 sums of ~1e9 squares lose digits.
    return float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding (dim_mode, prod(other dims)) of a 3D tensor.

    The column order differs from Kolda's convention for mode 2, which changes nothing we use
    (singular values, left singular vectors).  Modes 0 and 2 are free views; mode 1 copies.
    """
    n = x.shape[mode]
    if mode == 0:
        return x.reshape(n, -1)
    if mode == 2:
        return x.reshape(-1, n).T
    return x.transpose(0, 1).reshape(n, -1)


def _mode_gram(x: torch.Tensor, mode: int) -> tuple[torch.Tensor, bool]:
    """Gram matrix of the mode-``mode`` unfolding M on its smaller side.

    Returns ``(M @ M.T, True)`` when dim_mode <= prod(other dims) else ``(M.T @ M, False)``.
    Why: eigh of a small Gram matrix replaces an SVD of a very wide unfolding (e.g. 2048 x 48*8192).
    """
    n = x.shape[mode]
    p = x.numel() // n
    if n <= p:
        if mode == 1:
            # sum_l X[l] X[l]^T, avoiding the copy that a mode-1 unfolding would need.
            gram = x.new_zeros(n, n)
            for sl in x:
                gram.addmm_(sl, sl.T)
            return gram, True
        m = _unfold(x, mode)
        return m @ m.T, True
    m = _unfold(x, mode)
    return m.T @ m, False


def _sorted_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition with eigenvalues descending and clamped at 0 (Gram matrices are PSD)."""
    evals, evecs = torch.linalg.eigh(gram)
    return evals.flip(0).clamp_min(0), evecs.flip(1)


def _leading_left_singular_vectors(x: torch.Tensor, mode: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors (dim_mode, rank) of the mode unfolding, orthonormal columns.

    Also returns all squared singular values of the unfolding, descending (length min(n, p)).
    If ``rank`` exceeds the unfolding's rank bound ``p``, the basis is completed deterministically.
    """
    gram, row_side = _mode_gram(x, mode)
    evals, evecs = _sorted_eigh(gram)
    if row_side:
        return evecs[:, :rank], evals
    # Columns side: U = M V / s.  QR instead of dividing by s keeps U orthonormal even when some
    # singular values are (numerically) zero.
    k = min(rank, evecs.shape[1])
    basis = torch.linalg.qr(_unfold(x, mode) @ evecs[:, :k]).Q
    if rank > k:
        basis = _complete_basis(basis, rank)
    return basis, evals


def _complete_basis(q: torch.Tensor, rank: int) -> torch.Tensor:
    """Extend orthonormal columns ``q`` (n, k) to ``rank`` orthonormal columns (fixed seed)."""
    n, k = q.shape
    gen = torch.Generator().manual_seed(0)
    extra = torch.randn(n, rank - k, generator=gen, dtype=q.dtype).to(q.device)
    for _ in range(2):  # twice: classical Gram-Schmidt needs a second pass for stability
        extra = extra - q @ (q.T @ extra)
    return torch.cat([q, torch.linalg.qr(extra).Q], dim=1)


def _cumulative_energy(sq_singular_values: torch.Tensor) -> torch.Tensor:
    total = sq_singular_values.sum()
    return (torch.cumsum(sq_singular_values.double(), 0) / total.double()).clamp_max(1.0).float()


def _spectral_energies(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cumulative spectral energy of each mode unfolding of X (via the small-side Gram matrix)."""
    return {m: _cumulative_energy(_sorted_eigh(_mode_gram(x, i)[0])[0]) for i, m in enumerate(MODES)}


def _sign_normalise(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip columns so that each column's largest-|entry| is positive; returns (u, signs)."""
    idx = u.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(u, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, signs.squeeze(-2)


def _relative_error(x: torch.Tensor, dec: Decomposition) -> float:
    """||X - X_hat||_F / ||X||_F, one layer at a time so X_hat is never materialised whole."""
    err = 0.0
    for layer in range(x.shape[0]):
        err += _sq_norm(x[layer] - dec.reconstruct_layer(layer))
    return math.sqrt(err / _sq_norm(x))


def _finalise(
    method: str,
    x: torch.Tensor | None,
    core: torch.Tensor,
    layer_factor: torch.Tensor,
    out_factor: torch.Tensor,
    in_factor: torch.Tensor,
    spectral_energy: dict[str, torch.Tensor],
    relative_error: float | None = None,
) -> Decomposition:
    """Measure the error in the compute dtype (exactly when ``x`` is given), then return float32 factors."""
    dec = Decomposition(
        method=method,
        core=core,
        layer_factor=layer_factor,
        out_factor=out_factor,
        in_factor=in_factor,
        spectral_energy=spectral_energy,
        relative_error=0.0,
        ranks=(0, 0, 0),  # recomputed from core in __post_init__
    )
    dec.relative_error = _relative_error(x, dec) if x is not None else float(relative_error)
    for attr in ("core", "layer_factor", "out_factor", "in_factor"):
        setattr(dec, attr, getattr(dec, attr).float().contiguous())
    dec.spectral_energy = {m: e.float() for m, e in spectral_energy.items()}
    return dec


def _progress(iterable: Iterable[_T], total: int, show: bool, method: str) -> Iterator[_T]:
    from tqdm.auto import tqdm

    label = _PROGRESS_LABEL.get()
    desc = f"{method} {label}".strip()
    return tqdm(iterable, total=total, disable=not show, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@register_decomposition("tucker")
def tucker_hooi(
    tensor: torch.Tensor, ranks: tuple[int, int, int], *, n_iter_max: int, tol: float, show_progress: bool
) -> Decomposition:
    """Tucker decomposition by HOOI with truncated-HOSVD initialisation (pure torch).

    HOSVD: ``U_n`` = top-r_n left singular vectors of the mode-n unfolding of X.  One HOOI sweep
    updates, for n = layer, out, in in turn, ``U_n`` = top-r_n left singular vectors of the mode-n
    unfolding of ``X x_{m != n} U_m^T`` (latest factors), then ``G = X x_1 U_L^T x_2 U_out^T x_3 U_in^T``.
    Since ``||X - X_hat||^2 = ||X||^2 - ||G||^2`` for orthonormal factors, ``||G||`` never decreases;
    iteration stops after ``n_iter_max`` sweeps or when ``| ||G|| - ||G_prev|| | / ||G_prev|| < tol``.

    This is the in-memory entry of the same layer-streaming HOOI as :func:`decompose_streaming`
    (it reads ``X`` one layer at a time); being in memory adds the exact layer-mode Gram (for the
    HOSVD layer factor and spectral energy) and the exact reconstruction error.
    """
    x = tensor
    flat = x.reshape(x.shape[0], -1)
    layer_gram = flat @ flat.T  # (L, L): exact layer-mode Gram, cheap when X is in memory
    result = _streaming_hooi(
        x.__getitem__, x.shape[0], (x.shape[1], x.shape[2]), ranks, n_iter_max=n_iter_max, tol=tol,
        init="hosvd", solver="auto", power_iters=1, dtype=x.dtype, device=x.device,
        show_progress=show_progress, layer_gram=layer_gram,
    )
    return _finalise("tucker", x, *result)


# --------------------------------------------------------------------------------------------
# Layer-streaming HOOI (shared by decompose and decompose_streaming)
# --------------------------------------------------------------------------------------------

#: Mode dimension up to which a factor update uses the exact Gram + eigh; larger modes use a
#: warm-started block subspace iteration (Rayleigh-Ritz), which costs O(dim * rank) per product
#: instead of O(dim^2) memory and O(dim^3) eigh.
EIGH_LIMIT = 2048
#: Extra columns carried by the subspace iteration (faster convergence past near-equal singular values).
OVERSAMPLE = 32

LayerFn = Callable[[int], torch.Tensor]


class _Layers:
    """Reads layer ``l`` of X through ``layer_fn``: checks shape and finiteness, casts, counts reads."""

    def __init__(self, layer_fn: LayerFn, num_layers: int, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str | None, bar) -> None:
        self.layer_fn, self.num_layers, self.shape = layer_fn, num_layers, tuple(shape)
        self.dtype, self.device, self.bar = dtype, device, bar
        self.checked: set[int] = set()

    def __call__(self, layer: int) -> torch.Tensor:
        x = self.layer_fn(layer)
        if layer not in self.checked:
            label = _PROGRESS_LABEL.get()
            where = f" of {label!r}" if label else ""
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"layer_fn({layer}){where} returned {type(x).__name__}, expected a torch.Tensor")
            if tuple(x.shape) != self.shape:
                raise ValueError(f"layer_fn({layer}){where} returned shape {tuple(x.shape)}, expected {self.shape}")
            if not x.is_floating_point():
                raise TypeError(f"layer_fn({layer}){where} returned dtype {x.dtype}, expected floating point")
            if not torch.isfinite(x).all():
                raise ValueError(f"layer {layer}{where} contains NaN or infinite values")
            self.checked.add(layer)
        x = x.detach().to(device=self.device, dtype=self.dtype)
        if self.bar is not None:
            self.bar.update(1)
        return x


def _left_singular(m: torch.Tensor, mode: int, rank: int, warm: torch.Tensor | None, solver: str,
                   power_iters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors of the mode-``mode`` (1 or 2) unfolding of ``m`` (A, B, C),
    and the squared singular values found (all of them for eigh, the top ``rank`` for subspace)."""
    n = m.shape[mode]
    if solver == "eigh" or (solver == "auto" and n <= EIGH_LIMIT) or rank >= n:
        return _leading_left_singular_vectors(m, mode, rank)
    # Operators of M = unfold(m, mode) without forming it: M^T q and M y, one slice of m at a time.
    if mode == 1:
        def mt(q):  # (A, C, k)
            return torch.matmul(m.transpose(1, 2), q)

        def mv(y):
            out = m.new_zeros(n, y.shape[-1])
            for a in range(m.shape[0]):
                out.addmm_(m[a], y[a])
            return out
    else:
        def mt(q):  # (A, B, k)
            return torch.matmul(m, q)

        def mv(y):
            out = m.new_zeros(n, y.shape[-1])
            for a in range(m.shape[0]):
                out.addmm_(m[a].T, y[a])
            return out
    k = min(n, rank + OVERSAMPLE)
    gen = torch.Generator().manual_seed(seed)
    fresh = torch.randn(n, k if warm is None else k - warm.shape[1], generator=gen, dtype=m.dtype).to(m.device)
    q = fresh if warm is None else torch.cat([warm, fresh], dim=1)
    q = torch.linalg.qr(q).Q
    for _ in range(power_iters + (2 if warm is None else 0)):
        q = torch.linalg.qr(mv(mt(q))).Q
    # Rayleigh-Ritz: the best rank-k basis within span(q), ordered by captured energy.
    b = mt(q)  # (A, *, k): q^T M in blocks
    small = torch.einsum("abk,abj->kj", b, b)  # q^T M M^T q, (k, k)
    evals, evecs = _sorted_eigh(small)
    return q @ evecs[:, :rank], evals[:rank]


def _streaming_hooi(
    read_fn: LayerFn,
    num_layers: int,
    shape: tuple[int, int],
    ranks: tuple[int, int, int],
    *,
    n_iter_max: int,
    tol: float,
    init: str,
    solver: str,
    power_iters: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    show_progress: bool,
    layer_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float]:
    """HOOI that only ever holds one layer of X plus the projected tensors X U_in (L, d_out, r_in) and
    U_out^T X (L, r_out, d_in).  Each sweep reads every layer twice (once per projection).

    ``init="hosvd"``: exact truncated HOSVD, from the out/in Gram matrices summed over layers (one
    read of X; costs ``L d_out d_in (d_out + d_in)`` flops) and ``layer_gram`` if given (otherwise
    the layer factor comes from the first projected tensor).  ``init="random"``: a seeded Gaussian
    sketch of the in-mode range (one read, ``2 L d_out d_in r_in`` flops); the out factor is found
    in the first sweep.  Returns (core, U_L, U_out, U_in, spectral_energy, approximate_error).
    """
    n_layers, (d_out, d_in) = num_layers, shape
    r_l, r_out, r_in = ranks
    passes = 1 + 2 * n_iter_max if n_iter_max else 2
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=passes * n_layers, desc=f"tucker {_PROGRESS_LABEL.get()}".strip(), unit="layer", leave=False)
    read = _Layers(read_fn, n_layers, shape, dtype, device, bar)
    exact_energy = init == "hosvd"
    energies: dict[str, torch.Tensor] = {}
    x_sq = 0.0
    u_l = u_out = None
    if init == "hosvd":
        g_out = torch.zeros(d_out, d_out, dtype=dtype, device=device)
        g_in = torch.zeros(d_in, d_in, dtype=dtype, device=device)
        for layer in range(n_layers):
            x = read(layer)
            x_sq += _sq_norm(x)
            g_out.addmm_(x, x.T)
            g_in.addmm_(x.T, x)
        for name, gram, rank, other in (("out", g_out, r_out, n_layers * d_in), ("in", g_in, r_in, n_layers * d_out)):
            evals, evecs = _sorted_eigh(gram)
            energies[name] = _cumulative_energy(evals[: min(gram.shape[0], other)])
            basis = evecs[:, :rank]
            if name == "out":
                u_out = basis
            else:
                u_in = basis
        del g_out, g_in
        if layer_gram is not None:
            evals, evecs = _sorted_eigh(layer_gram.to(dtype))
            energies["layer"] = _cumulative_energy(evals[: min(n_layers, d_out * d_in)])
            u_l = evecs[:, :r_l]
    elif init == "random":
        gen = torch.Generator().manual_seed(0)
        k = min(d_in, r_in + OVERSAMPLE)
        sketch = torch.zeros(d_in, k, dtype=dtype, device=device)
        for layer in range(n_layers):
            x = read(layer)
            x_sq += _sq_norm(x)
            sketch.addmm_(x.T, torch.randn(d_out, k, generator=gen, dtype=dtype).to(device))
        u_in = torch.linalg.qr(sketch).Q[:, :r_in]
        del sketch
    else:
        raise ValueError(f"init must be 'hosvd' or 'random', got {init!r}")
    if x_sq == 0.0:
        raise ValueError(f"tensor{' ' + repr(_PROGRESS_LABEL.get()) if _PROGRESS_LABEL.get() else ''} is all zeros; "
                         "its decomposition is undefined")

    def project_in(u):  # (L, d_out, r_in) = X_l @ U_in for every layer
        z = torch.empty(n_layers, d_out, u.shape[1], dtype=dtype, device=device)
        for layer in range(n_layers):
            torch.matmul(read(layer), u, out=z[layer])
        return z

    def project_out(u):  # (L, r_out, d_in) = U_out^T @ X_l for every layer
        w = torch.empty(n_layers, u.shape[1], d_in, dtype=dtype, device=device)
        for layer in range(n_layers):
            torch.matmul(u.T, read(layer), out=w[layer])
        return w

    def layer_update(t):  # U_L from the (L, r_out, r_in) projection; exact (L x L Gram)
        flat = t.reshape(n_layers, -1)
        evals, evecs = _sorted_eigh(flat @ flat.T)
        return evecs[:, :r_l], evals

    def compress_layers(u, t):  # t x_1 U_L^T; skipped when U_L is square (a rotation changes no subspace)
        return t if u is None or r_l == n_layers else torch.tensordot(u, t, dims=([0], [0]))

    core_norm = None
    core = None
    out_evals = in_evals = layer_evals = None
    for _ in range(n_iter_max):
        z = project_in(u_in)  # (L, d_out, r_in)
        if u_out is not None:
            u_l, layer_evals = layer_update(torch.matmul(u_out.T, z))
        u_out, out_evals = _left_singular(compress_layers(u_l, z), 1, r_out, u_out, solver, power_iters)
        del z
        w = project_out(u_out)  # (L, r_out, d_in)
        if u_l is None:  # random init: the first layer factor, from the projection through U_out and U_in
            u_l, layer_evals = layer_update(torch.matmul(w, u_in))
        y = compress_layers(u_l, w)
        del w
        u_in, in_evals = _left_singular(y, 2, r_in, u_in, solver, power_iters)
        core = torch.matmul(y, u_in)  # (r_L or L, r_out, r_in)
        if r_l == n_layers and u_l is not None:
            core = torch.tensordot(u_l, core, dims=([0], [0]))
        new_norm = float(torch.linalg.vector_norm(core, dtype=torch.float64))
        change = abs(new_norm - core_norm) / max(core_norm, 1e-300) if core_norm is not None else float("inf")
        core_norm = new_norm
        if bar is not None:
            bar.set_postfix(rel_err=f"{math.sqrt(max(0.0, 1.0 - new_norm ** 2 / x_sq)):.4g}", change=f"{change:.1e}")
        if change < tol:
            break
    if core is None:  # n_iter_max == 0: the core of the initial factors
        t = torch.matmul(project_out(u_out), u_in)  # (L, r_out, r_in)
        if u_l is None:
            u_l, layer_evals = layer_update(t)
        core = torch.tensordot(u_l, t, dims=([0], [0]))
    if bar is not None:
        bar.close()

    if not exact_energy or "layer" not in energies:
        # Lower bounds from the projected tensors (exact energies would cost a full Gram of X).
        found = {"layer": layer_evals, "out": out_evals, "in": in_evals}
        for name, evals in found.items():
            if name not in energies or not exact_energy:
                if evals is None:
                    evals = torch.zeros(1, dtype=torch.float64)
                energies[name] = (torch.cumsum(evals.double(), 0) / x_sq).clamp(0.0, 1.0).float()
    approx_error = math.sqrt(max(0.0, 1.0 - _sq_norm(core) / x_sq))
    u_l, s_l = _sign_normalise(u_l)
    u_out, s_out = _sign_normalise(u_out)
    u_in, s_in = _sign_normalise(u_in)
    core = core * s_l[:, None, None] * s_out[None, :, None] * s_in[None, None, :]
    return core, u_l, u_out, u_in, energies, approx_error


@register_decomposition("cp")
def cp_parafac(
    tensor: torch.Tensor, ranks: tuple[int, int, int], *, n_iter_max: int, tol: float, show_progress: bool
) -> Decomposition:
    """CP/PARAFAC by ALS (tensorly, pytorch backend), written in Tucker form with a superdiagonal core.

    ``X[l] ~= sum_r lambda_r U_L[l, r] outer(U_out[:, r], U_in[:, r])`` with R = ``ranks[1]``,
    unit-norm factor columns, ``lambda >= 0`` sorted descending; ``core[r, r, r] = lambda_r``.
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    x = tensor
    rank = ranks[1]
    bar = _progress(range(n_iter_max + 1), n_iter_max + 1, show_progress, "cp")
    callback = None
    cp_tol = tol
    if show_progress:
        # tensorly 0.10 only computes the error the callback receives when tol > 0 (else it raises
        # UnboundLocalError); the smallest positive float stops only on an exactly zero change.
        cp_tol = tol or 5e-324

        def callback(_cp: object, rec_error: float) -> None:
            bar.update(1)  # type: ignore[attr-defined]
            bar.set_postfix(rel_err=f"{float(rec_error):.4g}")  # type: ignore[attr-defined]

    # local_threadsafe: do not switch the backend of other threads; the context restores ours.
    with tl.backend_context("pytorch", local_threadsafe=True), warnings.catch_warnings():
        # R > L is legitimate for CP; tensorly's svd init then pads U_L with seeded random columns
        # and warns about it on every call.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs=")
        weights, (f_l, f_out, f_in) = parafac(
            x, rank=rank, n_iter_max=n_iter_max, init="svd", tol=cp_tol, random_state=0, callback=callback
        )
    if show_progress:
        bar.close()  # type: ignore[attr-defined]

    # Move all scale into lambda, all column signs but one into lambda too, then sort.
    lam = weights.to(x.dtype) if torch.is_tensor(weights) else x.new_ones(rank)
    normed = []
    for f in (f_l, f_out, f_in):
        norms = torch.linalg.vector_norm(f, dim=0)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        lam = lam * norms
        normed.append(f / safe)
    f_l, f_out, f_in = normed
    f_out, s_out = _sign_normalise(f_out)
    f_in, s_in = _sign_normalise(f_in)
    lam = lam * s_out * s_in
    f_l = f_l * torch.where(lam < 0, -1.0, 1.0).to(x.dtype)  # keep lambda >= 0; U_L carries the sign
    lam = lam.abs()
    order = torch.argsort(lam, descending=True, stable=True)
    lam, f_l, f_out, f_in = lam[order], f_l[:, order], f_out[:, order], f_in[:, order]

    core = x.new_zeros(rank, rank, rank)
    idx = torch.arange(rank, device=x.device)
    core[idx, idx, idx] = lam
    return _finalise("cp", x, core, f_l, f_out, f_in, _spectral_energies(x))


@register_decomposition("svd")
def per_layer_svd(
    tensor: torch.Tensor, ranks: tuple[int, int, int], *, n_iter_max: int, tol: float, show_progress: bool
) -> Decomposition:
    """Independent truncated SVD of each layer, ``X[l] ~= U_l diag(s_l) V_l^T`` at rank r = ``ranks[1]``.

    No sharing: out_factor (L, d_out, r), in_factor (L, d_in, r), core[l] = diag(s_l),
    layer_factor = I_L.  ``n_iter_max`` and ``tol`` are unused (the SVD is exact).
    """
    del n_iter_max, tol
    x = tensor
    n_layers, d_out, d_in = x.shape
    r = ranks[1]
    u_all = x.new_empty(n_layers, d_out, r)
    v_all = x.new_empty(n_layers, d_in, r)
    core = x.new_zeros(n_layers, r, r)
    idx = torch.arange(r, device=x.device)
    # One layer at a time: a batched SVD would hold every layer's full U and V at once.
    for layer in _progress(range(n_layers), n_layers, show_progress, "svd"):
        u, s, vh = torch.linalg.svd(x[layer], full_matrices=False)
        u, signs = _sign_normalise(u[:, :r])
        u_all[layer] = u
        v_all[layer] = vh[:r].T * signs  # flip u and v together: u s v^T is unchanged
        core[layer, idx, idx] = s[:r]
    layer_factor = torch.eye(n_layers, dtype=x.dtype, device=x.device)
    return _finalise("svd", x, core, layer_factor, u_all, v_all, _spectral_energies(x))


@register_decomposition("tucker_hidden", needs_hidden_mode=True)
def tucker_hidden(
    tensor: torch.Tensor, ranks: tuple[int, int, int], *, n_iter_max: int, tol: float, show_progress: bool,
    hidden_mode: str,
) -> Decomposition:
    """Bases shared along the hidden axis only, a factor per layer along the neuron axis (module docstring).

    Alternating updates of the shared ``U_h`` and the per-layer SVDs; stops after ``n_iter_max``
    sweeps or when the relative change of the fitted energy ``sum_l ||G_l||^2`` drops below ``tol``.
    """
    x = tensor if hidden_mode == "in" else tensor.transpose(1, 2)  # hidden axis last
    n_layers, d_neuron, d_hidden = x.shape
    r_layer, r_out, r_in = ranks
    r_neuron, r_hidden = (r_out, r_in) if hidden_mode == "in" else (r_in, r_out)
    if r_layer != n_layers:
        raise ValueError(f"tucker_hidden keeps every layer (r_L = L = {n_layers}), got r_L = {r_layer}")
    # X_l U_h has rank <= r_hidden: neuron-axis columns past it complete the basis and carry zero core rows
    full = r_neuron > min(d_neuron, r_hidden)
    gram = torch.einsum("lnh,lnk->hk", x, x)  # sum_l X_l^T X_l
    neuron_factors = x.new_empty(n_layers, d_neuron, r_neuron)
    cores = x.new_empty(n_layers, r_neuron, r_hidden)
    previous = None
    for _ in _progress(range(max(1, n_iter_max)), max(1, n_iter_max), show_progress, "tucker_hidden"):
        u_hidden = _sorted_eigh(gram)[1][:, :r_hidden]
        projected = x @ u_hidden  # (L, d_neuron, r_hidden)
        fitted = 0.0
        for layer in range(n_layers):
            u, s, vh = torch.linalg.svd(projected[layer], full_matrices=full)
            kept = min(r_neuron, s.shape[0])
            neuron_factors[layer] = u[:, :r_neuron]
            cores[layer] = 0
            cores[layer, :kept] = s[:kept, None] * vh[:kept]
            fitted += float((s[:kept].double() ** 2).sum())
        if previous is not None and abs(fitted - previous) <= tol * max(previous, 1e-300):
            break
        previous = fitted
        # optimal shared basis for the current per-layer factors: top eigenvectors of sum_l X_l^T A_l A_l^T X_l
        reduced = neuron_factors.transpose(1, 2) @ x  # (L, r_neuron, d_hidden)
        gram = torch.einsum("lrh,lrk->hk", reduced, reduced)
    u_hidden, signs = _sign_normalise(u_hidden)
    cores = cores * signs  # keep A_l G_l U_h^T unchanged
    neuron_factors, neuron_signs = _sign_normalise(neuron_factors)
    cores = cores * neuron_signs.unsqueeze(-1)
    layer_factor = torch.eye(n_layers, dtype=x.dtype, device=x.device)
    if hidden_mode == "in":
        return _finalise("tucker_hidden", tensor, cores, layer_factor, neuron_factors, u_hidden,
                         _spectral_energies(tensor))
    return _finalise("tucker_hidden", tensor, cores.transpose(1, 2), layer_factor, u_hidden, neuron_factors,
                     _spectral_energies(tensor))


# --------------------------------------------------------------------------------------------
# Activation-aware bases
# --------------------------------------------------------------------------------------------


def input_weight_from_moment(moment: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The symmetric square root ``S`` of a second-moment matrix ``E[x x^T]`` (``(d, d)`` or
    ``(L, d, d)``), with eigenvalues floored at ``eps`` times their mean so that ``S`` is invertible."""
    evals, evecs = torch.linalg.eigh(moment.double())
    floor = eps * evals.mean(-1, keepdim=True).clamp_min(1e-30)
    return (evecs * evals.clamp_min(floor).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)


def input_axis_is_per_layer(method: str, hidden_mode: str | None) -> bool:
    """Whether ``method`` gives each layer its own input factor (so a per-layer ``input_weight`` fits)."""
    per_layer = {"svd": lambda mode: True, "tucker_hidden": lambda mode: mode == "out"}
    return per_layer.get(method, lambda mode: False)(hidden_mode)


def _activation_aware(x: torch.Tensor, method: str, ranks, input_weight: torch.Tensor, *, n_iter_max: int,
                      tol: float, show_progress: bool, hidden_mode: str | None) -> Decomposition:
    n_layers, _, d_in = x.shape
    weight = input_weight.to(device=x.device, dtype=torch.float64)
    if weight.shape not in ((d_in, d_in), (n_layers, d_in, d_in)):
        raise ValueError(f"input_weight must be ({d_in}, {d_in}) or ({n_layers}, {d_in}, {d_in}), got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("input_weight holds NaN or Inf")
    if weight.ndim == 3 and not input_axis_is_per_layer(method, hidden_mode):
        raise ValueError(f"{method!r} shares one input factor across layers; give one (d_in, d_in) input_weight")
    inverse = torch.linalg.inv(weight)
    weighted = (x.double() @ weight).to(x.dtype)
    dec = decompose(weighted, method, ranks, n_iter_max=n_iter_max, tol=tol, show_progress=show_progress,
                    hidden_mode=hidden_mode)
    in_factor = inverse.to(dec.in_factor.dtype) @ dec.in_factor  # S^{-1} U_in, per layer by broadcasting
    dec.in_factor = in_factor.float().contiguous()
    dec.relative_error = _relative_error(x, dec)
    return dec
