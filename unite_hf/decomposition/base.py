"""The common result of every decomposition (:class:`Decomposition`, in Tucker form) and the linear
algebra the methods share: unfoldings, Gram-side eigendecompositions, sign normalisation, errors."""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

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
