"""Compiled per-chunk kernels: one pass over a region accumulates statistics for all its labels at once.

Regions are handled as (Z, Y, X) arrays (2D images have Z = 1). Labels are first mapped to compact
indices (`compact_labels`), so the accumulators are small dense arrays indexed by that compact id,
never dictionaries, and no Python code runs per pixel or per object.
"""

from __future__ import annotations

import numpy as np
from .jit import kernel

_BIG = np.iinfo(np.int64).max
# Use a dense lookup table while the label range is at most this many times the region's pixel count.
_DENSE_FACTOR = 4


@kernel
def _range(flat):
    """(smallest non-zero label, largest label, smallest label); (0, 0, 0) for an all-background region."""
    lo = flat.dtype.type(0)
    hi = flat.dtype.type(0)
    mn = flat.dtype.type(0)
    found = False
    for i in range(flat.size):
        v = flat[i]
        if v < mn:
            mn = v
        if v == 0:
            continue
        if not found:
            lo = v
            hi = v
            found = True
        elif v < lo:
            lo = v
        elif v > hi:
            hi = v
    return lo, hi, mn


@kernel
def _dense_compact(flat, lo, size):
    """Compact ids through a lookup table over [lo, lo + size): ids ascending, -1 for background."""
    lut = np.full(size, -1, np.int64)
    for i in range(flat.size):
        v = flat[i]
        if v != 0:
            lut[v - lo] = 0
    n = 0
    for j in range(size):
        if lut[j] == 0:
            lut[j] = n
            n += 1
    ids = np.empty(n, np.uint64)
    for j in range(size):
        if lut[j] >= 0:
            ids[lut[j]] = np.uint64(lo) + np.uint64(j)
    idx = np.empty(flat.size, np.int32)
    for i in range(flat.size):
        v = flat[i]
        idx[i] = -1 if v == 0 else lut[v - lo]
    return ids, idx


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Map a label region to compact indices.

    Returns (ids, idx, smallest value): `ids` the sorted non-zero labels present (uint64), `idx` an int32
    array of `labels`' shape holding each pixel's position in `ids` (-1 for background), and the smallest
    value seen, so the caller can reject negative labels.
    """
    flat = labels.reshape(-1)
    lo, hi, mn = _range(flat)
    if hi == 0:
        return np.empty(0, np.uint64), np.full(labels.shape, -1, np.int32), int(mn)
    size = int(hi) - int(lo) + 1
    if size <= _DENSE_FACTOR * flat.size + 1024:
        ids, idx = _dense_compact(flat, flat.dtype.type(lo), size)  # keep lo in the label dtype (uint64!)
    else:  # sparse label values (e.g. hashes or 64-bit ids): sort instead
        ids, inv = np.unique(flat, return_inverse=True)
        idx = inv.astype(np.int32)
        if ids[0] == 0:
            ids, idx = ids[1:], idx - 1
        ids = ids.astype(np.uint64)
    return ids, idx.reshape(labels.shape), int(mn)


@kernel
def geometry(idx, n):
    """Pixel count, coordinate sums and inclusive bounding box per compact label of a (Z, Y, X) region."""
    count = np.zeros(n, np.int64)
    coord_sum = np.zeros((n, 3), np.int64)
    bmin = np.full((n, 3), _BIG, np.int64)
    bmax = np.full((n, 3), -1, np.int64)
    nz, ny, nx = idx.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = idx[z, y, x]
                if k < 0:
                    continue
                count[k] += 1
                coord_sum[k, 0] += z
                coord_sum[k, 1] += y
                coord_sum[k, 2] += x
                if z < bmin[k, 0]:
                    bmin[k, 0] = z
                if z > bmax[k, 0]:
                    bmax[k, 0] = z
                if y < bmin[k, 1]:
                    bmin[k, 1] = y
                if y > bmax[k, 1]:
                    bmax[k, 1] = y
                if x < bmin[k, 2]:
                    bmin[k, 2] = x
                if x > bmax[k, 2]:
                    bmax[k, 2] = x
    return count, coord_sum, bmin, bmax


@kernel
def intensities(idx, n, chans, count, spread, weighted):
    """Per compact label and channel of (C, Z, Y, X) intensities: the sum, min and max, and where asked the sum
    of squared deviations from the mean (`spread`) and the intensity-weighted coordinate sums (`weighted`);
    NaN where not asked (so that no merge or feature mistakes them for values). One pass over the labels serves
    every channel.

    The squared deviations take a second pass, from this region's mean, which keeps the variance exact to
    rounding; regions are merged later with Chan's formula. NaN propagates to sum, min and max, as in numpy's
    reductions.
    """
    nc = chans.shape[0]
    s = np.zeros((n, nc), np.float64)
    w = np.zeros((n, nc, 3), np.float64) if weighted else np.full((n, nc, 3), np.nan)
    mn = np.full((n, nc), np.inf)
    mx = np.full((n, nc), -np.inf)
    m2 = np.zeros((n, nc), np.float64) if spread else np.full((n, nc), np.nan)
    nz, ny, nx = idx.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = idx[z, y, x]
                if k < 0:
                    continue
                for c in range(nc):
                    v = np.float64(chans[c, z, y, x])
                    s[k, c] += v
                    if v < mn[k, c] or v != v:
                        mn[k, c] = v
                    if v > mx[k, c] or v != v:
                        mx[k, c] = v
                    if weighted:
                        w[k, c, 0] += v * z
                        w[k, c, 1] += v * y
                        w[k, c, 2] += v * x
    if spread:  # the means divided out one by one: an array expression would load numba.np.npyimpl (25 ms)
        mean = np.empty((n, nc), np.float64)
        for k in range(n):
            for c in range(nc):
                mean[k, c] = s[k, c] / max(count[k], 1)
        for z in range(nz):
            for y in range(ny):
                for x in range(nx):
                    k = idx[z, y, x]
                    if k < 0:
                        continue
                    for c in range(nc):
                        d = np.float64(chans[c, z, y, x]) - mean[k, c]
                        m2[k, c] += d * d
    return s, mn, mx, m2, w


@kernel
def first_pixel(idx, n):
    """Each compact label's first pixel in raster order (z, y, x), -1 where absent."""
    first = np.full((n, 3), -1, np.int64)
    nz, ny, nx = idx.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = idx[z, y, x]
                if k >= 0 and first[k, 0] < 0:
                    first[k, 0] = z
                    first[k, 1] = y
                    first[k, 2] = x
    return first


@kernel
def touching_pairs(idx, n, z0, z1, y0, y1, x0, x1):
    """Unique pairs (a, b), a < b, of compact labels that share a face, found from the pixels of the core
    [z0:z1, y0:y1, x0:x1] towards their +1 neighbours (which may lie in the halo), so that a block-crossing
    pair is found by exactly one block."""
    nz, ny, nx = idx.shape
    codes = np.empty(4096, np.int64)
    m = 0
    last = np.int64(-1)  # the previous pair code: runs along a shared border repeat it
    for z in range(z0, z1):
        for y in range(y0, y1):
            for x in range(x0, x1):
                a = idx[z, y, x]
                if a < 0:
                    continue
                for d in range(3):
                    if d == 0:
                        if x + 1 >= nx:
                            continue
                        b = idx[z, y, x + 1]
                    elif d == 1:
                        if y + 1 >= ny:
                            continue
                        b = idx[z, y + 1, x]
                    else:
                        if z + 1 >= nz:
                            continue
                        b = idx[z + 1, y, x]
                    if b < 0 or b == a:
                        continue
                    code = min(a, b) * n + max(a, b)
                    if code == last:
                        continue
                    last = code
                    if m == codes.shape[0]:
                        grown = np.empty(2 * m, np.int64)
                        grown[:m] = codes
                        codes = grown
                    codes[m] = code
                    m += 1
    u = np.unique(codes[:m])
    out = np.empty((u.shape[0], 2), np.int64)
    for i in range(u.shape[0]):
        out[i, 0] = u[i] // n
        out[i, 1] = u[i] % n
    return out
