"""LoRA on the UNITE FFN, through peft's support for custom modules.

peft's LoRA knows ``nn.Linear`` and friends; a UNITE FFN projection is a
:class:`~unite_hf.modeling_unite.UniteFactorizedLinear` (``W = U_out @ G @ U_in.T``), so
``LoraConfig(target_modules=["up"])`` fails with "not supported" and ``"all-linear"`` reaches only
the attention projections. :func:`unite_lora_config` registers :class:`UniteLoraLinear` for the
factorized projections, so a low-rank update ``B @ A`` is learned beside each targeted projection
(``y = U_out G U_in^T x + (alpha / r) B A x``) while its bases and core stay frozen::

    from peft import get_peft_model
    from unite_hf.training import attention_projection_names, unite_lora_config

    config = unite_lora_config(task_type="SEQ_CLS", r=8,
                               target_modules=["gate", "up", "down", *attention_projection_names(model)])
    model = get_peft_model(model, config)

Reloading an adapter needs the same registration: ``PeftModel.from_pretrained(target, path,
config=load_unite_lora_config(path))``. Alternatives without peft: ``set_trainable(model, "cores")``
(only the cores ``G_l`` and the head) or ``LoraConfig(modules_to_save=[...])`` on whole modules.

The update cannot be merged into the factorized weight without raising its rank, so
``merge_and_unload`` raises; keep the adapter separate.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _LoraLinear

from ..modeling_unite import UniteFactorizedLinear

UNITE_FFN_PROJECTIONS: tuple[str, ...] = ("gate", "up", "down")
"""Module names of the factorized projections inside every UNITE FFN."""


class UniteLoraLinear(_LoraLinear):
    """peft's LoRA ``Linear`` around a :class:`UniteFactorizedLinear`: the base projection runs as it
    is (``forward(x, bases)``), the adapter adds ``scale * B(A(dropout(x)))``."""

    def _get_in_out_features(self, module: UniteFactorizedLinear) -> tuple[int, int]:
        return module.d_in, module.d_out

    def _get_base_layer_device_and_dtype(self, base_layer: UniteFactorizedLinear):
        return base_layer.core.device, base_layer.core.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "a LoRA update of a factorized UNITE projection (U_out @ G @ U_in.T) cannot be merged into its bases "
            "and core without raising their rank; keep the adapter separate (PeftModel), or fine-tune the cores "
            "with unite_hf.training.set_trainable(model, 'cores') instead.")

    def unmerge(self) -> None:  # nothing is ever merged
        return None


def register_unite_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`UniteLoraLinear` for UNITE projections on ``config`` (returned)."""
    config._register_custom_module({UniteFactorizedLinear: UniteLoraLinear})
    return config


def unite_lora_config(target_modules: list[str] | str | None = None, **lora_kwargs: Any) -> LoraConfig:
    """A ``peft.LoraConfig`` that can target the UNITE FFN projections.

    Args:
        target_modules: module names as in peft (default: the FFN projections ``gate``, ``up``,
            ``down``; add :func:`~unite_hf.training.attention_projection_names` for attention too).
        **lora_kwargs: any other ``LoraConfig`` argument (``task_type``, ``r``, ``lora_alpha``, ...).
    """
    if target_modules is None:
        target_modules = list(UNITE_FFN_PROJECTIONS)
    return register_unite_lora(LoraConfig(target_modules=target_modules, **lora_kwargs))


def load_unite_lora_config(path_or_repo_id: str, **kwargs: Any) -> LoraConfig:
    """The ``LoraConfig`` saved with an adapter, with the UNITE registration peft needs to rebuild it."""
    return register_unite_lora(LoraConfig.from_pretrained(path_or_repo_id, **kwargs))
