"""Output-matched refits: fit a decomposed gene's cores to the source's routed output on calibration text.

Fusion and decomposition fit the experts' *weights*; a dense FFN cannot reproduce per-token routing
that way. A refit keeps the gene's bases and re-fits each MoE layer's cores so that the rebuilt FFN
matches what the source's routed experts output on calibration tokens (shared experts stay as they are
and are subtracted from the target):

- ``"none"``: the paper's pipeline, cores as the decomposition left them;
- ``"ridge"``: the closed-form ridge solution for ``down``'s core given the rebuilt gate/up (linear in
  that core), from streamed statistics ``Z^T Z`` and ``T^T Z`` in the bases' coordinates (``r_in x r_in``
  per layer, never ``width x width``);
- ``"distill"``: ridge, then Adam on all cores of the layer against the mean squared error of the
  routed output (what a linear readout cannot fix).

Each layer's inputs come from the source itself (``sequential=False``: one pass for every layer) or
from the source with every earlier MoE layer already replaced by its refitted FFN (``sequential=True``:
what a full-depth target sees; one partial pass per layer). A refit writes per-layer cores (the layer
factor becomes the identity), so a target grown at the gene's ranks inherits them exactly; a smaller
target rank truncates a refitted core, which is then no longer the least-squares optimum.
"""

from __future__ import annotations

from .base import REFITS, RefitOptions, get_refit, refit_decompositions, register_refit
from . import ridge as _ridge  # noqa: F401  (registers "ridge")
from . import distill as _distill  # noqa: F401  (registers "distill")

__all__ = ["REFITS", "RefitOptions", "get_refit", "refit_decompositions", "register_refit"]
