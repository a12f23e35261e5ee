"""Pareto filtering and hypervolume against hand-computed cases and brute-force cell counting."""

import itertools

import numpy as np
import pytest

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.pareto import (
    common_reference_point,
    hypervolume,
    non_dominated_mask,
    pareto_front,
)


def test_non_dominated_2d_by_hand():
    points = [[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0, 3], [2.5, 0.5]]
    # (1,1) is dominated by (2,2); (0,3) by (1,3); (2.5,0.5) by (3,1); the duplicate (2,2) is kept
    assert non_dominated_mask(points).tolist() == [True, True, True, False, True, False, False]
    assert pareto_front(points).tolist() == [[1, 3], [2, 2], [3, 1]]


def test_non_dominated_3d_by_hand():
    points = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0.5], [0.4, 0.4, 0.4], [1, 0, 1]]
    # (0.4,)*3 < (0.5,)*3; (1,0,0) and (0,0,1) are dominated by (1,0,1)
    assert non_dominated_mask(points).tolist() == [False, True, False, True, False, True]


def test_hypervolume_2d_staircase():
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(3 + 2 + 1)
    # the reference point shifts every box; a point below the reference counts for nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [-1, 5]], [0.5, 0.5]) == pytest.approx(0.5 * 2.5 + 1 * 1.5 + 1 * 0.5)
    assert hypervolume([[-1, -1]], [0, 0]) == 0.0


def test_hypervolume_3d_inclusion_exclusion():
    # three boxes of volume 2 sharing the unit cube pairwise and all together: 3*2 - 3*1 + 1 = 4
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0)
    assert hypervolume([[1, 1, 1]], [0, 0, 0]) == pytest.approx(1.0)
    assert hypervolume([[1, 2, 3]], [0.5, 0.5, 0.5]) == pytest.approx(0.5 * 1.5 * 2.5)


@pytest.mark.parametrize("dims", [2, 3, 4])
def test_hypervolume_matches_cell_counting(dims):
    rng = np.random.default_rng(dims)
    points = rng.integers(0, 6, size=(12, dims))
    cells = 0
    for cell in itertools.product(range(6), repeat=dims):  # unit cell [c, c+1]^d is covered iff c+1 <= p for some p
        cells += bool((points >= np.asarray(cell) + 1).all(1).any())
    assert hypervolume(points, [0] * dims) == pytest.approx(cells)


def test_reference_point_and_bad_input():
    ref = common_reference_point([np.array([[0.0, 1.0], [1.0, 3.0]]), np.array([[2.0, 2.0]])], margin=0.5)
    assert ref.tolist() == [-1.0, 0.0]
    with pytest.raises(DiffusionBlendError, match="objectives"):
        hypervolume([[1, 2]], [0, 0, 0])
    with pytest.raises(DiffusionBlendError, match="NaN"):
        non_dominated_mask([[1.0, float("nan")]])
