"""LoRA on the UNITE FFN inside peft: the layer, its registration with every ``LoraConfig``, and merges.

peft's LoRA knows ``nn.Linear`` and friends; a UNITE FFN projection is a
:class:`~unite_hf.modeling_unite.UniteFactorizedLinear` (``W = U_out @ G @ U_in.T``, run as
``forward(x, bases)``). :class:`UniteLoraLinear` is peft's LoRA ``Linear`` around one: the base projection
runs as it is and the adapter adds ``s * B(A(dropout(x)))`` (``s = alpha / r``), bases and core frozen.

**Registration.** ``import unite_hf`` calls :func:`register_with_peft`: every ``peft.LoraConfig`` created from
then on carries the mapping ``UniteFactorizedLinear -> UniteLoraLinear`` (peft's custom-module API,
``LoraConfig._register_custom_module``, which peft reads when it builds the adapter's layers). So peft's own
calls reach the FFN: ``get_peft_model(target, LoraConfig(target_modules=["up"]))``,
``PeftModel.from_pretrained(target, adapter)`` and ``AutoPeftModelFor*.from_pretrained(adapter)`` (an adapter
from the Hub included), which build their ``LoraConfig`` from the saved ``adapter_config.json``. The mapping
is not serialized (peft writes only the config's fields), so adapters stay plain peft LoRA adapters. It
changes nothing for other models: the first dispatcher peft tries matches UNITE projections only.

**Merges.** ``merge_and_unload()`` / ``merge_adapter()`` can keep a target's form only where the update
lies in the span of the projection's bases, ``B A = P_out B A P_in`` (``P`` the orthogonal projections onto
the columns of ``U_out`` and ``U_in``; a side at full rank stores no basis and spans everything): then the
merged core is ``G + s U_out^+ B A U_in^+T`` and ``U_out G' U_in^T = W + s B A`` exactly. Otherwise the
dense update cannot be written in the bases, and the merge is refused *before peft merges anything* (the
attention adapters included; peft merges module by module), naming each projection and the share of its
update outside the span: the model, its ``disable_adapter()`` output and a later adapter save stay as they
were. :func:`register_with_peft` puts that check in front of ``LoraModel.merge_adapter`` and
``LoraModel._unload_and_optionally_merge`` (the one place every merge passes through).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _LoraLinear
from peft.tuners.lora.model import LoraModel

from .modeling_unite import UniteBases, UniteFactorizedLinear, UniteFFN

EXACT_MERGE_EPS = 4
"""A merge counts as exact when the update's part outside the bases' span is at most this many epsilons
(of the adapter's dtype) times ``s ||B||_F ||A||_F``: rounding ``B`` and ``A`` to their dtype moves an update
that lies in the span by at most one epsilon of that (half an epsilon each); a real LoRA update outside
a truncated basis leaves a fraction of order ``1 - r / d`` outside."""


class UniteMergeError(NotImplementedError):
    """A LoRA update of a factorized UNITE projection does not lie in the span of its bases, so it cannot
    be merged into the core; raised before anything is merged."""


class UniteLoraLinear(_LoraLinear):
    """peft's LoRA ``Linear`` around a :class:`UniteFactorizedLinear`: the base projection runs as it
    is (``forward(x, bases)``), the adapter adds ``scale * B(A(dropout(x)))``."""

    def _get_in_out_features(self, module: UniteFactorizedLinear) -> tuple[int, int]:
        return module.d_in, module.d_out

    def _get_base_layer_device_and_dtype(self, base_layer: UniteFactorizedLinear):
        return base_layer.core.device, base_layer.core.dtype

    def _merge_bases(self) -> UniteBases:
        # set by prepare_unite_merge (tied bases belong to the model: the wrapper cannot find them itself)
        bases = self.__dict__.get("_unite_bases")
        if bases is None:
            raise UniteMergeError("merge a UNITE LoRA adapter through the model (PeftModel.merge_and_unload() or "
                                  "merge_adapter()), which finds each projection's bases; not layer by layer")
        return bases

    def core_update(self, adapter: str, bases: UniteBases) -> tuple[torch.Tensor, float, float]:
        """``(s U_out^+ B A U_in^+T, outside, scale)`` in float64: the core's update, the Frobenius norm of
        the part of ``s B A`` outside the bases' span, and ``s ||B||_F ||A||_F``."""
        B = self.lora_B[adapter].weight.detach().double()  # (d_out, r)
        A = self.lora_A[adapter].weight.detach().double()  # (r, d_in)
        s = float(self.scaling[adapter])
        out_basis = None if bases.out_basis is None else bases.out_basis.detach().double().to(B.device)
        in_basis = None if bases.in_basis is None else bases.in_basis.detach().double().to(A.device)
        B_core = B if out_basis is None else torch.linalg.pinv(out_basis) @ B  # (r_out, r)
        A_core = A if in_basis is None else A @ torch.linalg.pinv(in_basis).T  # (r, r_in)
        B_in_span = B if out_basis is None else out_basis @ B_core
        A_in_span = A if in_basis is None else A_core @ in_basis.T
        # B A - P_out B A P_in = (B - P_out B) A + (P_out B)(A - A P_in) = L M, L = [B_perp, B_par], M = [A; A_perp];
        # ||L M||_F^2 = trace(L^T L M M^T), from (2r x 2r) Grams: no (d_out x d_in) matrix is formed
        L = torch.cat([B - B_in_span, B_in_span], dim=1)
        M = torch.cat([A, A - A_in_span], dim=0)
        outside = abs(s) * math.sqrt(max(float(((L.T @ L) * (M @ M.T)).sum()), 0.0))
        return s * (B_core @ A_core), outside, abs(s) * float(B.norm()) * float(A.norm())

    def merge_problem(self, adapter: str, bases: UniteBases) -> str | None:
        """Why ``adapter`` cannot be merged exactly (``None``: it can)."""
        if adapter in getattr(self, "lora_variant", {}):
            return f"a {type(self.lora_variant[adapter]).__name__} adapter (only plain LoRA merges into a core)"
        if self.lora_bias.get(adapter, False) and self.get_base_layer().bias is None:
            return "lora_bias=True, but the projection has no bias"
        _, outside, scale = self.core_update(adapter, bases)
        eps = torch.finfo(self.lora_B[adapter].weight.dtype).eps
        if outside <= EXACT_MERGE_EPS * eps * scale:
            return None
        B, A = self.lora_B[adapter].weight.detach().double(), self.lora_A[adapter].weight.detach().double()
        update = abs(float(self.scaling[adapter])) * math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))
        return f"{100 * outside / update:.3g}% of the update (Frobenius norm) lies outside the span of its bases"

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = _to_merge(self, adapter_names)
        if not adapter_names:
            return
        bases = self._merge_bases()
        problems = {name: self.merge_problem(name, bases) for name in adapter_names}
        problems = {name: why for name, why in problems.items() if why}
        if problems:
            raise UniteMergeError(f"cannot merge {sorted(problems)}: " + "; ".join(problems.values()))
        base = self.get_base_layer()
        for name in adapter_names:
            update, _, _ = self.core_update(name, bases)
            merged = (base.core.detach().double() + update.to(base.core.device)).to(base.core.dtype)
            bias = None
            if self.lora_bias.get(name, False):
                bias = base.bias.detach() + self.lora_B[name].bias.detach().to(base.bias) * self.scaling[name]
            if safe_merge and not (torch.isfinite(merged).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base.core.data = merged
            if bias is not None:
                base.bias.data = bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            return
        bases = self._merge_bases()
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            update, _, _ = self.core_update(name, bases)
            base.core.data = (base.core.detach().double() - update.to(base.core.device)).to(base.core.dtype)
            if self.lora_bias.get(name, False):
                base.bias.data = base.bias.detach() - self.lora_B[name].bias.detach().to(base.bias) * self.scaling[name]


def _to_merge(layer: UniteLoraLinear, adapter_names: list[str] | None) -> list[str]:
    """The adapters a merge of ``adapter_names`` (default: the active ones) merges into ``layer``, as
    peft's ``check_adapters_to_merge`` chooses them (without its warnings: the layer's merge warns)."""
    names = layer.active_adapters if adapter_names is None else adapter_names
    if isinstance(names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {names!r}.")
    return [name for name in names if name in layer.lora_A and name not in layer.merged_adapters]


def prepare_unite_merge(model: torch.nn.Module, adapter_names: list[str] | None = None) -> None:
    """Give every :class:`UniteLoraLinear` of ``model`` its bases, and raise :class:`UniteMergeError` now,
    before anything is merged, if one of the adapters a merge of ``adapter_names`` would merge does not
    lie in its bases' span (see the module docstring)."""
    problems = []
    for ffn_name, ffn in model.named_modules():
        if not isinstance(ffn, UniteFFN):
            continue
        for proj in ffn.projections:
            layer = getattr(ffn, proj)
            if not isinstance(layer, UniteLoraLinear):
                continue
            bases = ffn._bases(proj)
            layer.__dict__["_unite_bases"] = bases  # a lookup, not a submodule (tied bases belong to the model)
            for name in _to_merge(layer, adapter_names):
                why = layer.merge_problem(name, bases)
                if why:
                    problems.append(f"{ffn_name}.{proj} (adapter {name!r}): {why}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UniteMergeError(
            "cannot merge the LoRA adapter into the factorized UNITE FFN: its update s B A is not of the form "
            f"U_out X U_in^T in the projection's bases, so the merged weight has no core: {shown}. Nothing was "
            "merged (the other modules' adapters neither). Keep the adapter separate (the PeftModel), grow the "
            "target at full rank on the sides the update needs (a side at full rank stores no basis and merges "
            "exactly), or fine-tune the cores with unite_hf.training.set_trainable(model, 'cores') instead.")


def register_unite_lora(config: LoraConfig) -> LoraConfig:
    """Register :class:`UniteLoraLinear` for UNITE projections on ``config`` (returned)."""
    config._register_custom_module({UniteFactorizedLinear: UniteLoraLinear})
    return config


def _merge_guarded(method):
    signature = inspect.signature(method)

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs)
        arguments.apply_defaults()
        if arguments.arguments.get("merge", True):  # merge_adapter always merges; unload() does not
            prepare_unite_merge(self.model, arguments.arguments.get("adapter_names"))
        return method(self, *args, **kwargs)

    guarded._unite_hf = True
    return guarded


def register_with_peft() -> None:
    """Make peft's LoRA know UNITE projections (``import unite_hf`` calls it; calling it again does nothing):
    every ``LoraConfig`` registers :class:`UniteLoraLinear` when it is created, and LoRA merges check the
    UNITE projections before merging anything (see the module docstring)."""
    if getattr(LoraConfig.__post_init__, "_unite_hf", False):
        return
    post_init = LoraConfig.__post_init__

    @functools.wraps(post_init)
    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        register_unite_lora(self)

    __post_init__._unite_hf = True
    for name in ("merge_adapter", "_unload_and_optionally_merge"):
        setattr(LoraModel, name, _merge_guarded(getattr(LoraModel, name)))
    LoraConfig.__post_init__ = __post_init__


__all__ = ["EXACT_MERGE_EPS", "UniteLoraLinear", "UniteMergeError", "prepare_unite_merge", "register_unite_lora",
           "register_with_peft"]
