"""MASA's adaptive scaling (paper §3.3): a gene matrix brought to any target size by its SVD.

With the SVD ``M = U Σ V^T``, rows of ``U`` and ``V`` are scored by the norms of ``U Σ`` and ``V Σ``
(for a square full-rank ``M`` the rows of ``U`` and ``V`` alone are orthonormal, so their plain norms
are all 1 and say nothing; the Σ-weighted norms are exactly the norms of ``M``'s rows and columns,
which is how they are computed: no SVD of a large matrix is needed). For a target size ``p <= r``
the top-``p`` rows are kept (in their original order); for ``p > r`` duplicates of the top ``p - r``
rows are appended (cycling through the ranking when ``p > 2r``). Columns likewise with ``q``. Then
``M̂ = U_p Σ V_q^T`` with Σ unchanged, which equals ``M[rows_p][:, cols_q]``.

Registered as the scaling ``"adaptive"`` of :func:`unite_hf.llama_targets.masa_init` (each of a layer's
gate, up and down matrices scaled on its own, as the paper does), the default of MASA genes; any gene
with gene matrices can use it (``scaling="adaptive"``).
"""

from __future__ import annotations

import torch

from ...llama_targets import ScaledMatrix, ranked_indices, register_scaling, scale_each

__all__ = ["adaptive_scale"]


def adaptive_scale(matrix: torch.Tensor, p: int, q: int, *, rows: torch.Tensor | None = None,
                   cols: torch.Tensor | None = None) -> ScaledMatrix:
    """MASA adaptive scaling of ``matrix`` (``r_out x r_in``) to ``p x q`` (see the module docstring).
    ``rows`` / ``cols`` impose an index choice instead of the ranking."""
    if matrix.ndim != 2:
        raise ValueError(f"adaptive scaling needs a matrix, got shape {tuple(matrix.shape)}")
    m = matrix.double()
    # ||(U Σ)_i|| = ||M_i,:|| and ||(V Σ)_j|| = ||M_:,j||: the SVD's row scores without the SVD
    rows = ranked_indices(m.norm(dim=1), p) if rows is None else rows
    cols = ranked_indices(m.norm(dim=0), q) if cols is None else cols
    return ScaledMatrix(m[rows][:, cols].to(matrix.dtype), rows, cols, torch.linalg.svdvals(m).to(matrix.dtype))


register_scaling("adaptive")(lambda matrices, shapes: scale_each(matrices, shapes, adaptive_scale))
