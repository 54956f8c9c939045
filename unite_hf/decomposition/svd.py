"""``"svd"``: the per-layer truncated SVD baseline (no sharing across layers)."""

from __future__ import annotations

import torch

from .base import Decomposition, _finalise, _progress, _sign_normalise, _spectral_energies
from .registry import register_decomposition


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
