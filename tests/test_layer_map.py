"""The one layer map (unite_hf.layer_map), against maps written out by hand, ties included."""

import pytest

from unite_hf.layer_map import map_layers
from unite_hf.llama_targets import map_layers as scaling_map_layers
from unite_hf.targets import select_layers

# (source layers L, target layers L') -> the map, worked out by hand from j * (L - 1) / (L' - 1):
HAND_MAPS = {
    (6, 3): [0, 3, 5],  # 0, 2.5, 5: the tie goes up (round() gave [0, 2, 5])
    (4, 3): [0, 2, 3],  # 0, 1.5, 3: tie up (round() also 2: 2 is even)
    (8, 3): [0, 4, 7],  # 0, 3.5, 7: tie up (round() also 4)
    (10, 3): [0, 5, 9],  # 0, 4.5, 9: tie up (round() gave 4)
    (3, 5): [0, 1, 1, 2, 2],  # 0, .5, 1, 1.5, 2: two ties, both up (round() gave [0, 0, 1, 2, 2])
    (5, 9): [0, 1, 1, 2, 2, 3, 3, 4, 4],  # every odd j is a tie
    (30, 4): [0, 10, 19, 29],  # 0, 9.67, 19.33, 29: no tie
    (5, 3): [0, 2, 4],  # exact
    (6, 6): [0, 1, 2, 3, 4, 5],  # identity
    (2, 2): [0, 1],
    (7, 1): [0],  # one target layer: the first source layer
    (1, 3): [0, 0, 0],  # one source layer, repeated
}


@pytest.mark.parametrize(("shape", "expected"), HAND_MAPS.items(), ids=[f"{s}->{t}" for s, t in HAND_MAPS])
def test_map_layers_matches_hand_made_maps(shape, expected):
    assert map_layers(*shape) == expected


@pytest.mark.parametrize(("shape", "expected"), [(k, v) for k, v in HAND_MAPS.items() if k[1] <= k[0]])
def test_unite_uniform_selection_and_masa_scaling_use_the_same_map(shape, expected):
    assert select_layers(*shape, "uniform") == expected  # UNITE targets (depth <= source)
    assert scaling_map_layers is map_layers  # MASA / XPERT scaling: the same function, re-exported


def test_first_selection_and_bad_counts():
    assert select_layers(6, 3, "first") == [0, 1, 2]
    for bad in ((0, 3), (3, 0), (-1, 2)):
        with pytest.raises(ValueError, match="at least one source and one target layer"):
            map_layers(*bad)
    with pytest.raises(ValueError, match="out of range"):
        select_layers(3, 5, "uniform")  # a UNITE target is never deeper than its source
