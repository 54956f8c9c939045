"""``"cp"``: the CANDECOMP/PARAFAC baseline (tensorly ALS), written in Tucker form."""

from __future__ import annotations

import warnings

import torch

from .base import Decomposition, _finalise, _progress, _sign_normalise, _spectral_energies
from .registry import register_decomposition


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
