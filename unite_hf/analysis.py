"""Deprecated location: XPERT's routing analysis moved into XPERT's folder,
``unite_hf.methods.xpert.analysis`` (``from unite_hf import analyze_experts, ExpertAnalysis, select_experts``
is unchanged). This alias forwards every name there, with a FutureWarning; it will be removed."""

import warnings

from .methods.xpert import analysis as _moved

warnings.warn("unite_hf.analysis moved to unite_hf.methods.xpert.analysis (XPERT's folder); the alias "
              "unite_hf.analysis will be removed", FutureWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_moved, name)


def __dir__() -> list[str]:
    return dir(_moved)
