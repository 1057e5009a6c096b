"""Compiled whole-object kernels: each object is measured once on its bounding-box crop.

These replicate scikit-image's definitions so that values equal `regionprops` on the same object:
- `perimeter`: skimage.measure.perimeter(image, 4) (cross erosion, 3x3 weighted neighbourhood codes);
- `perimeter_crofton`: skimage.measure.perimeter_crofton(image, 4) (2x2 configurations, 4 directions);
- `euler`: skimage.measure.euler_number with connectivity = ndim (2x2 / 2x2x2 configurations);
- `convex_image_2d`: skimage.morphology.convex_hull_image (hull of the pixels' diamond corners, pixel centres
  inside or on the hull), from which `feret_2d` takes regionprops' feret_diameter_max (largest distance
  between the 0.5-level contour points of the padded convex image);
- central moments in the crop's coordinates, as regionprops' `moments_central`.

The batch functions loop over many objects of one block inside compiled code: no Python runs per object.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from skimage.measure._regionprops_utils import EULER_COEFS3D_26

_SQRT2 = math.sqrt(2.0)
_PERIMETER_WEIGHTS = np.zeros(50, np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = _SQRT2
_PERIMETER_WEIGHTS[[13, 23]] = (1.0 + _SQRT2) / 2.0
_CROFTON_COEFS = np.array([
    0, np.pi / 4 * (1 + 1 / _SQRT2), np.pi / (4 * _SQRT2), np.pi / (2 * _SQRT2), 0,
    np.pi / 4 * (1 + 1 / _SQRT2), 0, np.pi / (4 * _SQRT2), np.pi / 4, np.pi / 2, np.pi / (4 * _SQRT2),
    np.pi / (4 * _SQRT2), np.pi / 4, np.pi / 2, 0, 0,
], np.float64)
_EULER_2D_8 = np.array([0, 0, 0, 0, 0, 0, -1, 0, 1, 0, 0, 0, 0, 0, -1, 0], np.int64)
_EULER_3D_26 = np.asarray(EULER_COEFS3D_26, np.int64)

# Columns of `morphology_2d`'s output.
MORPH_2D = (
    "perimeter", "perimeter_crofton", "euler_number", "area_convex", "feret_diameter_max",
    "feret_diameter_max_um", "mu20", "mu11", "mu02", "mu30", "mu21", "mu12", "mu03",
)
# Columns of `morphology_3d`'s output.
MORPH_3D = ("euler_number", "mu200", "mu020", "mu002", "mu110", "mu101", "mu011")
# Columns of `intensity_crop`'s output.
INTENSITY = ("median", "q05", "q25", "q75", "q95", "mad", "skewness", "kurtosis", "boundary_mean")


@njit(cache=True, nogil=True)
def _mask(idx, k, z0, z1, y0, y1, x0, x1):
    m = np.zeros((z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    for z in range(z0, z1 + 1):
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if idx[z, y, x] == k:
                    m[z - z0, y - y0, x - x0] = 1
    return m


@njit(cache=True, nogil=True)
def _at(m, y, x):
    if y < 0 or x < 0 or y >= m.shape[0] or x >= m.shape[1]:
        return 0
    return m[y, x]


@njit(cache=True, nogil=True)
def border_2d(m):
    """Object pixels with a 4-neighbour outside the object (outside the crop counts as background)."""
    h, w = m.shape
    b = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            if m[y, x] and not (_at(m, y - 1, x) and _at(m, y + 1, x) and _at(m, y, x - 1) and _at(m, y, x + 1)):
                b[y, x] = 1
    return b


@njit(cache=True, nogil=True)
def perimeter(m):
    b = border_2d(m)
    h, w = m.shape
    total = 0.0
    # Only codes with an odd value (the centre on the border) carry weight; visit those pixels only.
    for y in range(h):
        for x in range(w):
            if not b[y, x]:
                continue
            code = 1 + 2 * (_at(b, y - 1, x) + _at(b, y + 1, x) + _at(b, y, x - 1) + _at(b, y, x + 1)) + 10 * (
                _at(b, y - 1, x - 1) + _at(b, y - 1, x + 1) + _at(b, y + 1, x - 1) + _at(b, y + 1, x + 1))
            total += _PERIMETER_WEIGHTS[code]
    return total


@njit(cache=True, nogil=True)
def _quad_histogram(m):
    """Histogram of 2x2 configurations over the crop padded by one (skimage's convolve with [[0,0,0],[0,1,4],[0,2,8]])."""
    h, w = m.shape
    hist = np.zeros(16, np.int64)
    for y in range(h + 2):
        for x in range(w + 2):
            # in padded coordinates (y, x) the padded image is m[y - 1, x - 1]
            v = _at(m, y - 1, x - 1) + 4 * _at(m, y - 1, x - 2) + 2 * _at(m, y - 2, x - 1) + 8 * _at(m, y - 2, x - 2)
            hist[v] += 1
    return hist


@njit(cache=True, nogil=True)
def perimeter_crofton(m):
    hist = _quad_histogram(m)
    total = 0.0
    for i in range(16):
        total += _CROFTON_COEFS[i] * hist[i]
    return total


@njit(cache=True, nogil=True)
def euler_2d(m):
    hist = _quad_histogram(m)
    total = 0
    for i in range(16):
        total += _EULER_2D_8[i] * hist[i]
    return total


@njit(cache=True, nogil=True)
def _at3(m, z, y, x):
    if z < 0 or y < 0 or x < 0 or z >= m.shape[0] or y >= m.shape[1] or x >= m.shape[2]:
        return 0
    return m[z, y, x]


@njit(cache=True, nogil=True)
def euler_3d(m):
    """skimage.measure.euler_number(m, 3): 2x2x2 configurations over the crop padded by one."""
    d, h, w = m.shape
    total = 0
    for z in range(d + 2):
        for y in range(h + 2):
            for x in range(w + 2):
                v = (_at3(m, z - 1, y - 1, x - 1) + 4 * _at3(m, z - 1, y - 1, x - 2) + 2 * _at3(m, z - 1, y - 2, x - 1)
                     + 8 * _at3(m, z - 1, y - 2, x - 2) + 16 * _at3(m, z - 2, y - 1, x - 1)
                     + 64 * _at3(m, z - 2, y - 1, x - 2) + 32 * _at3(m, z - 2, y - 2, x - 1)
                     + 128 * _at3(m, z - 2, y - 2, x - 2))
                total += _EULER_3D_26[v]
    return int(0.125 * total)


@njit(cache=True, nogil=True)
def _cross(o0, o1, a0, a1, b0, b1):
    return (a0 - o0) * (b1 - o1) - (a1 - o1) * (b0 - o0)


@njit(cache=True, nogil=True)
def hull_2d(pts):
    """Convex hull (Andrew's monotone chain) of (n, 2) points; vertices counter-clockwise, no collinear ones."""
    n = pts.shape[0]
    by_second = np.argsort(pts[:, 1], kind="mergesort")
    order = by_second[np.argsort(pts[by_second, 0], kind="mergesort")]  # lexicographic, stable
    p = pts[order]
    hull = np.empty((2 * n + 1, 2), np.float64)
    k = 0
    for i in range(n):
        while k >= 2 and _cross(hull[k - 2, 0], hull[k - 2, 1], hull[k - 1, 0], hull[k - 1, 1], p[i, 0], p[i, 1]) <= 0:
            k -= 1
        hull[k] = p[i]
        k += 1
    lower = k + 1
    for i in range(n - 2, -1, -1):
        while k >= lower and _cross(hull[k - 2, 0], hull[k - 2, 1], hull[k - 1, 0], hull[k - 1, 1], p[i, 0], p[i, 1]) <= 0:
            k -= 1
        hull[k] = p[i]
        k += 1
    return hull[: max(k - 1, 1)]


@njit(cache=True, nogil=True)
def convex_image_2d(m):
    """skimage.morphology.convex_hull_image(m): pixel centres inside or on the hull of the pixels' corners.

    Candidate points are the diamond corners (+-0.5 along each axis) of the first and last pixel of every row
    and column, which include every hull vertex. Coordinates are half-integers, so the inside test is exact.
    """
    h, w = m.shape
    pts = np.empty((8 * (h + w), 2), np.float64)
    n = 0
    for y in range(h):
        first, last = -1, -1
        for x in range(w):
            if m[y, x]:
                if first < 0:
                    first = x
                last = x
        if first >= 0:
            for x in (first, last):
                pts[n, 0], pts[n, 1] = y - 0.5, x
                pts[n + 1, 0], pts[n + 1, 1] = y + 0.5, x
                pts[n + 2, 0], pts[n + 2, 1] = y, x - 0.5
                pts[n + 3, 0], pts[n + 3, 1] = y, x + 0.5
                n += 4
    for x in range(w):
        first, last = -1, -1
        for y in range(h):
            if m[y, x]:
                if first < 0:
                    first = y
                last = y
        if first >= 0:
            for y in (first, last):
                pts[n, 0], pts[n, 1] = y - 0.5, x
                pts[n + 1, 0], pts[n + 1, 1] = y + 0.5, x
                pts[n + 2, 0], pts[n + 2, 1] = y, x - 0.5
                pts[n + 3, 0], pts[n + 3, 1] = y, x + 0.5
                n += 4
    hull = hull_2d(pts[:n])
    nv = hull.shape[0]
    out = np.zeros((h, w), np.uint8)
    count = 0
    for y in range(h):
        for x in range(w):
            inside = True
            for i in range(nv):
                j = (i + 1) % nv
                if _cross(hull[i, 0], hull[i, 1], hull[j, 0], hull[j, 1], y, x) < 0:
                    inside = False
                    break
            if inside:
                out[y, x] = 1
                count += 1
    return out, count


@njit(cache=True, nogil=True)
def feret_2d(conv, sy, sx):
    """Largest distance between the 0.5-level contour points of the convex image, in pixels and scaled.

    The contour of a binary image at level 0.5 passes through the midpoints between 4-adjacent inside and
    outside pixels; for a convex image the extreme ones lie at the ends of each row's and column's run.
    """
    h, w = conv.shape
    pts = np.empty((2 * (h + w), 2), np.float64)
    n = 0
    for y in range(h):
        first, last = -1, -1
        for x in range(w):
            if conv[y, x]:
                if first < 0:
                    first = x
                last = x
        if first >= 0:
            pts[n, 0], pts[n, 1] = y, first - 0.5
            pts[n + 1, 0], pts[n + 1, 1] = y, last + 0.5
            n += 2
    for x in range(w):
        first, last = -1, -1
        for y in range(h):
            if conv[y, x]:
                if first < 0:
                    first = y
                last = y
        if first >= 0:
            pts[n, 0], pts[n, 1] = first - 0.5, x
            pts[n + 1, 0], pts[n + 1, 1] = last + 0.5, x
            n += 2
    best = 0.0
    best_s = 0.0
    hull = hull_2d(pts[:n])
    for i in range(hull.shape[0]):
        for j in range(i + 1, hull.shape[0]):
            dy = hull[i, 0] - hull[j, 0]
            dx = hull[i, 1] - hull[j, 1]
            best = max(best, dy * dy + dx * dx)
    # Scaling changes which pair is farthest: take the hull of the scaled points.
    for i in range(n):
        pts[i, 0] *= sy
        pts[i, 1] *= sx
    hull = hull_2d(pts[:n])
    for i in range(hull.shape[0]):
        for j in range(i + 1, hull.shape[0]):
            dy = hull[i, 0] - hull[j, 0]
            dx = hull[i, 1] - hull[j, 1]
            best_s = max(best_s, dy * dy + dx * dx)
    return math.sqrt(best), math.sqrt(best_s)


@njit(cache=True, nogil=True)
def morphology_2d(idx, sel, bmin, bmax, sy, sx):
    """Whole-object 2D features (columns `MORPH_2D`) of the compact labels `sel` of a (1, Y, X) block."""
    out = np.empty((sel.shape[0], len(MORPH_2D)), np.float64)
    for j in range(sel.shape[0]):
        k = sel[j]
        m = _mask(idx, k, 0, 0, bmin[k, 1], bmax[k, 1], bmin[k, 2], bmax[k, 2])[0]
        out[j, 0] = perimeter(m)
        out[j, 1] = perimeter_crofton(m)
        out[j, 2] = euler_2d(m)
        conv, area_convex = convex_image_2d(m)
        out[j, 3] = area_convex
        out[j, 4], out[j, 5] = feret_2d(conv, sy, sx)
        # central moments in crop coordinates, about the crop centroid (regionprops' moments_central)
        n = 0.0
        cy = 0.0
        cx = 0.0
        h, w = m.shape
        for y in range(h):
            for x in range(w):
                if m[y, x]:
                    n += 1.0
                    cy += y
                    cx += x
        cy /= n
        cx /= n
        mu = np.zeros((4, 4), np.float64)
        for y in range(h):
            for x in range(w):
                if m[y, x]:
                    dy = y - cy
                    dx = x - cx
                    py = 1.0
                    for p in range(4):
                        px = 1.0
                        for q in range(4 - p):
                            mu[p, q] += py * px
                            px *= dx
                        py *= dy
        out[j, 6], out[j, 7], out[j, 8] = mu[2, 0], mu[1, 1], mu[0, 2]
        out[j, 9], out[j, 10], out[j, 11], out[j, 12] = mu[3, 0], mu[2, 1], mu[1, 2], mu[0, 3]
    return out


@njit(cache=True, nogil=True)
def morphology_3d(idx, sel, bmin, bmax):
    """Whole-object 3D features (columns `MORPH_3D`) of the compact labels `sel` of a (Z, Y, X) block."""
    out = np.empty((sel.shape[0], len(MORPH_3D)), np.float64)
    for j in range(sel.shape[0]):
        k = sel[j]
        m = _mask(idx, k, bmin[k, 0], bmax[k, 0], bmin[k, 1], bmax[k, 1], bmin[k, 2], bmax[k, 2])
        out[j, 0] = euler_3d(m)
        d, h, w = m.shape
        n = 0.0
        c0 = 0.0
        c1 = 0.0
        c2 = 0.0
        for z in range(d):
            for y in range(h):
                for x in range(w):
                    if m[z, y, x]:
                        n += 1.0
                        c0 += z
                        c1 += y
                        c2 += x
        c0 /= n
        c1 /= n
        c2 /= n
        s = np.zeros(6, np.float64)
        for z in range(d):
            for y in range(h):
                for x in range(w):
                    if m[z, y, x]:
                        a, b, c = z - c0, y - c1, x - c2
                        s[0] += a * a
                        s[1] += b * b
                        s[2] += c * c
                        s[3] += a * b
                        s[4] += a * c
                        s[5] += b * c
        out[j, 1:] = s
    return out


@njit(cache=True, nogil=True)
def _quantile_sorted(v, q):
    """numpy.quantile(v, q) (method 'linear') of sorted values."""
    pos = q * (v.shape[0] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.shape[0] - 1)
    t = pos - lo
    a = v[lo]
    b = v[hi]
    # numpy's _lerp: a + (b - a) * t, computed from the upper end when t >= 0.5
    if t >= 0.5:
        return b - (b - a) * (1.0 - t)
    return a + (b - a) * t


@njit(cache=True, nogil=True)
def intensity_crop(idx, sel, bmin, bmax, img):
    """Per-object intensity distribution features (columns `INTENSITY`) of one channel of a (Z, Y, X) block.

    Median and quantiles as numpy.quantile (linear); MAD = median(|v - median|) (scipy's
    median_abs_deviation, scale 1); skewness and kurtosis as scipy.stats.skew / kurtosis (biased, Fisher:
    0 for a normal distribution), NaN for a constant object; boundary mean over the object's pixels with a
    face neighbour outside the object (4-connected in 2D, 6-connected in 3D).
    """
    out = np.empty((sel.shape[0], len(INTENSITY)), np.float64)
    nz, ny, nx = idx.shape
    for j in range(sel.shape[0]):
        k = sel[j]
        n = 0
        for z in range(bmin[k, 0], bmax[k, 0] + 1):
            for y in range(bmin[k, 1], bmax[k, 1] + 1):
                for x in range(bmin[k, 2], bmax[k, 2] + 1):
                    if idx[z, y, x] == k:
                        n += 1
        v = np.empty(n, np.float64)
        i = 0
        bsum = 0.0
        bn = 0
        for z in range(bmin[k, 0], bmax[k, 0] + 1):
            for y in range(bmin[k, 1], bmax[k, 1] + 1):
                for x in range(bmin[k, 2], bmax[k, 2] + 1):
                    if idx[z, y, x] != k:
                        continue
                    val = np.float64(img[z, y, x])
                    v[i] = val
                    i += 1
                    inner = (y > 0 and idx[z, y - 1, x] == k) and (y < ny - 1 and idx[z, y + 1, x] == k) and (
                        x > 0 and idx[z, y, x - 1] == k) and (x < nx - 1 and idx[z, y, x + 1] == k)
                    if nz > 1:
                        inner = inner and (z > 0 and idx[z - 1, y, x] == k) and (z < nz - 1 and idx[z + 1, y, x] == k)
                    if not inner:
                        bsum += val
                        bn += 1
        mean = 0.0
        for t in range(n):
            mean += v[t]
        mean /= n
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        for t in range(n):
            d = v[t] - mean
            d2 = d * d
            m2 += d2
            m3 += d2 * d
            m4 += d2 * d2
        m2 /= n
        m3 /= n
        m4 /= n
        v.sort()
        med = _quantile_sorted(v, 0.5)
        out[j, 0] = med
        out[j, 1] = _quantile_sorted(v, 0.05)
        out[j, 2] = _quantile_sorted(v, 0.25)
        out[j, 3] = _quantile_sorted(v, 0.75)
        out[j, 4] = _quantile_sorted(v, 0.95)
        dev = np.abs(v - med)
        dev.sort()
        out[j, 5] = _quantile_sorted(dev, 0.5)
        if m2 > 0:
            out[j, 6] = m3 / m2**1.5
            out[j, 7] = m4 / (m2 * m2) - 3.0
        else:
            out[j, 6] = np.nan
            out[j, 7] = np.nan
        out[j, 8] = bsum / bn
    return out
