"""Reproducible randomness without touching the caller's global random state.

Library code draws from ``torch.Generator`` objects it is handed or builds from a seed argument. The one
exception is code that draws from torch's *global* generator and takes no generator: the weight init
in transformers' model constructors. :func:`seeded` runs such code from a seed inside a fork of the
global state, so the result is reproducible from ``seed`` and the caller's random stream afterwards is
exactly what it was before the call (``torch.manual_seed`` inside a library function would reset it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

__all__ = ["seeded", "seeded_by_argument"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global generators seeded with ``seed``; restore their state after."""
    with torch.random.fork_rng():  # CPU and, when initialised, every CUDA device
        torch.manual_seed(seed)
        yield


def seeded_by_argument(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run ``fn`` under :func:`seeded` with the value of its own ``seed`` argument."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with seeded(bound.arguments["seed"]):
            return fn(*args, **kwargs)

    return wrapper
