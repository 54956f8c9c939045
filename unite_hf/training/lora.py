"""LoRA on the UNITE FFN with peft: configs that target the factorized projections.

peft's LoRA knows ``nn.Linear`` and friends; a UNITE FFN projection is a
:class:`~unite_hf.modeling_unite.UniteFactorizedLinear` (``W = U_out @ G @ U_in.T``). ``import unite_hf``
registers :class:`~unite_hf.peft_lora.UniteLoraLinear` for it on every ``peft.LoraConfig`` (see
:mod:`unite_hf.peft_lora`), so a low-rank update ``B @ A`` is learned beside each targeted projection
(``y = U_out G U_in^T x + (alpha / r) B A x``) while its bases and core stay frozen, through peft's own calls::

    from peft import LoraConfig, get_peft_model
    from unite_hf.training import attention_projection_names, unite_lora_config

    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8,
                                             target_modules=["gate", "up", "down", *attention_projection_names(model)]))
    # the same: unite_lora_config(task_type="SEQ_CLS", r=8), whose target_modules default to the FFN projections

An adapter reloads as any peft adapter: ``PeftModel.from_pretrained(target, path)`` or
``AutoPeftModelFor*.from_pretrained(path)`` (from the Hub too), after ``import unite_hf``. Without
``"gate"``/``"up"``/``"down"`` named, ``"all-linear"`` reaches only the attention projections. Alternatives
without peft: ``set_trainable(model, "cores")`` (only the cores ``G_l`` and the head) or
``LoraConfig(modules_to_save=[...])`` on whole modules.

``merge_and_unload`` merges an FFN update only where it lies in the span of the projection's bases (always
on a target at full rank, whose projections store no bases); otherwise it raises
:class:`~unite_hf.peft_lora.UniteMergeError` before anything is merged: keep the adapter separate.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig

from ..peft_lora import UniteLoraLinear, UniteMergeError, register_unite_lora  # noqa: F401  (importable from here)

UNITE_FFN_PROJECTIONS: tuple[str, ...] = ("gate", "up", "down")
"""Module names of the factorized projections inside every UNITE FFN."""


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
    """The ``LoraConfig`` saved with an adapter (``LoraConfig.from_pretrained``, which after ``import unite_hf``
    registers the UNITE layer by itself; kept for code written before that)."""
    return register_unite_lora(LoraConfig.from_pretrained(path_or_repo_id, **kwargs))
