"""Deprecated location: width scaling was split by concern. The plain Llama targets every method with gene
matrices shares (``masa_init``, ``llama_target_config``, the scaling registry, ``truncate_or_pad``) are in
``unite_hf.llama_targets``; MASA's adaptive scaling (``adaptive_scale``) is in MASA's folder,
``unite_hf.methods.masa.scaling``; XPERT's coupled scaling in ``unite_hf.methods.xpert.scaling``
(``from unite_hf import adaptive_scale, llama_target_config, masa_init`` is unchanged). This alias forwards
every old name there, with a FutureWarning; it will be removed."""

import warnings

from . import layer_map as _layer_map
from . import llama_targets as _llama_targets
from .methods.masa import scaling as _masa_scaling
from .methods.xpert import scaling as _xpert_scaling

warnings.warn("unite_hf.scaling was split: unite_hf.llama_targets (masa_init, llama_target_config, the scaling "
              "registry), unite_hf.methods.masa.scaling (adaptive_scale) and unite_hf.methods.xpert.scaling "
              "(coupled scaling); the alias unite_hf.scaling will be removed", FutureWarning, stacklevel=2)

# the old module's names that changed on the way
_RENAMED = {"_scaled_indices": (_llama_targets, "ranked_indices"), "_scale_each": (_llama_targets, "scale_each"),
            "_scale_coupled": (_xpert_scaling, "coupled_scale")}
_HOMES = (_llama_targets, _masa_scaling, _xpert_scaling, _layer_map)


def __getattr__(name: str):
    if name == "SCALINGS":  # a snapshot of the registry's names, as the old module had
        return tuple(_llama_targets.FFN_SCALINGS)
    if name in _RENAMED:
        module, new_name = _RENAMED[name]
        return getattr(module, new_name)
    for module in _HOMES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({"SCALINGS", *_RENAMED, *(n for m in _HOMES for n in dir(m) if not n.startswith("__"))})
