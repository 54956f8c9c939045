"""The private transformers APIs unite_hf relies on, in one place.

transformers does not promise these stay as they are. Each is reached only through a function here,
which fails with :class:`TransformersCompatError` (naming the API and the installed version) when it
is gone or changed, instead of an ``AttributeError`` deep inside a calibration pass.
``tests/test_compat.py`` checks each against the installed transformers, so an upgrade that changes
one fails there first.

Supported range: transformers >= :data:`MIN_TRANSFORMERS` (``apply_renamings`` for checkpoint
streaming, ``SubConfigSpec`` for the target config), < 6.
"""

from __future__ import annotations

from typing import Any

import torch

MIN_TRANSFORMERS = "5.21.0"


class TransformersCompatError(RuntimeError):
    """A private transformers API unite_hf needs is missing or changed in the installed version."""


def _error(api: str, detail: str) -> TransformersCompatError:
    import transformers

    return TransformersCompatError(
        f"transformers {transformers.__version__}: {api} {detail}. unite_hf supports transformers >= "
        f"{MIN_TRANSFORMERS}, < 6; please report this version at the unite_hf issue tracker.")


def default_apply_gate():
    """``transformers.integrations.moe._default_apply_gate``: the ``act(gate) * up`` of fused experts."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError as err:
        raise _error("transformers.integrations.moe._default_apply_gate", "is missing") from err
    return _default_apply_gate


def has_custom_gating(experts: torch.nn.Module) -> bool:
    """Whether a fused experts module overrides the default ``act(gate) * up`` (gpt-oss clamps and
    offsets) through its class's ``_apply_gate``."""
    return getattr(type(experts), "_apply_gate", default_apply_gate()) is not default_apply_gate()


def apply_gate(experts: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """``experts._apply_gate(gate_up)``: the gated activation of a fused ``gate_up`` projection."""
    method = getattr(experts, "_apply_gate", None)
    if not callable(method):
        raise _error(f"{type(experts).__name__}._apply_gate", "is missing (fused experts' gated activation)")
    return method(gate_up)


def get_experts_implementation(config: Any) -> str | None:
    """``config._experts_implementation``: which experts forward the model dispatches to."""
    if not hasattr(config, "_experts_implementation"):
        raise _error(f"{type(config).__name__}._experts_implementation", "is missing")
    return config._experts_implementation


def set_experts_implementation(config: Any, name: str | None) -> None:
    """Set ``config._experts_implementation`` (where the model's own setter did not reach)."""
    get_experts_implementation(config)  # fails loudly when the attribute is gone
    config._experts_implementation = name


def apply_renamings(key: str, renamings: list) -> str:
    """``transformers.core_model_loading.apply_renamings``: a checkpoint key under the model's
    in-memory name (transformers >= 5.21)."""
    try:
        from transformers.core_model_loading import apply_renamings as rename
    except ImportError as err:
        raise _error("transformers.core_model_loading.apply_renamings", "is missing (checkpoint streaming)") from err
    return rename(key, renamings)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``transformers.integrations.moe._grouped_mm``: ``x[rows of group e] @ weight[e]`` for ``weight``
    ``(E, in, out)`` and ``offsets`` the groups' cumulative ends, through the same dispatch (torch's
    grouped GEMM, or transformers' fallback) as the ``grouped_mm`` experts implementation, transformers'
    default. Rows past ``offsets[-1]`` are left unwritten. Widths whose rows are not 16-byte aligned,
    which torch's grouped GEMM refuses, take a loop of products (one host sync)."""
    if not _grouped_mm_aligned(x, weight):
        out = x.new_empty(x.shape[0], weight.shape[-1])
        start = 0
        for expert, end in enumerate(offsets.tolist()):
            torch.mm(x[start:end], weight[expert].to(x.dtype), out=out[start:end])
            start = end
        return out
    try:
        from transformers.integrations.moe import _grouped_mm
    except ImportError as err:
        raise _error("transformers.integrations.moe._grouped_mm", "is missing (grouped experts GEMM)") from err
    return _grouped_mm(x, weight, offs=offsets)


def _grouped_mm_aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether every operand and the output of a grouped GEMM have the 16-byte aligned strides torch's kernel needs."""
    def aligned(t: torch.Tensor) -> bool:
        return t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0
                                             for stride, size in zip(t.stride(), t.shape) if stride != 1 and size > 1)

    return aligned(x) and aligned(weight) and weight.shape[-1] * x.element_size() % 16 == 0
