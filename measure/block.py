"""One block of the image: a region (its *core*) plus a halo, reduced to everything the features need.

- streaming statistics over the core (merged across blocks later);
- whole-object kernels for the objects this block *owns* (their first pixel in raster order lies in the
  core) and that look whole here (they do not touch the block's edge, unless that edge is the image's),
  with the number of pixels the block saw of each: an object made of separate pieces can look whole while
  a piece lies elsewhere, so the caller accepts a row only if that count is the object's global count, and
  measures every other object on a crop of its own (`measure_object`);
- face-sharing label pairs scanned from core pixels towards their +1 neighbours, so that each pair across
  a block border is found by exactly one block.

A block that sees all of an object sees its global first pixel as its own first pixel, and cores do not
overlap, so an accepted row comes from exactly one block: every object is measured once, on all its pixels,
whatever the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels, shape_kernels
from .accumulate import Stats, region_stats


@dataclass(frozen=True)
class KernelPlan:
    """Which kernels run, and what they need to know."""

    ndim: int
    shape: bool = False  # whole-object morphology
    feret: bool = True  # with it, the Feret diameters (2D; `shape_kernels.FERET`)
    intensity_crop: bool = False  # whole-object intensity distributions
    touching: bool = False  # face-sharing pairs
    texture: bool = False  # grey-level co-occurrence features (2D)
    spread: bool = True  # the streamed intensities' squared deviations (`Feature.streams`)
    weighted: bool = True  # the streamed intensity-weighted coordinate sums
    texture_levels: int = 16
    spacing: tuple[float, float] = (1.0, 1.0)  # (y, x) pixel size for the scaled Feret diameter
    surface_lut: tuple[float, ...] = ()  # 3D: marching-cubes area per cube configuration, voxel units
    surface_lut_um: tuple[float, ...] = ()  # 3D: the same with the physical spacing

    @property
    def crop(self) -> bool:
        return self.shape or self.intensity_crop or self.texture

    @property
    def crop_intensities(self) -> bool:
        """Whether whole-object kernels read intensities. Without them a block's intensities are needed for its
        core only, and its halo is read for the labels alone."""
        return self.intensity_crop or self.texture

    @property
    def halo_needed(self) -> bool:
        return self.crop or self.touching

    def crop_columns(self, n_channels: int) -> list[str]:
        cols = []
        if self.shape:
            cols += list(shape_kernels.MORPH_2D if self.ndim == 2 else shape_kernels.MORPH_3D)
        if self.intensity_crop:
            cols += [f"{name}__{c}" for c in range(n_channels) for name in shape_kernels.INTENSITY]
        if self.texture:
            cols += [f"texture_{name}__{c}" for c in range(n_channels) for name in shape_kernels.TEXTURE]
        return cols


@dataclass
class BlockResult:
    stats: Stats  # core statistics
    crop_ids: np.ndarray  # (m,) uint64: objects measured whole here
    crop: np.ndarray  # (m, len(plan.crop_columns)) float64
    crop_counts: np.ndarray  # (m,) int64: pixels of each such object in this block
    pairs: np.ndarray  # (p, 2) uint64: touching label pairs, smaller id first
    smallest: int  # smallest label value seen (negative values are the caller's error)


def crop_features(idx: np.ndarray, sel: np.ndarray, counts: np.ndarray, bmin: np.ndarray, bmax: np.ndarray,
                  chans: np.ndarray, offset: np.ndarray, plan: KernelPlan) -> np.ndarray:
    """Whole-object columns (`plan.crop_columns`) for the compact labels `sel` of a block, given each compact
    label's pixel count and bounding box in the block, and the block's global (z, y, x) start `offset`."""
    parts = []
    if plan.shape:
        if plan.ndim == 2:
            parts.append(shape_kernels.morphology_2d(idx, sel, bmin, bmax, *plan.spacing, plan.feret))
        else:
            parts.append(shape_kernels.morphology_3d(idx, sel, bmin, bmax, np.asarray(plan.surface_lut),
                                                     np.asarray(plan.surface_lut_um)))
    if plan.intensity_crop:
        small_uint = chans.dtype.kind == "u" and chans.dtype.itemsize <= 2
        parts.append(shape_kernels.intensity_crop(idx, sel, counts, bmin, bmax, np.ascontiguousarray(chans), small_uint,
                                                   offset))
    if plan.texture:
        parts.append(shape_kernels.texture_crop(idx, sel, counts, bmin, bmax, chans, plan.texture_levels))
    return np.hstack(parts) if parts else np.empty((len(sel), 0))


def measure_block(labels: np.ndarray, chans: np.ndarray, core: tuple[slice, slice, slice],
                  origin: tuple[int, int, int], image_edges: tuple[tuple[bool, bool], ...],
                  plan: KernelPlan) -> BlockResult:
    """Reduce a (Z, Y, X) label block and its (C, Z, Y, X) intensities: those of the whole block, or of its
    core alone where no whole-object kernel reads them (`plan.crop_intensities`).

    `core` selects the block's own region, `origin` is the core's global start, and `image_edges[a]` says
    whether the block's low and high edges along axis a are the image's edges.
    """
    whole = chans.shape[1:] == labels.shape
    core_chans = chans[(slice(None), *core)] if whole else chans
    if core_chans.shape[1:] != labels[core].shape or (plan.crop_intensities and not whole):
        raise ValueError(f"bug: intensities of shape {chans.shape} for a block of {labels.shape}, core {core}")
    ids, idx, smallest = kernels.compact_labels(labels)
    n_cols = len(plan.crop_columns(chans.shape[0]))
    if smallest < 0:  # not a label image: the caller reports it
        return BlockResult(Stats.empty(chans.shape[0]), np.empty(0, np.uint64), np.empty((0, n_cols)),
                           np.empty(0, np.int64), np.empty((0, 2), np.uint64), smallest)
    n = len(ids)
    # With the intensity crop kernel, every object's intensity statistics come from its whole-object row
    # (`shape_kernels.INTENSITY_STATS`): the streaming pass then only counts pixels and bounds objects.
    streamed = core_chans[:0] if plan.intensity_crop else core_chans
    stats = region_stats(idx[core], ids, streamed, origin, plan.spread, plan.weighted)
    crop_ids, crop_counts = np.empty(0, np.uint64), np.empty(0, np.int64)
    crop, pairs = np.empty((0, n_cols)), np.empty((0, 2), np.uint64)
    if plan.crop and len(stats):
        counts, _, bmin, bmax = kernels.geometry(idx, n)
        first = kernels.first_pixel(idx, n)
        present = np.searchsorted(ids, stats.ids)  # compact indices of the core's objects
        complete = np.ones(n, bool)
        owned = np.ones(n, bool)
        for a in range(3):
            low, high = image_edges[a]
            if not low:
                complete &= bmin[:, a] > 0
            if not high:
                complete &= bmax[:, a] < idx.shape[a] - 1
            owned &= (first[:, a] >= core[a].start) & (first[:, a] < core[a].stop)
        sel = present[complete[present] & owned[present]]
        crop_ids, crop_counts = ids[sel], counts[sel]
        offset = np.array([o - c.start for o, c in zip(origin, core)], np.int64)
        crop = crop_features(idx, sel.astype(np.int64), counts, bmin, bmax, chans, offset, plan)
    if plan.touching and n:
        cp = kernels.touching_pairs(idx, n, core[0].start, core[0].stop, core[1].start, core[1].stop,
                                    core[2].start, core[2].stop)
        pairs = ids[cp]
    return BlockResult(stats, crop_ids, crop, crop_counts, pairs, smallest)


def measure_object(labels: np.ndarray, chans: np.ndarray, label_id: int, offset: tuple[int, int, int],
                   plan: KernelPlan) -> np.ndarray:
    """Whole-object columns of one object from a crop that holds all of it (its bounding box), starting at
    the global (z, y, x) `offset`."""
    ids, idx, _ = kernels.compact_labels(labels)
    k = int(np.searchsorted(ids, np.uint64(label_id)))
    counts, _, bmin, bmax = kernels.geometry(idx, len(ids))
    return crop_features(idx, np.array([k], np.int64), counts, bmin, bmax, chans, np.asarray(offset, np.int64),
                         plan)[0]
