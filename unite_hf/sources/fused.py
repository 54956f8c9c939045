"""transformers 5 fused experts: 3D parameters behind ``@use_experts_implementation``.

One class reads every family with this layout (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GraniteMoE,
gpt-oss, ...) through the flags the decorator sets on the experts module, so no family needs its own
code:

- ``has_gate``: ``gate_up_proj`` (gate and up together) versus ``up_proj`` only;
- ``is_concatenated``: ``[gate; up]`` halves versus interleaved rows ``[g0, u0, g1, u1, ...]``;
- ``is_transposed``: parameters stored ``(E, in, out)`` instead of ``(E, out, in)``;
- ``has_bias``: ``gate_up_proj_bias`` / ``up_proj_bias`` and ``down_proj_bias``.

The Fisher probe is an experts implementation, :data:`PROBE_IMPLEMENTATION`, registered with
transformers' dispatch when first needed and switched on through ``set_experts_implementation`` for the
pass (:meth:`FusedExpertsBlock.probe_model`); it runs gate and up as one probed map, ``first``. On disk
the experts are 3D tensors read one expert slice at a time, or the per-expert keys transformers 5 writes
for Mixtral and Qwen2-MoE.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .base import (CheckpointError, DiskKeys, ExpertProbe, ExpertWeights, MoEBlock, RoutedRows, UnsupportedSourceError,
                   register_layout)

_REQUIRED_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate")
# the experts implementation name the Fisher probe registers with transformers' experts dispatch
PROBE_IMPLEMENTATION = "unite_probe"
_FUSED_KEY = re.compile(r"^(gate_up_proj|up_proj|down_proj)(_bias)?$")


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
            first_bias, down_bias = self._first_bias[index], experts.down_proj_bias[index]
        return self.expert_views(self.first_parameter[index], experts.down_proj[index], first_bias, down_bias)

    def expert_views(
        self,
        first: torch.Tensor,
        down: torch.Tensor,
        first_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> ExpertWeights:
        """Split one expert's stored matrices into (out, in) views (also used on slices read from disk)."""
        if self.is_transposed:
            first, down = first.T, down.T
        return self.expert_from_linears({"first": (first, first_bias), "down": (down, down_bias)})

    def probed_linears(self) -> dict[str, tuple[torch.Size, torch.Size | None]]:
        """Two maps per expert: ``first`` (gate and up together, or up) and ``down``, as ``(out, in)``."""
        def out_in(stored: torch.Tensor) -> torch.Size:
            shape = stored.shape[1:]
            return torch.Size(reversed(shape)) if self.is_transposed else shape

        first_bias = down_bias = None
        if self._has_bias:
            first_bias, down_bias = self._first_bias.shape[1:], self.experts.down_proj_bias.shape[1:]
        return {"first": (out_in(self.first_parameter), first_bias), "down": (out_in(self.experts.down_proj), down_bias)}

    def expert_from_linears(self, linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> ExpertWeights:
        """Split ``first`` into gate and up (halves or interleaved rows); ``down`` as it is."""
        (first, first_bias), (down, down_bias) = linears["first"], linears["down"]
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

    # -- the Fisher probe: a registered experts implementation ---------------------------------------
    def probe(self, probe: ExpertProbe) -> contextlib.AbstractContextManager[None]:
        """Attach ``probe`` to the experts; :meth:`probe_model` routes their forward to
        :func:`probed_experts_forward`, which finds it there."""
        return _attached(self.experts, probe)

    @classmethod
    @contextlib.contextmanager
    def probe_model(cls, model: nn.Module, blocks: list[MoEBlock]) -> Iterator[None]:
        """Route the fused experts of ``model`` through :data:`PROBE_IMPLEMENTATION` for the duration, and back.

        Through ``PreTrainedModel.set_experts_implementation`` (transformers 5), which validates the name
        and reaches sub-models; only a model without it (remote code outside ``PreTrainedModel``) has its
        experts' config switched directly.
        """
        from ..compat import get_experts_implementation, set_experts_implementation

        configs = {id(b.experts.config): b.experts.config for b in blocks}
        _register_probe_implementation()
        previous = {key: get_experts_implementation(config) for key, config in configs.items()}
        setter = getattr(model, "set_experts_implementation", None)

        def switch(name_of: Callable[[int], str]) -> None:
            if setter is not None and len(set(map(name_of, configs))) == 1:
                setter(name_of(next(iter(configs))))
            for key, config in configs.items():  # configs the model's own dispatch did not reach
                if get_experts_implementation(config) != name_of(key):
                    set_experts_implementation(config, name_of(key))

        switch(lambda key: PROBE_IMPLEMENTATION)
        try:
            yield
        finally:
            switch(previous.__getitem__)

    @property
    def _first_bias(self) -> torch.Tensor:
        return self.experts.gate_up_proj_bias if self._has_gate else self.experts.up_proj_bias

    # -- on disk: 3D tensors, one expert per slice (or the per-expert keys of transformers 5's save) -------
    def checkpoint_keys(self, names: dict[str, str], where: str) -> DiskKeys:
        fused = {name: key for name, key in names.items() if _FUSED_KEY.match(name)}
        if not fused:  # Mixtral / Qwen2-MoE as transformers 5 saves them: per-expert keys
            return super().checkpoint_keys(names, where)
        if len(fused) < len(names):
            raise CheckpointError(f"{where} mixes per-expert and fused expert tensors "
                                  f"(e.g. {sorted(set(names) - set(fused))[:3]})")
        first = "gate_up_proj" if self._has_gate else "up_proj"
        needed = [first, "down_proj"] + ([f"{first}_bias", "down_proj_bias"] if self._has_bias else [])
        missing = [n for n in needed if n not in fused]
        if missing:
            raise CheckpointError(f"{where}: missing fused expert tensors {missing}")
        return DiskKeys("fused_3d", fused)

    def read_checkpoint_expert(self, keys: DiskKeys, read: Callable[[str, int | None], torch.Tensor],
                               index: int) -> ExpertWeights:
        if keys.format != "fused_3d":
            return super().read_checkpoint_expert(keys, read, index)
        first_name = "gate_up_proj" if self._has_gate else "up_proj"
        first, down = read(keys.keys[first_name], index), read(keys.keys["down_proj"], index)
        first_bias = down_bias = None
        if self._has_bias:
            first_bias, down_bias = read(keys.keys[f"{first_name}_bias"], index), read(keys.keys["down_proj_bias"], index)
        return self.expert_views(first, down, first_bias, down_bias)


@contextlib.contextmanager
def _attached(experts: nn.Module, probe: ExpertProbe) -> Iterator[None]:
    experts._unite_probe = probe
    try:
        yield
    finally:
        del experts._unite_probe


def probed_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``grouped_mm`` experts forward (transformers' default), with both projections of all experts
    routed through the block's probe as one grouped linear map each.

    Rows are the (token, slot) pairs sorted by expert, stably, so within an expert they follow the
    tokens and hence the sequences; that order is what the probe's per-(expert, sequence) gradients
    need. One call per projection and no host sync, where an expert-by-expert loop made two calls and
    a sync per expert (issue 15)."""
    from ..compat import apply_gate

    probe: ExpertProbe = self._unite_probe
    block: FusedExpertsBlock = probe.block  # type: ignore[assignment]
    probe.route(top_k_index, top_k_weights)
    seq_ids = probe.token_sequences(hidden_states)
    num_experts, top_k = block.num_experts, top_k_index.shape[-1]
    expert, order = torch.sort(top_k_index.reshape(-1), stable=True)
    token = order // top_k
    valid = expert < num_experts  # expert-parallel sentinels (index num_experts) sort last
    counts = torch.bincount(expert, minlength=num_experts + 1)[:num_experts]
    expert = expert.clamp(max=num_experts - 1)
    rows = RoutedRows(expert=expert, seq=seq_ids[token], expert_counts=counts,
                      offsets=torch.cumsum(counts, 0, dtype=torch.int32), valid=valid,
                      num_sequences=probe.num_sequences)
    x = hidden_states[token].masked_fill(~valid[:, None], 0)
    first_bias = down_bias = None
    if block.has_bias:
        first_bias, down_bias = block._first_bias[expert], self.down_proj_bias[expert]
    h = probe.grouped_linear("first", x, block.first_parameter, first_bias, rows, block.is_transposed)
    h = apply_gate(self, h) if block.has_gate else self.act_fn(h)
    out = probe.grouped_linear("down", h, self.down_proj, down_bias, rows, block.is_transposed)
    out = out * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, token, out.to(hidden_states.dtype))


def _register_probe_implementation() -> None:
    """Make :data:`PROBE_IMPLEMENTATION` known to transformers' experts dispatch. Called where a probe is
    installed, not at import: importing unite_hf leaves transformers' registry as it found it."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if PROBE_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(PROBE_IMPLEMENTATION, probed_experts_forward)
