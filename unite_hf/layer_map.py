"""The one map from target layers to source layers, used by UNITE targets and MASA/XPERT scaling.

Target layer ``j`` of ``L'`` takes source layer ``floor(j * (L - 1) / (L' - 1) + 1/2)``: a uniform
stretch of ``[0, L')`` onto ``[0, L)`` that keeps the first layer first and the last layer last, with
**halves rounded up**.

Why halves up and not Python's ``round()`` (halves to the nearest even integer): the rule should
depend only on where a target layer falls, never on the parity of the source layer next to it.
Rounding to even sends a tie to whichever neighbour happens to be even, so equal positions map
differently: 3 -> 5 layers with ``round()`` is ``[0, 0, 1, 2, 2]`` (source layer 1 used once, the
others twice); halves up give ``[0, 1, 1, 2, 2]``, and 6 -> 3 gives ``[0, 3, 5]`` where ``round()``
gave ``[0, 2, 5]``. Until this module, UNITE's ``layer_selection="uniform"`` used ``round()`` and
MASA halves up; targets grown with ``"uniform"`` at a depth where a tie occurs now take the upper
layer (a saved target keeps the map it was built with: ``config.source_layers``).
"""

from __future__ import annotations

__all__ = ["map_layers"]


def map_layers(source_layers: int, target_layers: int) -> list[int]:
    """Source layer index behind each target layer: a uniform stretch, halves rounded up.

    Works for ``target_layers < source_layers`` (layers skipped) and ``target_layers > source_layers``
    (layers repeated); a single target layer takes source layer 0.

    Raises:
        ValueError: fewer than one source or target layer.
    """
    if isinstance(source_layers, bool) or isinstance(target_layers, bool) or source_layers < 1 or target_layers < 1:
        raise ValueError(f"need at least one source and one target layer, got {source_layers} and {target_layers}")
    if target_layers == 1:
        return [0]
    # exact in integers: floor((2 j (L-1) + (L'-1)) / (2 (L'-1))) == floor(j (L-1) / (L'-1) + 1/2), no float ties
    return [(2 * j * (source_layers - 1) + target_layers - 1) // (2 * (target_layers - 1)) for j in range(target_layers)]
