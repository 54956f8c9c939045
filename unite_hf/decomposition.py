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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

__all__ = [
    "DEFAULT_RANK",
    "DECOMPOSITIONS",
    "MODES",
    "Decomposition",
    "decompose",
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
        if self.out_factor.ndim != self.in_factor.ndim:
            raise ValueError("out_factor and in_factor must both be shared (2D) or both per layer (3D)")
        missing = set(MODES) - set(self.spectral_energy)
        if missing:
            raise ValueError(f"spectral_energy is missing modes {sorted(missing)}")

    # -- shapes -----------------------------------------------------------------------------

    @property
    def shared_bases(self) -> bool:
        """True when U_out / U_in are shared by all layers (tucker, cp); False for per-layer svd."""
        return self.out_factor.ndim == 2

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
        return self.out_factor if self.shared_bases else self.out_factor[layer]

    def layer_in_factor(self, layer: int) -> torch.Tensor:
        """The (d_in, r_in) input basis used by ``layer``."""
        layer = self._check_layer(layer)
        return self.in_factor if self.shared_bases else self.in_factor[layer]

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
    ) -> "Decomposition":
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


def register_decomposition(name: str) -> Callable[[DecompositionFn], DecompositionFn]:
    """Decorator adding ``fn(tensor, ranks, *, n_iter_max, tol, show_progress)`` to the registry."""

    def decorator(fn: DecompositionFn) -> DecompositionFn:
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
        return DECOMPOSITIONS[method](x, ranks, n_iter_max=n_iter_max, tol=float(tol), show_progress=show_progress)
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
    x: torch.Tensor,
    core: torch.Tensor,
    layer_factor: torch.Tensor,
    out_factor: torch.Tensor,
    in_factor: torch.Tensor,
    spectral_energy: dict[str, torch.Tensor],
) -> Decomposition:
    """Measure the error in the compute dtype, then return float32 factors."""
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
    dec.relative_error = _relative_error(x, dec)
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
    Singular vectors come from eigh of the unfolding's Gram matrix on its smaller side.
    """
    x = tensor
    r_l, r_out, r_in = ranks
    x_sq = _sq_norm(x)

    # Truncated HOSVD; its Gram eigenvalues are exactly the spectral energies we report.
    factors, energies = [], {}
    for mode, (m, r) in enumerate(zip(MODES, ranks)):
        u, evals = _leading_left_singular_vectors(x, mode, r)
        factors.append(u)
        energies[m] = _cumulative_energy(evals)
    u_l, u_out, u_in = factors
    core = torch.tensordot(u_l, u_out.T @ x @ u_in, dims=([0], [0]))  # (r_L, r_out, r_in)
    core_norm = float(torch.linalg.vector_norm(core, dtype=torch.float64))

    bar = _progress(range(n_iter_max), n_iter_max, show_progress, "tucker")
    for _ in bar:
        x_in = x @ u_in  # (L, d_out, r_in); shared by the layer and out updates of this sweep
        u_l, _ = _leading_left_singular_vectors(u_out.T @ x_in, 0, r_l)  # from (L, r_out, r_in)
        u_out, _ = _leading_left_singular_vectors(
            torch.tensordot(u_l, x_in, dims=([0], [0])), 1, r_out  # (r_L, d_out, r_in)
        )
        y_in = torch.tensordot(u_l, u_out.T @ x, dims=([0], [0]))  # (r_L, r_out, d_in)
        u_in, _ = _leading_left_singular_vectors(y_in, 2, r_in)
        core = y_in @ u_in  # (r_L, r_out, r_in)

        new_norm = float(torch.linalg.vector_norm(core, dtype=torch.float64))
        change = abs(new_norm - core_norm) / max(core_norm, 1e-300)
        core_norm = new_norm
        if show_progress:
            # Cheap error estimate from the orthonormal-factor identity; the final one is exact.
            approx_err = math.sqrt(max(0.0, 1.0 - new_norm**2 / x_sq))
            bar.set_postfix(rel_err=f"{approx_err:.4g}", core_change=f"{change:.2e}")  # type: ignore[attr-defined]
        if change < tol:
            break
    if show_progress:
        bar.close()  # type: ignore[attr-defined]

    # Deterministic signs; flipping a factor column flips the matching core slice.
    u_l, s_l = _sign_normalise(u_l)
    u_out, s_out = _sign_normalise(u_out)
    u_in, s_in = _sign_normalise(u_in)
    core = core * s_l[:, None, None] * s_out[None, :, None] * s_in[None, None, :]
    return _finalise("tucker", x, core, u_l, u_out, u_in, energies)


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
