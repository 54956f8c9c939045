"""Per-expert ``nn.ModuleList`` experts: transformers-4 checkpoints and remote-code models.

Examples: DeepSeek-MoE-16B (``gate_proj/up_proj/down_proj``) and the Mixtral v4 layout
(``w1/w3/w2``, where w1 is the gate and w3 the up projection).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import ExpertWeights, MoEBlock, UnsupportedSourceError, register_layout

# (gate, up, down) attribute names, one row per naming convention.
EXPERT_MLP_NAMES: tuple[tuple[str, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
)
_ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn")


def _mlp_names(expert: nn.Module) -> tuple[str, str, str] | None:
    for names in EXPERT_MLP_NAMES:
        if all(isinstance(getattr(expert, name, None), nn.Linear) for name in names):
            return names
    return None


@register_layout
class ModuleListExpertsBlock(MoEBlock):
    layout = "module_list"

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
        return getattr(self.experts[index], self.mlp_names[("gate", "up", "down").index(proj)])

    def expert(self, index: int) -> ExpertWeights:
        gate, up, down = (self.linear(index, proj) for proj in ("gate", "up", "down"))
        return ExpertWeights(
            gate=gate.weight, up=up.weight, down=down.weight,
            gate_bias=gate.bias, up_bias=up.bias, down_bias=down.bias,
        )

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        expert = self.experts[0]
        for attr in _ACTIVATION_ATTRS:
            if callable(getattr(expert, attr, None)):
                return getattr(expert, attr)
        raise UnsupportedSourceError(
            f"{self.name}.{self.experts_attr}.0 ({type(expert).__name__}) has none of {_ACTIVATION_ATTRS}; "
            "cannot tell the expert activation."
        )
