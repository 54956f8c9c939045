"""transformers 5 fused experts: 3D parameters behind ``@use_experts_implementation``.

One class reads every family with this layout (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GraniteMoE,
gpt-oss, ...) through the flags the decorator sets on the experts module, so no family needs its own
code:

- ``has_gate``: ``gate_up_proj`` (gate and up together) versus ``up_proj`` only;
- ``is_concatenated``: ``[gate; up]`` halves versus interleaved rows ``[g0, u0, g1, u1, ...]``;
- ``is_transposed``: parameters stored ``(E, in, out)`` instead of ``(E, out, in)``;
- ``has_bias``: ``gate_up_proj_bias`` / ``up_proj_bias`` and ``down_proj_bias``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import ExpertWeights, MoEBlock, UnsupportedSourceError, register_layout

_REQUIRED_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate")


@register_layout
class FusedExpertsBlock(MoEBlock):
    layout = "fused_3d"

    @classmethod
    def matches(cls, experts: nn.Module) -> bool:
        down = getattr(experts, "down_proj", None)
        return isinstance(down, torch.Tensor) and down.ndim == 3

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        experts = self.experts
        missing = [flag for flag in _REQUIRED_FLAGS if not hasattr(experts, flag)]
        if missing:
            # 3D experts without the decorator's flags (Llama4, Dbrx, ...) have family-specific
            # orientations; guessing would silently transpose or mix gate and up.
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr} ({type(experts).__name__}) stores experts as 3D tensors but "
                f"lacks the `@use_experts_implementation` flags {missing}; this expert layout is not supported."
            )
        if getattr(experts, "has_post_expert_norm", False):
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr} ({type(experts).__name__}) applies a norm after each expert; "
                "a weighted sum of such experts is not one expert, so UNITE fusion does not apply."
            )
        self.is_transposed: bool = experts.is_transposed
        self.is_concatenated: bool = experts.is_concatenated
        self._has_bias: bool = experts.has_bias
        self._has_gate: bool = experts.has_gate
        self._check_shapes()

    def _check_shapes(self) -> None:
        first, down = self.first_parameter, self.experts.down_proj
        if first.ndim != 3 or first.shape[0] != down.shape[0]:
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr}: expert tensors {tuple(first.shape)} and {tuple(down.shape)} "
                "do not share a leading experts dimension."
            )
        expert = self.expert(0)
        hidden, intermediate = expert.down.shape
        if expert.up.shape != (intermediate, hidden):
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr}: up/gate {tuple(expert.up.shape)} does not match down "
                f"{tuple(expert.down.shape)} under is_transposed={self.is_transposed}."
            )

    @property
    def first_parameter(self) -> torch.Tensor:
        """``gate_up_proj`` for gated experts, ``up_proj`` otherwise."""
        return self.experts.gate_up_proj if self._has_gate else self.experts.up_proj

    @property
    def num_experts(self) -> int:
        return self.experts.down_proj.shape[0]

    @property
    def has_gate(self) -> bool:
        return self._has_gate

    @property
    def has_bias(self) -> bool:
        return self._has_bias

    def expert(self, index: int) -> ExpertWeights:
        experts = self.experts
        first_bias = down_bias = None
        if self._has_bias:
            first_bias = (experts.gate_up_proj_bias if self._has_gate else experts.up_proj_bias)[index]
            down_bias = experts.down_proj_bias[index]
        return self.expert_views(self.first_parameter[index], experts.down_proj[index], first_bias, down_bias)

    def expert_views(
        self,
        first: torch.Tensor,
        down: torch.Tensor,
        first_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> ExpertWeights:
        """Split one expert's stored matrices into (out, in) views.

        Also used on accumulators shaped like the parameters (the diagonal Fisher), so the layout
        logic lives in exactly one place.
        """
        if self.is_transposed:
            first, down = first.T, down.T
        if not self._has_gate:
            return ExpertWeights(gate=None, up=first, down=down, up_bias=first_bias, down_bias=down_bias)
        gate, up = self._split(first)
        gate_bias = up_bias = None
        if first_bias is not None:
            gate_bias, up_bias = self._split(first_bias)
        return ExpertWeights(gate=gate, up=up, down=down, gate_bias=gate_bias, up_bias=up_bias, down_bias=down_bias)

    def _split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_concatenated:
            half = gate_up.shape[0] // 2
            return gate_up[:half], gate_up[half:]
        return gate_up[0::2], gate_up[1::2]

    @property
    def custom_gating(self) -> bool:
        """Whether the family overrides the default ``act(gate) * up`` (gpt-oss clamps and offsets)."""
        from ..compat import has_custom_gating

        return has_custom_gating(self.experts)
