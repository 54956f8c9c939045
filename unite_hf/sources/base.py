"""One interface over every expert layout: what the extractor needs to know about a MoE source.

A *layout* is how a MoE block stores its experts (fused 3D parameters, a ModuleList of MLPs, ...).
Each layout is one class in this package, registered with :func:`register_layout`; the extractor only
ever talks to :class:`MoEBlock`, so adding a layout never touches fusion, importance or the gene.

Orientation convention: every projection matrix handed out here is ``(out_features, in_features)``,
as in ``nn.Linear.weight``, whatever the on-disk layout is: gate and up are ``(I, H)``, down is
``(H, I)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

PROJECTIONS: tuple[str, ...] = ("gate", "up", "down")


class UnsupportedSourceError(ValueError):
    """The model is not a MoE this library can read (dense, or an unknown expert layout)."""


@dataclass
class ExpertWeights:
    """One expert's projections, as views into the source parameters (never copies)."""

    gate: torch.Tensor | None  # (I, H); None for non-gated experts
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (H,)

    def projection(self, proj: str) -> torch.Tensor | None:
        return getattr(self, proj)

    def bias(self, proj: str) -> torch.Tensor | None:
        return getattr(self, f"{proj}_bias")


class MoEBlock:
    """A single MoE block of a source model, seen through its layout.

    Subclasses implement :meth:`expert`, :attr:`parameters_per_expert` and :meth:`matches`.
    """

    layout: ClassVar[str] = ""

    def __init__(
        self,
        layer_idx: int,
        name: str,
        block: nn.Module,
        experts_attr: str,
        router_attr: str,
        shared_experts: list[tuple[str, nn.Module]],
    ) -> None:
        self.layer_idx = layer_idx
        self.name = name  # dotted module path of the MoE block, e.g. "model.layers.3.mlp"
        self.block = block
        self.experts_attr = experts_attr
        self.router_attr = router_attr
        self.experts: nn.Module = getattr(block, experts_attr)
        self.router: nn.Module = getattr(block, router_attr)
        # (attribute name, module): Qwen2-MoE has shared_expert + shared_expert_gate, DeepSeek shared_experts
        self.shared_experts = shared_experts

    # -- layout-specific -------------------------------------------------------------------------
    @classmethod
    def matches(cls, experts: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_experts(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert(self, index: int) -> ExpertWeights:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold this block's routed experts (used to freeze or unfreeze them)."""
        return list(self.experts.parameters())

    @property
    def activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The experts' activation (applied to the gate, or to up for non-gated experts)."""
        act_fn = getattr(self.experts, "act_fn", None)
        if act_fn is None:
            raise UnsupportedSourceError(
                f"{self.name}.{self.experts_attr} ({type(self.experts).__name__}) has no act_fn; its gating is "
                "family-specific (see FusedExpertsBlock.custom_gating)."
            )
        return act_fn

    @property
    def has_gate(self) -> bool:
        return self.expert(0).gate is not None

    @property
    def has_bias(self) -> bool:
        return self.expert(0).up_bias is not None

    # -- shared --------------------------------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:
        """Router matrix ``(num_experts, hidden)``: the router's own ``weight``, or its single Linear."""
        weight = getattr(self.router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return weight
        linears = [m for m in self.router.modules() if isinstance(m, nn.Linear)]
        if len(linears) == 1:
            return linears[0].weight
        raise UnsupportedSourceError(f"{self.name}.{self.router_attr}: cannot find the router's weight matrix.")

    def experts_list(self) -> list[ExpertWeights]:
        return [self.expert(i) for i in range(self.num_experts)]

    def stacked(self, proj: str) -> torch.Tensor:
        """All experts' ``proj`` matrices as one ``(E, out, in)`` tensor (a copy)."""
        return torch.stack([self.expert(i).projection(proj) for i in range(self.num_experts)])

    def stacked_bias(self, proj: str) -> torch.Tensor | None:
        if not self.has_bias:
            return None
        return torch.stack([self.expert(i).bias(proj) for i in range(self.num_experts)])

    def projection_names(self) -> tuple[str, ...]:
        return PROJECTIONS if self.has_gate else ("up", "down")

    def routed_prefixes(self) -> tuple[str, str]:
        """Dotted state-dict prefixes of the routed experts and the router (what fusion replaces)."""
        return f"{self.name}.{self.experts_attr}.", f"{self.name}.{self.router_attr}."

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layer={self.layer_idx}, name={self.name!r}, experts={self.num_experts}, "
            f"shared={[n for n, _ in self.shared_experts]})"
        )


@dataclass
class SourceLayers:
    """What an adapter found in a model: MoE blocks plus the dense layers in between."""

    moe_blocks: list[MoEBlock]
    dense_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    layers_path: str = ""


LAYOUTS: dict[str, type[MoEBlock]] = {}


def register_layout(cls: type[MoEBlock]) -> type[MoEBlock]:
    """Class decorator: make an expert layout known to :func:`unite_hf.sources.get_source`."""
    if not cls.layout:
        raise ValueError(f"{cls.__name__} must set a `layout` name")
    LAYOUTS[cls.layout] = cls
    return cls
