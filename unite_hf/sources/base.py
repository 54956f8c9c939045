"""One interface over every expert layout: what the extractor needs to know about a MoE source.

A *layout* is how a MoE block stores its experts (fused 3D parameters, a ModuleList of MLPs, ...).
Each layout is one class, a :class:`MoEBlock` subclass registered with :func:`register_layout`, and
it owns everything that depends on how the experts are stored:

- which experts modules it reads (:meth:`MoEBlock.matches`) and its shared experts
  (:meth:`MoEBlock.find_shared_experts`);
- parameter views: each expert's projections as ``(out, in)`` views (:meth:`MoEBlock.expert`), and
  the linear maps its forward runs (:meth:`MoEBlock.probed_linears`, :meth:`MoEBlock.expert_from_linears`);
- the Fisher probe: how the importance pass hooks the experts' forward (:meth:`MoEBlock.probe`,
  :meth:`MoEBlock.probe_model`, :attr:`MoEBlock.multi_sequence`);
- its on-disk keys, for streaming extraction from safetensors shards
  (:meth:`MoEBlock.checkpoint_keys`, :meth:`MoEBlock.read_checkpoint_expert`).

The extractor, the Fisher pass and the checkpoint reader only ever talk to :class:`MoEBlock`, so
adding a layout is one new class and nothing else is edited (CONTRIBUTING.md, "Adding an expert layout").

Orientation convention: every projection matrix handed out here is ``(out_features, in_features)``,
as in ``nn.Linear.weight``, whatever the on-disk layout is: gate and up are ``(I, H)``, down is
``(H, I)``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..model_structure import MLP_LINEAR_NAMES, shared_expert_children

PROJECTIONS: tuple[str, ...] = ("gate", "up", "down")


class UnsupportedSourceError(ValueError):
    """The model is not a MoE this library can read (dense, or an unknown expert layout)."""


class CheckpointError(ValueError):
    """The folder is not a readable safetensors MoE checkpoint (also :mod:`unite_hf.sources.checkpoint`'s)."""


@dataclass
class ExpertWeights:
    """One expert's projections, as views into the source parameters (never copies)."""

    gate: torch.Tensor | None  # (I, H); None for non-gated experts
    up: torch.Tensor  # (I, H)
    down: torch.Tensor  # (H, I)
    gate_bias: torch.Tensor | None = None  # (I,)
    up_bias: torch.Tensor | None = None  # (I,)
    down_bias: torch.Tensor | None = None  # (H,)

    @classmethod
    def from_projections(cls, tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> ExpertWeights:
        """From ``proj -> (weight (out, in), bias or None)``; a missing ``gate`` makes a non-gated expert."""
        values: dict[str, torch.Tensor | None] = {"gate": None}
        for proj, (weight, bias) in tensors.items():
            values[proj], values[f"{proj}_bias"] = weight, bias
        return cls(**values)

    def projection(self, proj: str) -> torch.Tensor | None:
        return getattr(self, proj)

    def bias(self, proj: str) -> torch.Tensor | None:
        return getattr(self, f"{proj}_bias")


@dataclass
class RoutedRows:
    """The routed (token, slot) rows of one MoE block's experts, sorted by expert (then by token, so by
    sequence within an expert): what a grouped probe pass needs besides the rows themselves."""

    expert: torch.Tensor  # (rows,) long: each row's expert (expert-parallel sentinels clamped to E - 1)
    seq: torch.Tensor  # (rows,) long: each row's calibration sequence
    expert_counts: torch.Tensor  # (E,) long: rows per expert (sentinels excluded)
    offsets: torch.Tensor  # (E,) int32: cumulative counts, the group ends of a grouped GEMM
    valid: torch.Tensor  # (rows,) bool: False for sentinel rows (another process's experts), which stay 0
    num_sequences: int  # sequences in the batch


class ExpertProbe(Protocol):
    """What a layout's :meth:`MoEBlock.probe` talks to during a Fisher or routing pass (implemented
    by :mod:`unite_hf.importance`; one probe per MoE block)."""

    block: MoEBlock
    routed: torch.Tensor  # (E,) float64: routed (token, slot) pairs per expert, added up by the layout
    mass: torch.Tensor  # (E,) float64: routing weights those pairs were scaled by
    mass_counts: torch.Tensor | None  # counts as read from a router's output, checked against ``routed``
    mass_unreadable: bool  # the router's output could not be read: no routing mass for this pass
    num_sequences: int  # calibration sequences in the current batch

    def linear(self, name: str, expert: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               seq_ids: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` for probed linear ``name`` of ``expert``: every expert linear map
        must run through this, with ``seq_ids`` the calibration sequence of each row of ``x``."""

    def grouped_linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       rows: RoutedRows, transposed: bool) -> torch.Tensor:
        """Probed linear ``name`` of every expert at once: row ``r`` of ``x`` (sorted as ``rows``) times
        its expert's slice of the 3D ``weight`` (``(E, out, in)``, or ``(E, in, out)`` if ``transposed``),
        plus ``bias`` (per row, or None). For layouts whose experts are 3D tensors; one grouped GEMM."""

    def route(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """Count a router's choice ``(tokens, k)`` (indices >= E, expert-parallel sentinels, are skipped)."""

    def token_sequences(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The sequence of each row of the ``(tokens, H)`` input of the experts, for a layout whose experts
        see the whole batch's token rows in order (raises when the row count does not match)."""


_PER_EXPERT_KEY = re.compile(r"^(\d+)\.(\w+)\.(weight|bias)$")
# per-expert linear name on disk -> projection, from the MLP naming conventions
_PER_EXPERT_LINEARS: dict[str, str] = {name: proj for row in MLP_LINEAR_NAMES for proj, name in zip(PROJECTIONS, row)
                                       if name is not None}


@dataclass
class DiskKeys:
    """Where one MoE block's experts lie in a checkpoint: an on-disk format name (``"per_expert"``,
    ``"fused_3d"``, ...) and the layout's own key map (what :meth:`MoEBlock.read_checkpoint_expert` reads)."""

    format: str
    keys: dict[Any, str]


class MoEBlock:
    """A single MoE block of a source model, seen through its layout.

    Subclasses implement :meth:`matches`, :attr:`num_experts`, :meth:`expert` and :meth:`probe`, and
    override the other layout hooks where the defaults (one ``nn.Linear``-like map per projection,
    per-expert keys on disk, shared experts found by structure) do not fit.
    """

    layout: ClassVar[str] = ""
    # whether one probed pass may hold several sequences: only when the experts see the token rows in
    # batch order (a ModuleList expert sees gathered rows that cannot be traced back to their sequence)
    multi_sequence: ClassVar[bool] = True

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
        """Whether ``experts`` (the MoE block's ``experts`` child) is stored in this layout."""
        raise NotImplementedError

    @classmethod
    def find_shared_experts(cls, block: nn.Module) -> list[tuple[str, nn.Module]]:
        """The MoE block's shared experts (and their gates) as ``(attribute, module)``. By default by
        structure: every parameterised child besides the experts and the router."""
        return shared_expert_children(block)

    @property
    def num_experts(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert(self, index: int) -> ExpertWeights:  # pragma: no cover - abstract
        """Expert ``index``'s projections as ``(out, in)`` views into the parameters (never copies)."""
        raise NotImplementedError

    def probe(self, probe: ExpertProbe) -> contextlib.AbstractContextManager[None]:  # pragma: no cover - abstract
        """A context manager during which every expert linear map of this block runs through
        ``probe.linear`` (with the probed-linear names of :meth:`probed_linears`), and the routed
        tokens are counted into ``probe.routed`` / ``probe.mass`` (e.g. with ``probe.route``). On exit
        the block must be exactly as before."""
        raise NotImplementedError

    @classmethod
    def probe_model(cls, model: nn.Module, blocks: list[MoEBlock]) -> contextlib.AbstractContextManager[None]:
        """A model-wide switch the probes of ``blocks`` (all of this layout) need, entered after every
        :meth:`probe` (the fused layout switches the experts implementation); none by default."""
        return contextlib.nullcontext()

    def probed_linears(self) -> dict[str, tuple[torch.Size, torch.Size | None]]:
        """``name -> ((out, in), bias shape or None)`` of one expert's linear maps as its forward runs
        them (the names :meth:`probe` passes to ``probe.linear``). The diagonal Fisher is accumulated in
        these shapes and turned into projections by :meth:`expert_from_linears`. Default: one map per
        projection, named by it."""
        expert = self.expert(0)
        return {proj: (expert.projection(proj).shape, None if expert.bias(proj) is None else expert.bias(proj).shape)
                for proj in self.projection_names()}

    def expert_from_linears(self, linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> ExpertWeights:
        """One expert's projections from tensors shaped like its :meth:`probed_linears`
        (``name -> (weight, bias or None)``): views, the same split as the weights themselves."""
        return ExpertWeights.from_projections(linears)

    def checkpoint_keys(self, names: dict[str, str], where: str) -> DiskKeys:
        """Map this block's expert tensors in a checkpoint to what :meth:`read_checkpoint_expert` reads.

        ``names``: every on-disk tensor under the experts module, by its in-memory name below it (after
        the family's renamings) -> on-disk key. Raises :class:`CheckpointError` (prefixed with ``where``)
        for tensors the layout cannot place or expert weights that are missing. Default: per-expert keys
        ``{i}.{gate_proj|up_proj|down_proj|w1|w3|w2}.{weight|bias}``, as transformers 5 writes Mixtral and
        Qwen2-MoE and as ModuleList experts are stored.
        """
        keys: dict[tuple[int, str, str], str] = {}
        for name, disk_key in names.items():
            match = _PER_EXPERT_KEY.match(name)
            if match is None or match.group(2) not in _PER_EXPERT_LINEARS:
                raise CheckpointError(f"{where}: expert tensor {disk_key!r} ({name!r}) has an on-disk layout the "
                                      f"{type(self).__name__} layout cannot read")
            expert, linear, kind = match.groups()
            keys[(int(expert), _PER_EXPERT_LINEARS[linear], kind)] = disk_key
        needed = [(e, p, "weight") for e in range(self.num_experts) for p in self.projection_names()]
        missing = [k for k in needed if k not in keys]
        if missing:
            e, p, _ = missing[0]
            raise CheckpointError(f"{where}: {len(missing)} expert weight(s) missing, e.g. expert {e} {p}")
        return DiskKeys("per_expert", keys)

    def read_checkpoint_expert(self, keys: DiskKeys, read: Callable[[str, int | None], torch.Tensor],
                               index: int) -> ExpertWeights:
        """Expert ``index`` read from disk: ``read(key, i)`` gives slice ``i`` along dim 0 of tensor ``key``
        (the whole tensor for ``i=None``). Default: the per-expert keys of :meth:`checkpoint_keys`."""
        tensors = {}
        for proj in self.projection_names():
            bias_key = keys.keys.get((index, proj, "bias"))
            tensors[proj] = (read(keys.keys[(index, proj, "weight")], None),
                             None if bias_key is None else read(bias_key, None))
        return ExpertWeights.from_projections(tensors)

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
    def custom_gating(self) -> bool:
        """Whether the experts combine gate and up other than ``act(gate) * up`` (a target cannot rebuild them)."""
        return False

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


def blocks_by_layout(blocks: Iterable[MoEBlock]) -> dict[type[MoEBlock], list[MoEBlock]]:
    """``blocks`` grouped by their layout class, in first-seen order."""
    grouped: dict[type[MoEBlock], list[MoEBlock]] = {}
    for block in blocks:
        grouped.setdefault(type(block), []).append(block)
    return grouped


@dataclass
class SourceLayers:
    """What an adapter found in a model: MoE blocks plus the dense layers in between."""

    moe_blocks: list[MoEBlock]
    dense_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    layers_path: str = ""


LAYOUTS: dict[str, type[MoEBlock]] = {}


def register_layout(cls: type[MoEBlock]) -> type[MoEBlock]:
    """Class decorator: make an expert layout known to :func:`unite_hf.sources.get_source` (and so to
    extraction, the Fisher pass and streaming from checkpoints)."""
    if not cls.layout:
        raise ValueError(f"{cls.__name__} must set a `layout` name")
    LAYOUTS[cls.layout] = cls
    return cls
