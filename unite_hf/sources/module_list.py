"""Per-expert ``nn.ModuleList`` experts: transformers-4 checkpoints and remote-code models.

Examples: DeepSeek-MoE-16B (``gate_proj/up_proj/down_proj``) and the Mixtral v4 layout
(``w1/w3/w2``, where w1 is the gate and w3 the up projection).

The Fisher probe routes each expert's ``nn.Linear`` forward through the probe. These experts only see
gathered token rows, which cannot be traced back to their sequence, so this layout runs one sequence
per pass (exact, slower). The routing mass is read from the router's output.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..model_structure import MLP_ACTIVATION_ATTRS, MLP_LINEAR_NAMES, mlp_activation, mlp_linear_names
from .base import PROJECTIONS, ExpertProbe, ExpertWeights, MoEBlock, UnsupportedSourceError, register_layout

# (gate, up, down) attribute names, one row per naming convention (the gated rows of the MLP table).
EXPERT_MLP_NAMES: tuple[tuple[str, str, str], ...] = tuple(row for row in MLP_LINEAR_NAMES if row[0] is not None)
_ACTIVATION_ATTRS = MLP_ACTIVATION_ATTRS


def _mlp_names(expert: nn.Module) -> tuple[str, str, str] | None:
    names = mlp_linear_names(expert, gated_only=True)
    return None if names is None else tuple(names[p] for p in PROJECTIONS)  # type: ignore[return-value]


@register_layout
class ModuleListExpertsBlock(MoEBlock):
    layout = "module_list"
    multi_sequence = False  # an expert sees gathered rows: one sequence per pass

    @classmethod
    def matches(cls, experts: nn.Module) -> bool:
        return isinstance(experts, nn.ModuleList)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.experts) == 0:
            raise UnsupportedSourceError(f"{self.name}.{self.experts_attr} is an empty ModuleList.")
        names = {_mlp_names(expert) for expert in self.experts}
        if None in names or len(names) != 1:
            index = next(i for i, e in enumerate(self.experts) if _mlp_names(e) is None) if None in names else 0
            expert = self.experts[index]
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr}.{index} ({type(expert).__name__}) has no "
                f"{' or '.join('/'.join(n) for n in EXPERT_MLP_NAMES)} nn.Linear projections "
                "(or the experts mix naming conventions); this expert layout is not supported."
            )
        self.mlp_names: tuple[str, str, str] = names.pop()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def linear(self, index: int, proj: str) -> nn.Linear:
        return getattr(self.experts[index], self.mlp_names[PROJECTIONS.index(proj)])

    def expert(self, index: int) -> ExpertWeights:
        linears = {proj: self.linear(index, proj) for proj in PROJECTIONS}
        return ExpertWeights.from_projections({proj: (lin.weight, lin.bias) for proj, lin in linears.items()})

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        expert = self.experts[0]
        act = mlp_activation(expert)
        if act is None:
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr}.0 ({type(expert).__name__}) has none of {_ACTIVATION_ATTRS}; "
                "cannot tell the expert activation."
            )
        return act

    @contextlib.contextmanager
    def probe(self, probe: ExpertProbe) -> Iterator[None]:
        """Each expert's linears run through the probe (one sequence per pass: every row is sequence 0);
        a router hook reads the routing weights for the routing mass."""
        patched: list[tuple[nn.Linear, object]] = []
        probe.mass_counts = torch.zeros_like(probe.routed)

        def read_router(module: nn.Module, inputs: object, output: object) -> None:
            routing = next((r for r in (read(output, self) for read in ROUTER_OUTPUT_READERS) if r is not None), None)
            if routing is None:
                probe.mass_unreadable = True  # unreadable router: no routing mass for this block
            elif not probe.mass_unreadable:
                index, weights = routing
                index = index.reshape(-1).to(probe.mass.device)
                probe.mass.index_add_(0, index, weights.detach().reshape(-1).double().to(probe.mass.device))
                probe.mass_counts += torch.bincount(index, minlength=self.num_experts).double()

        def probed_forward(linear: nn.Linear, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            if name == self.projection_names()[0]:
                probe.routed[expert] += flat.shape[0]
            seq_ids = torch.zeros(flat.shape[0], dtype=torch.long, device=x.device)  # one sequence per pass
            return probe.linear(name, expert, flat, linear.weight, linear.bias, seq_ids).reshape(*x.shape[:-1], -1)

        router_handle = self.router.register_forward_hook(read_router)
        try:
            for expert in range(self.num_experts):
                for proj in self.projection_names():
                    linear = self.linear(expert, proj)
                    patched.append((linear, linear.__dict__.get("forward")))  # e.g. an accelerate hook
                    linear.forward = functools.partial(probed_forward, linear, proj, expert)
            yield
        finally:
            router_handle.remove()
            for linear, previous in patched:
                if previous is None:
                    del linear.forward
                else:
                    linear.forward = previous


def _read_index_and_weights(output: object, block: MoEBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Routers that return their choice: ``(topk_idx, topk_weight, aux)`` (DeepSeek-MoE remote code) or
    ``(logits, weights, index)`` (transformers 5): an integer and a float tensor of the same shape."""
    if not isinstance(output, (tuple, list)):
        return None
    tensors = [t if isinstance(t, torch.Tensor) else None for t in output]
    at = next((i for i, t in enumerate(tensors) if t is not None and not t.is_floating_point() and t.ndim == 2), None)
    if at is None:
        return None
    # the weights sit next to the index in both conventions (logits have the same shape when top-k = E)
    candidates = [i for i, t in enumerate(tensors) if t is not None and t.is_floating_point() and t.shape == tensors[at].shape]
    return (tensors[at], tensors[min(candidates, key=lambda i: abs(i - at))]) if candidates else None


def _read_softmax_logits(output: object, block: MoEBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Routers that return only logits (an ``nn.Linear`` gate, transformers-4 Mixtral / Qwen2-MoE): the
    block's softmax then top-k, renormalised unless the block says ``norm_topk_prob=False``."""
    top_k = next((getattr(m, a) for m in (block.block, block.router) for a in ("top_k", "num_experts_per_tok")
                  if isinstance(getattr(m, a, None), int)), None)
    if not isinstance(output, torch.Tensor) or output.shape[-1] != block.num_experts or top_k is None:
        return None
    weights, index = torch.softmax(output.reshape(-1, block.num_experts).float(), dim=-1).topk(top_k, dim=-1)
    if getattr(block.block, "norm_topk_prob", True):
        weights = weights / weights.sum(-1, keepdim=True)
    return index, weights


# Ways to read (top-k index, top-k weight) from a ModuleList block's router output, tried in order. The
# counts read this way must equal the counts the expert probe observes, else the mass is dropped.
ROUTER_OUTPUT_READERS: tuple[Callable[[object, MoEBlock], tuple[torch.Tensor, torch.Tensor] | None], ...] = (
    _read_index_and_weights, _read_softmax_logits,
)
