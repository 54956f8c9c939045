"""Tensor decompositions of stacked per-layer weight matrices: where the "gene" comes from.

UNITE fuses the experts of each MoE layer into one matrix per projection (gate / up / down) and
stacks the ``L`` fused matrices of one projection into a third-order tensor

    X  with shape (L, d_out, d_in),   X[l] = fused weight matrix of layer l.

Every method in this module writes its result in one common *Tucker form*

    X_hat = G x_1 U_L x_2 U_out x_3 U_in,
    X_hat[l] = U_out @ G_l @ U_in.T,    G_l = sum_k U_L[l, k] * G[k]          (r_out x r_in)

with core ``G`` (r_L, r_out, r_in), layer factor ``U_L`` (L, r_L), output basis ``U_out`` and
input basis ``U_in``.  The shared bases ``U_out`` / ``U_in`` are the gene; a target layer is grown
from them and its own small core ``G_l``.  The three methods are defined exactly as follows.

``"tucker"`` (the UNITE method)
    Rank-(r_L, r_out, r_in) Tucker decomposition computed by higher-order orthogonal iteration
    (HOOI), initialised with the truncated higher-order SVD (HOSVD).  It (locally) minimises
    ``||X - G x_1 U_L x_2 U_out x_3 U_in||_F`` over factors with orthonormal columns; for such
    factors the optimal core is ``G = X x_1 U_L^T x_2 U_out^T x_3 U_in^T``.  ``U_out`` (d_out, r_out)
    and ``U_in`` (d_in, r_in) are shared by all layers.

``"cp"`` (CANDECOMP/PARAFAC baseline)
    Rank-R CP decomposition with a single rank ``R = r_out`` (so r_L = r_out = r_in = R):

        X[l] ~= sum_{r<R} lambda_r * U_L[l, r] * outer(U_out[:, r], U_in[:, r]),

    fitted by alternating least squares (``tensorly.decomposition.parafac``, ``init="svd"``,
    fixed ``random_state``).  Columns of ``U_L``, ``U_out``, ``U_in`` have unit norm (they are *not*
    orthogonal), ``lambda >= 0`` sorted in decreasing order, and the Tucker-form core is the
    superdiagonal tensor ``G[r, r, r] = lambda_r`` (zero elsewhere).  Because CP ranks are not bounded
    by the mode sizes, ``R`` may exceed ``L``; it must not exceed ``d_out`` or ``d_in``.  Note that
    the dense (R, R, R) core costs ``4 R^3`` bytes (512 MiB at R = 512).

``"svd"`` (per-layer baseline, no sharing across layers)
    Independent truncated SVD of every layer with one rank ``r = r_out = r_in``:

        X[l] ~= U_l @ diag(s_l) @ V_l.T,   U_l (d_out, r), s_l the r largest singular values, V_l (d_in, r),

    the best rank-r approximation of each layer (Eckart-Young).  In Tucker form: ``out_factor``
    (L, d_out, r) with ``out_factor[l] = U_l``, ``in_factor`` (L, d_in, r) with ``in_factor[l] = V_l``,
    ``core`` (L, r, r) with ``core[l] = diag(s_l)`` and ``layer_factor = I_L`` (r_L = L), so that
    ``G_l = core[l]`` and the bases are per layer (``shared_bases`` is False).

``"tucker_hidden"`` (bases shared along the hidden axis only; beyond the paper)
    The residual stream is one space for every layer, but FFN neuron indices do not correspond
    across layers, so a neuron-axis basis shared by all layers keeps little of each layer. This
    method shares one orthonormal basis ``U_h`` only along the hidden (residual-stream) axis given
    by ``hidden_mode`` (``"in"`` for gate/up, ``"out"`` for down) and gives every layer its own
    orthonormal factor ``A_l`` along the neuron axis (for ``hidden_mode="in"``):

        X[l] ~= A_l @ G_l @ U_h.T,   A_l (d_out, r_out) per layer, U_h (d_in, r_in) shared,

    fitted by alternating least squares on orthonormal factors: ``U_h`` = top-r_in eigenvectors of
    ``sum_l X_l^T A_l A_l^T X_l`` (initially ``sum_l X_l^T X_l``), then per layer the rank-r_out
    truncated SVD ``X_l U_h = A_l S_l B_l^T``, ``G_l = S_l B_l^T`` (the optimal per-layer fit for
    the given ``U_h``); ``||X - X_hat||`` never increases. ``r_L = L`` (no compression across
    layers: ``layer_factor = I_L``). ``X_l U_h`` has rank at most ``r_hidden``, so neuron-axis
    columns past it only complete an orthonormal basis (zero rows of ``G_l``). In Tucker form the shared factor is 2D
    and the per-layer one 3D (``out_factor`` (L, d_out, r_out) here). At full ranks it is exact.

**Activation-aware bases** (``input_weight=S``, any method): the kept subspace should be the one
the layer's inputs occupy, not the one that fits the weights best (SVD-LLM, ASVD). With ``S`` a
square root of the inputs' second moment ``E[x x^T]`` (``(d_in, d_in)`` for all layers, or
``(L, d_in, d_in)`` per layer), ``||W x - W_hat x||`` averaged over inputs is ``||(W - W_hat) S||_F``,
so the method runs on ``X_l S`` and the input factor is un-weighted afterwards
(``U_in <- S^{-1} U_in``, no longer orthonormal). A shared input factor needs one shared ``S``.
``relative_error`` is then measured on the un-weighted ``X``; ``spectral_energy`` describes ``X S``.

Ranks are ``(r_L, r_out, r_in)``; an integer ``r`` means ``(L, r, r)`` (no compression across
layers; for "cp" it means ``(r, r, r)``).  Factor columns are sign-normalised (the entry of largest
magnitude of each column is positive) so results are reproducible across runs.

``spectral_energy[mode]`` is the cumulative fraction of squared singular values of the mode-n
unfolding of X (mode "layer" = rows indexed by l, "out" = by output row, "in" = by input column):
entry ``k - 1`` is the fraction of ``||X||_F^2`` captured by the top-k singular vectors of that
mode.  It describes X, not the fit, and is the same for every method.

Layout of this package: :mod:`.base` (the :class:`Decomposition` result and shared linear algebra),
:mod:`.registry` (methods and rank rules), :mod:`.api` (``decompose``, ``decompose_streaming``,
activation-aware bases), :mod:`.streaming` (the layer-streaming HOOI), and one module per method:
:mod:`.tucker`, :mod:`.cp`, :mod:`.svd`, :mod:`.tucker_hidden`. Every name importable from
``unite_hf.decomposition`` before the split still is.
"""

from __future__ import annotations

from .api import decompose, decompose_streaming, input_axis_is_per_layer, input_weight_from_moment
from .base import DEFAULT_RANK, MODES, Decomposition
from .registry import DECOMPOSITIONS, NEEDS_HIDDEN_MODE, DecompositionFn, register_decomposition, resolve_ranks  # noqa: F401
from .streaming import EIGH_LIMIT, OVERSAMPLE, LayerFn  # noqa: F401  (re-exported, as before the split)

# The methods register themselves when imported, in this order: the registry's order (the CLI lists it).
from .tucker import tucker_hooi  # noqa: F401, I001
from .cp import cp_parafac  # noqa: F401
from .svd import per_layer_svd  # noqa: F401
from .tucker_hidden import tucker_hidden  # noqa: F401

__all__ = [
    "DECOMPOSITIONS",
    "DEFAULT_RANK",
    "MODES",
    "Decomposition",
    "decompose",
    "decompose_streaming",
    "NEEDS_HIDDEN_MODE",
    "input_axis_is_per_layer",
    "input_weight_from_moment",
    "register_decomposition",
    "resolve_ranks",
]
