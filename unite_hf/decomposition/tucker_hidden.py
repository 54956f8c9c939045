"""``"tucker_hidden"``: bases shared across layers only along the hidden (residual-stream) axis, a
factor per layer along the neuron axis (beyond the paper; module docstring of :mod:`unite_hf.decomposition`)."""

from __future__ import annotations

import torch

from .base import Decomposition, _finalise, _progress, _sign_normalise, _sorted_eigh, _spectral_energies
from .registry import register_decomposition


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
