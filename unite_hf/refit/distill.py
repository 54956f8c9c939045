"""``refit="distill"``: the ridge core of ``down``, then Adam on every core of the layer.

The loss is the mean squared error between the rebuilt routed output and the source's, on up to
``max_tokens`` calibration tokens kept per layer (``batch_tokens`` drawn per step, seeded). The bases
stay the gene's. The cores that fit the kept tokens best (the ridge start included) are kept, so a
distill never ends worse than its ridge start on those tokens.
"""

from __future__ import annotations

import torch

from .base import LayerFFN, Refit, RefitOptions, register_refit
from .ridge import RidgeRefit, RidgeStatistics


@register_refit("distill")
class DistillRefit(Refit):
    """Ridge, then ``steps`` Adam steps on the gate, up and down cores (see the module docstring)."""

    def __init__(self, layer: LayerFFN, options: RefitOptions) -> None:
        super().__init__(layer, options)
        self.statistics = RidgeStatistics(layer)
        self.inputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.kept = 0

    @classmethod
    def statistics_bytes(cls, layer: LayerFFN, options: RefitOptions) -> int:
        hidden = layer.out_basis["down"].shape[0]
        return RidgeRefit.statistics_bytes(layer, options) + 2 * 4 * options.max_tokens * hidden

    def update(self, x: torch.Tensor, target: torch.Tensor) -> None:
        self.statistics.update(x, target)
        room = self.options.max_tokens - self.kept
        if room > 0:
            self.inputs.append(x[:room].detach().clone())
            self.targets.append(target[:room].detach().clone())
            self.kept += min(room, len(x))

    def _error(self, x: torch.Tensor, t: torch.Tensor, cores: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            return float(torch.linalg.vector_norm(self.layer(x, cores) - t) / torch.linalg.vector_norm(t).clamp_min(1e-30))

    def solve(self) -> tuple[float, float]:
        x, t = torch.cat(self.inputs), torch.cat(self.targets)
        before = self._error(x, t, self.layer.cores)
        self.layer.cores["down"] = self.statistics.solve(self.options.ridge).to(self.layer.cores["down"].dtype)
        best_cores = {p: c.clone() for p, c in self.layer.cores.items()}
        best = self._error(x, t, best_cores)
        params = {p: torch.nn.Parameter(c.clone()) for p, c in self.layer.cores.items()}
        optimizer = torch.optim.Adam(params.values(), lr=self.options.lr)
        generator = torch.Generator().manual_seed(self.options.seed)
        scale = float((t * t).mean()).__pow__(0.5) or 1.0  # a loss of order 1 whatever the layer's output norm
        for _ in range(self.options.steps):
            pick = torch.randint(len(x), (min(self.options.batch_tokens, len(x)),), generator=generator).to(x.device)
            loss = ((self.layer(x[pick], params) - t[pick]) / scale).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        error = self._error(x, t, params)
        if error < best:
            best, best_cores = error, {p: c.detach().clone() for p, c in params.items()}
        self.layer.cores = best_cores
        return before, best
