"""Tolerances of float checks, derived from the dtype's epsilon rather than fixed (issue 22).

A float computation that sums ``k`` terms is within ``gamma_k * sum|terms|`` of the exact value, with
``gamma_k = k u / (1 - k u)`` (u = eps / 2; Higham, *Accuracy and Stability of Numerical Algorithms*,
section 3.1) whatever order the BLAS sums in, and within ``lambda sqrt(k) u * sum|terms|`` except with
probability ``2k exp(-lambda^2 / 2)`` when the rounding errors are independent (Higham & Mary, SIAM J. Sci.
Comput. 41, 2019; at lambda = 10, below 1e-17 for k = 10^4). Two such computations (another BLAS,
blocking or thread count), or one against a float64 reference, therefore differ by at most
``min(k, 10 sqrt(k)) * eps * scale``, where ``scale`` bounds ``sum|terms|``: ``|a|.|b|`` for a dot
product, ``|A| @ |B|`` elementwise (or ``||A|| ||B||``) for a product, ``||A||_2`` for what
backward-stable factorisations (SVD, QR, eigh) return, times ``1 + s_1 / (s_r - s_{r+1})`` where a rank-r
truncation amplifies that error. ``k`` is the reduction length (the longest chain of summed terms and
rounded steps along the way). A check with this tolerance fails on a wrong result, not on a BLAS or a
load; :func:`assert_close_eps` refuses a tolerance above 1% of the expected values' largest magnitude,
so that the check can still fail (a sign flip, a wrong index, a dropped term).

``from tolerances import assert_close_eps`` (``tests/`` is on ``sys.path``, as for ``tiny_models``).
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps


def eps_tolerance(dtype: torch.dtype, *, k: int, scale) -> float | torch.Tensor:
    """``min(k, 10 sqrt(k)) * eps(dtype) * scale``: how far two roundings of ``k``-term sums of magnitude
    ``scale`` (a number, or a tensor for an elementwise bound) can differ; see the module docstring."""
    return min(k, 10 * math.sqrt(k)) * torch.finfo(dtype).eps * scale


def assert_close_eps(actual: torch.Tensor, expected: torch.Tensor, *, k: int, scale=None,
                     dtype: torch.dtype = torch.float32, msg: str = "") -> None:
    """``|actual - expected| <=`` :func:`eps_tolerance` elementwise, compared in float64.

    ``scale`` defaults to the largest ``|expected|``; ``dtype`` is the precision the computation ran in
    (float32 unless said, also when a float32 result is compared as ``.double()``)."""
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    assert actual.shape == expected.shape, f"shapes {tuple(actual.shape)} != {tuple(expected.shape)} {msg}"
    largest = float(expected.abs().max()) if expected.numel() else 0.0
    tol = eps_tolerance(dtype, k=k, scale=largest if scale is None else scale)
    tol = torch.as_tensor(tol, dtype=torch.float64, device=actual.device).expand_as(actual)
    assert float(tol.max()) <= 1e-2 * largest, (
        f"tolerance {float(tol.max()):.3g} is over 1% of the expected values' largest magnitude "
        f"{largest:.3g}: a check this loose could not fail {msg}")
    diff = (actual - expected).abs()
    if not bool((diff <= tol).all()):
        worst = int((diff / tol.clamp_min(1e-300)).flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
        raise AssertionError(
            f"{int((diff > tol).sum())} of {diff.numel()} elements beyond min(k, 10 sqrt(k)) * eps * scale "
            f"(k={k}, {dtype}); worst at {index}: {float(actual.flatten()[worst])!r} vs {float(expected.flatten()[worst])!r}, difference "
            f"{float(diff.flatten()[worst]):.3g} > tolerance {float(tol.flatten()[worst]):.3g} {msg}")
