"""Mergeable per-label statistics: computed per region, merged across regions, finished once.

A `Stats` holds, for a sorted set of label ids, everything the features need: pixel count, coordinate
sums, bounding box, and per channel the sum, min, max and M2 (sum of squared deviations from the mean).
`merge` folds any number of them into one, exactly (integers) or to rounding (floats, with Chan et al.'s
parallel variance formula), so the result does not depend on how the image was cut into regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels


@dataclass
class Stats:
    """Per-label statistics for the sorted, unique `ids` (all coordinates global, z/y/x, 2D has z = 0)."""

    ids: np.ndarray  # (n,) uint64
    count: np.ndarray  # (n,) int64
    coord_sum: np.ndarray  # (n, 3) int64
    bbox_min: np.ndarray  # (n, 3) int64, inclusive
    bbox_max: np.ndarray  # (n, 3) int64, inclusive
    isum: np.ndarray  # (n, C) float64
    imin: np.ndarray  # (n, C) float64
    imax: np.ndarray  # (n, C) float64
    m2: np.ndarray  # (n, C) float64 (NaN unless the features ask: `KernelPlan.spread`)
    wcoord: np.ndarray  # (n, C, 3) float64: sum of intensity x z, y, x (intensity-weighted centroids; NaN unless asked)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, n_channels: int) -> Stats:
        z3 = np.zeros((0, 3), np.int64)
        zc = np.zeros((0, n_channels), np.float64)
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.int64), z3, z3, z3, zc, zc, zc, zc,
                   np.zeros((0, n_channels, 3), np.float64))

    def take(self, rows: np.ndarray) -> Stats:
        """The statistics of the given rows (an index or boolean mask)."""
        return Stats(**{f: getattr(self, f)[rows] for f in self.__dataclass_fields__})


def region_stats(idx: np.ndarray, ids: np.ndarray, channels: np.ndarray, origin: tuple[int, int, int],
                 spread: bool = True, weighted: bool = True) -> Stats:
    """Statistics of the labelled pixels of a (Z, Y, X) region of compact label indices.

    `ids` maps compact indices to label values, `channels` holds the (C, Z, Y, X) intensities and `origin`
    is the region's global (z, y, x) start. Labels with no pixel in the region are left out. `spread` and
    `weighted` ask for `m2` and `wcoord` (NaN without: the features that read them are not selected).
    """
    n = len(ids)
    count, coord_sum, bmin, bmax = kernels.geometry(idx, n)
    off = np.asarray(origin, np.int64)
    coord_sum += count[:, None] * off
    bmin += off
    bmax += off
    isum, imin, imax, m2, wcoord = kernels.intensities(idx, n, channels, count, spread, weighted)
    if weighted:
        wcoord += isum[:, :, None] * off  # sum(I * (local + origin)) = sum(I * local) + origin * sum(I)
    stats = Stats(ids, count, coord_sum, bmin, bmax, isum, imin, imax, m2, wcoord)
    return stats if count.all() else stats.take(count > 0)


def merge(parts: list[Stats]) -> Stats:
    """Fold several `Stats` (possibly sharing labels) into one with each label once."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise ValueError("merge needs at least one non-empty Stats")
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p.ids for p in parts])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])[order]

    count_parts = cat("count")
    count = np.add.reduceat(count_parts, starts)
    isum_parts = cat("isum")
    isum = np.add.reduceat(isum_parts, starts, axis=0)
    # Chan et al.: M2 = sum_i (M2_i + n_i (mean_i - mean)^2), with mean the merged mean.
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(ids)]))
    delta = isum_parts / count_parts[:, None] - (isum / count[:, None])[group]
    m2 = np.add.reduceat(cat("m2") + count_parts[:, None] * delta * delta, starts, axis=0)
    return Stats(
        ids=ids[starts],
        count=count,
        coord_sum=np.add.reduceat(cat("coord_sum"), starts, axis=0),
        bbox_min=np.minimum.reduceat(cat("bbox_min"), starts, axis=0),
        bbox_max=np.maximum.reduceat(cat("bbox_max"), starts, axis=0),
        isum=isum,
        # np.minimum / np.maximum propagate NaN, as np.min / np.max (and so regionprops) do.
        imin=np.minimum.reduceat(cat("imin"), starts, axis=0),
        imax=np.maximum.reduceat(cat("imax"), starts, axis=0),
        m2=m2,
        wcoord=np.add.reduceat(cat("wcoord"), starts, axis=0),
    )


class Merger:
    """Merges region statistics as they arrive, folding early so memory stays near the object table."""

    def __init__(self, n_channels: int, fold_rows: int = 1_000_000):
        self._pending: list[Stats] = []
        self._pending_rows = 0
        self._merged = Stats.empty(n_channels)
        self._fold_rows = fold_rows

    def add(self, stats: Stats) -> None:
        if not len(stats):
            return
        self._pending.append(stats)
        self._pending_rows += len(stats)
        if self._pending_rows >= max(self._fold_rows, len(self._merged)):
            self._fold()

    def _fold(self) -> None:
        if self._pending:
            self._merged = merge([self._merged, *self._pending])
            self._pending, self._pending_rows = [], 0

    def result(self) -> Stats:
        self._fold()
        return self._merged
