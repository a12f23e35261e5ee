"""Pareto fronts and hypervolume for multi-reward evaluation (maximisation; paper section 6.1, Pareto plots).

Every objective is maximised. A point ``p`` *dominates* ``q`` when ``p >= q`` in every objective and ``p > q`` in
at least one. The hypervolume of a set against a reference point ``ref`` is the Lebesgue measure of the union of the
boxes ``[ref, p]`` over the points (coordinates at or below ``ref`` contribute nothing).

Algorithms and cost (``n`` points, ``m`` objectives):

- :func:`non_dominated_mask`: pairwise comparison, ``O(m n^2)`` time, ``O(n^2)`` memory in blocks of rows
  (fronts in evaluation have tens to thousands of points).
- :func:`hypervolume`: exact. ``m = 1``: the maximum. ``m = 2``: sort and sweep, ``O(n log n)``. ``m >= 3``:
  hypervolume by slicing objectives (HSO, While et al. 2006): sort by the last objective, cut the dominated region
  into slabs between consecutive distinct values and recurse on the ``(m-1)``-dimensional projection of the points
  above each slab, ``O(n^(m-1) log n)`` in the worst case; fine for the 2-4 rewards of the paper and fronts of
  up to a few hundred points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusion_blend.errors import DiffusionBlendError


def _as_points(points: Sequence[Sequence[float]] | np.ndarray, what: str = "points") -> np.ndarray:
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DiffusionBlendError(f"{what} must be numeric, got {points!r}") from err
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, 1)
    if array.ndim != 2:
        raise DiffusionBlendError(f"{what} must have shape (n_points, n_objectives), got {array.shape}")
    if not np.isfinite(array).all():
        raise DiffusionBlendError(f"{what} contain NaN or infinite values")
    return array


def non_dominated_mask(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (maximisation). Duplicates are all kept."""
    array = _as_points(points)
    n = array.shape[0]
    mask = np.ones(n, dtype=bool)
    for start in range(0, n, 512):
        block = array[start : start + 512]  # (b, m)
        geq = (array[None, :, :] >= block[:, None, :]).all(-1)  # other >= this everywhere
        gt = (array[None, :, :] > block[:, None, :]).any(-1)
        mask[start : start + 512] = ~(geq & gt).any(1)
    return mask


def pareto_front(points: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """The non-dominated points, sorted lexicographically by the first objective (ascending), duplicates removed."""
    array = _as_points(points)
    front = np.unique(array[non_dominated_mask(array)], axis=0)
    return front


def _hv_2d(points: np.ndarray, ref: np.ndarray) -> float:
    order = np.argsort(-points[:, 0], kind="stable")  # descending in x
    volume, best_y = 0.0, ref[1]
    for x, y in points[order]:
        if y > best_y:
            volume += (x - ref[0]) * (y - best_y)
            best_y = y
    return float(volume)


def _hv_slicing(points: np.ndarray, ref: np.ndarray) -> float:
    m = points.shape[1]
    if points.shape[0] == 0:
        return 0.0
    if m == 1:
        return float(points[:, 0].max() - ref[0])
    if m == 2:
        return _hv_2d(points, ref)
    levels = np.unique(points[:, -1])[::-1]  # descending distinct values of the last objective
    volume = 0.0
    for k, top in enumerate(levels):
        bottom = levels[k + 1] if k + 1 < len(levels) else ref[-1]
        above = points[points[:, -1] >= top, :-1]
        above = above[non_dominated_mask(above)]
        volume += (top - bottom) * _hv_slicing(above, ref[:-1])
    return float(volume)


def hypervolume(points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by ``points`` above ``reference`` (maximisation; see module docstring)."""
    array = _as_points(points)
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if not np.isfinite(ref).all():
        raise DiffusionBlendError("the hypervolume reference point contains NaN or infinite values")
    if array.shape[0] and array.shape[1] != ref.shape[0]:
        raise DiffusionBlendError(f"points have {array.shape[1]} objectives but the reference point {ref.shape[0]}")
    inside = array[(array > ref).all(1)] if array.shape[0] else array
    if inside.shape[0] == 0:
        return 0.0
    inside = np.unique(inside[non_dominated_mask(inside)], axis=0)
    return _hv_slicing(inside, ref)


def common_reference_point(point_sets: Sequence[np.ndarray], margin: float = 0.1) -> np.ndarray:
    """A reference point below every set: the per-objective minimum minus ``margin`` times the range (or 1 if 0)."""
    arrays = [_as_points(p) for p in point_sets if len(p)]
    if not arrays:
        raise DiffusionBlendError("no points to choose a reference point from")
    stacked = np.concatenate(arrays)
    low, high = stacked.min(0), stacked.max(0)
    spread = np.where(high > low, high - low, 1.0)
    return low - margin * spread
