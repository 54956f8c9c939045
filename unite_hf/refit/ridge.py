"""``refit="ridge"``: the closed-form least-squares core of ``down`` given the rebuilt gate and up.

With ``z = U_in^T h(x)`` (down's input in its input basis), ``A = U_out`` and ``t`` the routed output
minus down's fused bias, the core solves

    C = argmin_C  sum_tokens ||t - A C z||^2 + lambda ||C||_F^2,

whose normal equations ``A^T A C G + lambda C = A^T S`` (``G = Z^T Z``, ``S = T^T Z``) are solved exactly
in the eigenbases of ``A^T A`` and ``G``. Only ``G`` (``r_in x r_in``) and ``S`` (``hidden x r_in``) are
accumulated, in float64, so the memory of a layer's statistics does not depend on the calibration size
or the fused width.
"""

from __future__ import annotations

import torch

from .base import LayerFFN, Refit, RefitOptions, register_refit, relative_error


class RidgeStatistics:
    """Streamed ``G = Z^T Z``, ``S = T^T Z`` and ``||T||^2`` of one layer's down projection."""

    def __init__(self, layer: LayerFFN) -> None:
        self.layer = layer
        r_in = layer.in_basis["down"].shape[1]
        hidden = layer.out_basis["down"].shape[0]
        device = layer.in_basis["down"].device
        self.gram = torch.zeros(r_in, r_in, dtype=torch.float64, device=device)
        self.cross = torch.zeros(hidden, r_in, dtype=torch.float64, device=device)
        self.target_sq = 0.0
        self.tokens = 0

    def update(self, x: torch.Tensor, target: torch.Tensor) -> None:
        z = self.layer.coordinates("down", self.layer.hidden(x)).double()
        bias = self.layer.bias["down"]
        t = (target if bias is None else target - bias).double()
        self.gram += z.T @ z
        self.cross += t.T @ z
        self.target_sq += float((t * t).sum())
        self.tokens += len(x)

    def residual(self, core: torch.Tensor) -> float:
        """``sum ||t - A C z||^2`` from the statistics alone."""
        a = self.layer.out_basis["down"].double()
        c = core.double()
        fitted = a @ c  # (hidden, r_in)
        return self.target_sq - 2 * float((fitted * self.cross).sum()) + float(((fitted @ self.gram) * fitted).sum())

    def solve(self, ridge: float) -> torch.Tensor:
        """The ridge core (float64) for ``lambda = ridge * mean eig(A^T A) * mean eig(G)``."""
        if self.tokens == 0:
            raise ValueError("the refit saw no calibration tokens")
        a = self.layer.out_basis["down"].double()
        alpha, p = torch.linalg.eigh(a.T @ a)
        gamma, q = torch.linalg.eigh(self.gram)
        lam = ridge * float(alpha.clamp_min(0).mean()) * float(gamma.clamp_min(0).mean())
        rhs = p.T @ (a.T @ self.cross) @ q
        denominator = alpha.clamp_min(0)[:, None] * gamma.clamp_min(0)[None, :] + lam
        if lam <= 0:  # plain least squares: directions no token reached stay at zero
            denominator = torch.where(denominator > 0, denominator, torch.inf)
        return p @ (rhs / denominator) @ q.T


@register_refit("ridge")
class RidgeRefit(Refit):
    """Closed-form ``down`` core (see the module docstring)."""

    def __init__(self, layer: LayerFFN, options: RefitOptions) -> None:
        super().__init__(layer, options)
        self.statistics = RidgeStatistics(layer)

    @classmethod
    def statistics_bytes(cls, layer: LayerFFN, options: RefitOptions) -> int:
        r_in, hidden = layer.in_basis["down"].shape[1], layer.out_basis["down"].shape[0]
        return 8 * (r_in * r_in + hidden * r_in)

    def update(self, x: torch.Tensor, target: torch.Tensor) -> None:
        self.statistics.update(x, target)

    def solve(self) -> tuple[float, float]:
        stats = self.statistics
        before = relative_error(stats.residual(self.layer.cores["down"]), stats.target_sq)
        core = stats.solve(self.options.ridge)
        self.layer.cores["down"] = core.to(self.layer.cores["down"].dtype)
        return before, relative_error(stats.residual(core), stats.target_sq)
