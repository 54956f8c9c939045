"""The entry points: :func:`decompose` (in memory), :func:`decompose_streaming` (one layer at a time)
and the activation-aware wrapper both share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import _PROGRESS_LABEL, Decomposition, _finalise, _relative_error, _sq_norm
from .registry import DECOMPOSITIONS, NEEDS_HIDDEN_MODE, _as_int_rank, _check_method, resolve_ranks
from .streaming import _Layers, _streaming_hooi


def _check_iterations(n_iter_max: int, tol: float) -> int:
    """``n_iter_max`` as a non-negative int; ``tol`` must be >= 0 (and not NaN)."""
    n_iter_max = _as_int_rank(n_iter_max, "n_iter_max")
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max must be >= 0, got {n_iter_max}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return n_iter_max


def decompose(
    tensor: torch.Tensor,
    method: str = "tucker",
    rank: int | tuple[int, int, int] | None = None,
    *,
    n_iter_max: int = 25,
    tol: float = 1e-6,
    show_progress: bool = False,
    name: str = "",
    hidden_mode: str | None = None,
    input_weight: torch.Tensor | None = None,
) -> Decomposition:
    """Decompose X (L, d_out, d_in) with a registered method; see the module docstring.

    Args:
        tensor: 3D floating tensor, non-empty, finite, not all zero.  Computation runs in float64
            when given float64 and in float32 otherwise; returned factors are float32.
        method: "tucker" (HOOI), "cp" (PARAFAC ALS) or "svd" (per layer), or any registered name.
        rank: None (default 512, clipped), int r, or (r_L, r_out, r_in); see :func:`resolve_ranks`.
        n_iter_max: maximum iterations (HOOI sweeps for tucker, ALS sweeps for cp; unused by svd).
        tol: stop when the relative change of the core norm (tucker) / the absolute change of the
            relative reconstruction error (cp, tensorly's criterion) drops below it.
        show_progress: tqdm bar over the iterations.
        name: label for warnings and the progress bar (e.g. "gate").
        hidden_mode: ``"in"`` or ``"out"``: which matrix axis is the hidden (residual-stream) one;
            required by methods that share bases only along it (``tucker_hidden``), ignored otherwise.
        input_weight: activation-aware bases: ``S`` with ``S S^T = E[x x^T]`` of the layer inputs,
            ``(d_in, d_in)`` or per layer ``(L, d_in, d_in)``, symmetric positive definite (see
            :func:`input_weight_from_moment`); the module docstring says what changes.

    Raises:
        TypeError: non-tensor or non-floating input, non-int rank.
        ValueError: bad shape, empty, NaN/Inf or all-zero input, bad rank, unknown method.
    """
    _check_method(method)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != 3:
        raise ValueError(f"tensor must be 3D (L, d_out, d_in), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be floating point, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"tensor is empty (shape {tuple(tensor.shape)})")
    n_iter_max = _check_iterations(n_iter_max, tol)

    label = f" {name!r}" if name else ""
    if torch.isnan(tensor).any():
        raise ValueError(f"tensor{label} contains NaN values")
    if torch.isinf(tensor).any():
        raise ValueError(f"tensor{label} contains infinite values")

    token = _PROGRESS_LABEL.set(name)
    try:
        ranks = resolve_ranks(tuple(tensor.shape), method, rank)  # type: ignore[arg-type]
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        x = tensor.detach().to(dtype)
        if _sq_norm(x) == 0.0:
            raise ValueError(f"tensor{label} is all zeros; its decomposition is undefined")
        if input_weight is not None:
            return _activation_aware(x, method, ranks, input_weight, n_iter_max=n_iter_max, tol=float(tol),
                                     show_progress=show_progress, hidden_mode=hidden_mode)
        options = {}
        if method in NEEDS_HIDDEN_MODE:
            if hidden_mode not in ("in", "out"):
                raise ValueError(f"decomposition {method!r} needs hidden_mode='in' (gate/up) or 'out' (down), "
                                 f"got {hidden_mode!r}")
            options["hidden_mode"] = hidden_mode
        return DECOMPOSITIONS[method](x, ranks, n_iter_max=n_iter_max, tol=float(tol), show_progress=show_progress,
                                      **options)
    finally:
        _PROGRESS_LABEL.reset(token)


def decompose_streaming(
    layer_fn: Callable[[int], torch.Tensor],
    num_layers: int,
    shape: tuple[int, int],
    method: str = "tucker",
    rank: int | tuple[int, int, int] | None = None,
    *,
    n_iter_max: int = 25,
    tol: float = 1e-6,
    init: str = "auto",
    solver: str = "auto",
    power_iters: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    name: str = "",
) -> Decomposition:
    """Decompose X (L, d_out, d_in) given one layer at a time, never materialising X.

    ``layer_fn(l)`` returns layer ``l`` (d_out, d_in) (read from disk, fused on the fly, generated...);
    it is called a few times per layer (``1 + 2 * sweeps`` for tucker), so it should be cheap or
    read a spill file. Peak memory for tucker is one layer plus ``X U_in`` (L, d_out, r_in) and
    ``U_out^T X`` (L, r_out, d_in) plus the factors. Same :class:`Decomposition` as :func:`decompose`,
    which runs the same HOOI code in memory.

    Args:
        init: ``"hosvd"`` (exact truncated HOSVD from the out/in Gram matrices; one read of X at
            ``L d_out d_in (d_out + d_in)`` flops, what :func:`decompose` uses), ``"random"`` (a seeded
            Gaussian sketch of the in-mode range, ``L d_out d_in r_in`` flops), or ``"auto"``:
            hosvd when both matrix dimensions are at most 4096.
        solver: factor updates by exact Gram + eigh (``"eigh"``), by a warm-started block subspace
            iteration with Rayleigh-Ritz (``"subspace"``, ``power_iters`` products per sweep), or
            ``"auto"`` (eigh for modes up to ``EIGH_LIMIT``).
        dtype, device: compute dtype (float32 or float64) and device (e.g. "cuda") of the layers.

    Notes:
        ``relative_error`` is ``sqrt(1 - ||G||^2 / ||X||^2)``, exact for orthonormal factors and the
        projected core (accurate to ~1e-3 absolute in float32). ``spectral_energy`` is exact for the
        out and in modes with ``init="hosvd"``; otherwise (and for the layer mode) it is computed
        within the subspaces found (a lower bound of the true cumulative energy, truncated to
        the computed ranks).
        Methods other than tucker stack the layers in memory and call :func:`decompose`.
    """
    _check_method(method)
    num_layers = _as_int_rank(num_layers, "num_layers")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape must be (d_out, d_in) of one layer, got {tuple(shape)}")
    d_out, d_in = (_as_int_rank(s, "shape entry") for s in shape)
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"shape must be positive, got {(d_out, d_in)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if init not in ("auto", "hosvd", "random"):
        raise ValueError(f"init must be 'auto', 'hosvd' or 'random', got {init!r}")
    if solver not in ("auto", "eigh", "subspace"):
        raise ValueError(f"solver must be 'auto', 'eigh' or 'subspace', got {solver!r}")
    n_iter_max = _check_iterations(n_iter_max, tol)
    if method in NEEDS_HIDDEN_MODE:
        raise ValueError(f"decomposition {method!r} does not stream yet; extract from a loaded model instead")
    if method != "tucker":
        read = _Layers(layer_fn, num_layers, (d_out, d_in), dtype, device, None)
        stacked = torch.stack([read(layer) for layer in range(num_layers)])
        return decompose(stacked, method, rank, n_iter_max=n_iter_max, tol=tol, show_progress=show_progress, name=name)
    token = _PROGRESS_LABEL.set(name)
    try:
        ranks = resolve_ranks((num_layers, d_out, d_in), method, rank)
        if init == "auto":
            init = "hosvd" if max(d_out, d_in) <= 4096 else "random"
        core, u_l, u_out, u_in, energies, error = _streaming_hooi(
            layer_fn, num_layers, (d_out, d_in), ranks, n_iter_max=n_iter_max, tol=float(tol), init=init,
            solver=solver, power_iters=power_iters, dtype=dtype, device=device, show_progress=show_progress,
        )
        return _finalise("tucker", None, core, u_l, u_out, u_in, energies, relative_error=error)
    finally:
        _PROGRESS_LABEL.reset(token)


# --------------------------------------------------------------------------------------------
# Activation-aware bases
# --------------------------------------------------------------------------------------------


def input_weight_from_moment(moment: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """The symmetric square root ``S`` of a second-moment matrix ``E[x x^T]`` (``(d, d)`` or
    ``(L, d, d)``), with eigenvalues floored at ``eps`` times their mean so that ``S`` is invertible."""
    evals, evecs = torch.linalg.eigh(moment.double())
    floor = eps * evals.mean(-1, keepdim=True).clamp_min(1e-30)
    return (evecs * evals.clamp_min(floor).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)


def input_axis_is_per_layer(method: str, hidden_mode: str | None) -> bool:
    """Whether ``method`` gives each layer its own input factor (so a per-layer ``input_weight`` fits)."""
    per_layer = {"svd": lambda mode: True, "tucker_hidden": lambda mode: mode == "out"}
    return per_layer.get(method, lambda mode: False)(hidden_mode)


def _activation_aware(x: torch.Tensor, method: str, ranks, input_weight: torch.Tensor, *, n_iter_max: int,
                      tol: float, show_progress: bool, hidden_mode: str | None) -> Decomposition:
    n_layers, _, d_in = x.shape
    weight = input_weight.to(device=x.device, dtype=torch.float64)
    if weight.shape not in ((d_in, d_in), (n_layers, d_in, d_in)):
        raise ValueError(f"input_weight must be ({d_in}, {d_in}) or ({n_layers}, {d_in}, {d_in}), got {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("input_weight holds NaN or Inf")
    if weight.ndim == 3 and not input_axis_is_per_layer(method, hidden_mode):
        raise ValueError(f"{method!r} shares one input factor across layers; give one (d_in, d_in) input_weight")
    inverse = torch.linalg.inv(weight)
    weighted = (x.double() @ weight).to(x.dtype)
    dec = decompose(weighted, method, ranks, n_iter_max=n_iter_max, tol=tol, show_progress=show_progress,
                    hidden_mode=hidden_mode)
    in_factor = inverse.to(dec.in_factor.dtype) @ dec.in_factor  # S^{-1} U_in, per layer by broadcasting
    dec.in_factor = in_factor.float().contiguous()
    dec.relative_error = _relative_error(x, dec)
    return dec
