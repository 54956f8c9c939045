"""``"tucker"``: the UNITE method, HOOI with truncated-HOSVD initialisation (module docstring of
:mod:`unite_hf.decomposition`)."""

from __future__ import annotations

import torch

from .base import Decomposition, _finalise
from .registry import register_decomposition
from .streaming import _streaming_hooi


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
