"""The registry of decomposition methods and the rank rules every method shares."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable

from .base import _PROGRESS_LABEL, DEFAULT_RANK, MODES, Decomposition


DecompositionFn = Callable[..., Decomposition]
#: name -> fn(tensor, ranks, *, n_iter_max, tol, show_progress) -> Decomposition.
#: ``tensor`` arrives validated, finite, float32/float64; ``ranks`` already resolved.
DECOMPOSITIONS: dict[str, DecompositionFn] = {}


#: methods that need to know which axis is the hidden (residual-stream) one: ``fn(..., hidden_mode=)``
NEEDS_HIDDEN_MODE: set[str] = set()


def register_decomposition(name: str, *, needs_hidden_mode: bool = False) -> Callable[[DecompositionFn], DecompositionFn]:
    """Decorator adding ``fn(tensor, ranks, *, n_iter_max, tol, show_progress)`` to the registry
    (``needs_hidden_mode``: the method also takes ``hidden_mode="in"|"out"``)."""

    def decorator(fn: DecompositionFn) -> DecompositionFn:
        if needs_hidden_mode:
            NEEDS_HIDDEN_MODE.add(name)
        existing = DECOMPOSITIONS.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ValueError(f"decomposition {name!r} is already registered (by {existing.__qualname__})")
        DECOMPOSITIONS[name] = fn
        return fn

    return decorator


def _check_method(method: str) -> None:
    if method not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition method {method!r}; registered: {sorted(DECOMPOSITIONS)}")


def _as_int_rank(value: object, what: str) -> int:
    # bool is an Integral but rank=True is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def resolve_ranks(
    shape: tuple[int, int, int], method: str, rank: int | tuple[int, int, int] | None
) -> tuple[int, int, int]:
    """Turn a user rank into (r_L, r_out, r_in) for ``method`` on a tensor of ``shape`` (L, d_out, d_in).

    * ``None`` -> the default ``DEFAULT_RANK`` (512) for the out / in modes, clipped to the
      dimensions with a warning naming the clipped mode.
    * ``int r`` -> ``(L, r, r)`` for tucker and svd, ``(r, r, r)`` for cp.
    * ``(r_L, r_out, r_in)`` -> used as given (svd needs ``r_L == L`` and ``r_out == r_in``;
      cp needs all three equal).

    Explicit ranks are never clipped: a rank <= 0 or larger than its dimension raises ValueError.
    Bounds: tucker ``r_n <= dim_n``; svd ``r <= min(d_out, d_in)``; cp ``R <= d_out`` and
    ``R <= d_in`` (R may exceed L).
    """
    _check_method(method)
    if len(shape) != 3:
        raise ValueError(f"shape must be (L, d_out, d_in), got {tuple(shape)}")
    n_layers, d_out, d_in = (int(s) for s in shape)
    dims = {"layer": n_layers, "out": d_out, "in": d_in}

    if rank is None:
        label = _PROGRESS_LABEL.get()
        where = f" of {label!r}" if label else ""
        r = DEFAULT_RANK
        bounds = {"out": d_out, "in": d_in}
        if method not in ("cp", "svd"):
            # Tucker-like: r_out and r_in are clipped independently.
            for mode, dim in bounds.items():
                if r > dim:
                    warnings.warn(
                        f"default rank {r} exceeds the {mode} dimension {dim}{where}; "
                        f"clipped the {mode} rank to {dim}",
                        stacklevel=3,
                    )
            return (n_layers, min(r, d_out), min(r, d_in))
        # cp and svd tie r_out and r_in to one rank, bounded by both matrix dimensions.
        clipped = min(r, d_out, d_in)
        if clipped < r:
            modes = [m for m, dim in bounds.items() if r > dim]
            warnings.warn(
                f"default rank {r} exceeds the {' and '.join(modes)} dimension "
                f"{' and '.join(str(bounds[m]) for m in modes)}{where}; clipped {method} rank to {clipped}",
                stacklevel=3,
            )
        return (clipped, clipped, clipped) if method == "cp" else (n_layers, clipped, clipped)

    if isinstance(rank, (tuple, list)):
        if len(rank) != 3:
            raise ValueError(f"rank tuple must be (r_L, r_out, r_in), got {tuple(rank)}")
        ranks = tuple(_as_int_rank(r, f"rank for mode {m!r}") for m, r in zip(MODES, rank))
        if method == "svd" and (ranks[0] != n_layers or ranks[1] != ranks[2]):
            raise ValueError(
                f"svd is per layer with one rank r: rank tuple must be (L={n_layers}, r, r), got {ranks}"
            )
        if method == "cp" and len(set(ranks)) != 1:
            raise ValueError(f"cp uses a single rank R = r_L = r_out = r_in, got {ranks}")
    else:
        r = _as_int_rank(rank, "rank")
        ranks = (r, r, r) if method == "cp" else (n_layers, r, r)

    for mode, r in zip(MODES, ranks):
        if r <= 0:
            raise ValueError(f"rank for mode {mode!r} must be positive, got {r}")
        if method == "cp" and mode == "layer":
            continue  # CP ranks may exceed the number of layers
        if r > dims[mode]:
            raise ValueError(
                f"rank {r} for mode {mode!r} exceeds its dimension {dims[mode]} "
                f"(tensor shape {(n_layers, d_out, d_in)}, method {method!r})"
            )
    return ranks  # type: ignore[return-value]
