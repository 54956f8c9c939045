"""Paired comparisons of two models scored on the same evaluation examples.

Downstream differences at our scale are a few points on a few hundred examples, about the size of the
noise: a claim counts only when the 95% interval of the difference excludes 0. The interval is a
paired bootstrap over examples (both models are scored on each resampled example), with each model's
per-example outcome first averaged over its seeds, so that seed noise and example noise both count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """Mean accuracy difference ``a - b`` and its paired bootstrap interval."""

    difference: float
    low: float
    high: float
    examples: int
    seeds_a: int
    seeds_b: int
    confidence: float

    @property
    def confirmed(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "confirmed": self.confirmed}


def _outcomes(runs: Sequence[Sequence[int]], name: str) -> np.ndarray:
    if not runs:
        raise ValueError(f"paired_difference: no runs for {name}")
    if len({len(run) for run in runs}) != 1:
        raise ValueError(f"paired_difference: every run of {name} must score the same examples (0/1 outcomes)")
    array = np.asarray(runs, dtype=float)
    if array.ndim != 2 or not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"paired_difference: {name} must be seeds x examples of 0/1 outcomes, of one length")
    return array.mean(0)


def paired_difference(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], *, confidence: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """Accuracy of ``a`` minus that of ``b`` with a paired bootstrap (percentile) interval.

    Args:
        a, b: per-example outcomes (1 correct, 0 wrong), one list per seed, every list in the same example
            order (``finetune(...)["correct"]``).
        confidence: the interval's coverage.
        resamples: bootstrap resamples (scipy.stats.bootstrap, paired over examples).
        seed: the resampling seed (the interval is reproducible).
    """
    from scipy.stats import bootstrap

    mean_a, mean_b = _outcomes(a, "a"), _outcomes(b, "b")
    if mean_a.shape != mean_b.shape:
        raise ValueError(f"paired_difference: a scores {mean_a.size} examples, b {mean_b.size}; they must match")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    differences = mean_a - mean_b
    if np.ptp(differences) == 0:  # every resample gives the same mean: the interval is a point
        low = high = float(differences[0])
    else:
        import inspect

        generator = np.random.default_rng(seed)  # scipy < 1.15 names it random_state
        key = "rng" if "rng" in inspect.signature(bootstrap).parameters else "random_state"
        result = bootstrap((differences,), np.mean, confidence_level=confidence, n_resamples=resamples,
                           method="percentile", vectorized=True, **{key: generator})
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return PairedDifference(float(differences.mean()), low, high, int(differences.size), len(a), len(b), confidence)
