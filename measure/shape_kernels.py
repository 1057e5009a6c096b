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
from .jit import kernel

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
# skimage.measure._regionprops_utils.EULER_COEFS3D_26 (a test pins them equal); kept here so that importing
# the kernels does not import scikit-image.
_EULER_3D_26 = np.array([
    0, 1, 1, 0, 1, 0, -2, -1, 1, -2, 0, -1, 0, -1, -1, 0,
    1, 0, -2, -1, -2, -1, -1, -2, -6, -3, -3, -2, -3, -2, 0, -1,
    1, -2, 0, -1, -6, -3, -3, -2, -2, -1, -1, -2, -3, 0, -2, -1,
    0, -1, -1, 0, -3, -2, 0, -1, -3, 0, -2, -1, 0, 1, 1, 0,
    1, -2, -6, -3, 0, -1, -3, -2, -2, -1, -3, 0, -1, -2, -2, -1,
    0, -1, -3, -2, -1, 0, 0, -1, -3, 0, 0, 1, -2, -1, 1, 0,
    -2, -1, -3, 0, -3, 0, 0, 1, -1, 4, 0, 3, 0, 3, 1, 2,
    -1, -2, -2, -1, -2, -1, 1, 0, 0, 3, 1, 2, 1, 2, 2, 1,
    1, -6, -2, -3, -2, -3, -1, 0, 0, -3, -1, -2, -1, -2, -2, -1,
    -2, -3, -1, 0, -1, 0, 4, 3, -3, 0, 0, 1, 0, 1, 3, 2,
    0, -3, -1, -2, -3, 0, 0, 1, -1, 0, 0, -1, -2, 1, -1, 0,
    -1, -2, -2, -1, 0, 1, 3, 2, -2, 1, -1, 0, 1, 2, 2, 1,
    0, -3, -3, 0, -1, -2, 0, 1, -1, 0, -2, 1, 0, -1, -1, 0,
    -1, -2, 0, 1, -2, -1, 3, 2, -2, 1, 1, 2, -1, 0, 2, 1,
    -1, 0, -2, 1, -2, 1, 1, 2, -2, 3, -1, 2, -1, 2, 0, 1,
    0, -1, -1, 0, -1, 0, 2, 1, -1, 2, 0, 1, 0, 1, 1, 0,
], np.int64)

# --- the kernels' output columns, named once ---------------------------------------------------------------
# Each whole-object kernel fills one row per object; the tuples below name its columns in order, and the kernel
# writes each value at the slot its name is given here (the `_`-prefixed integers: numba compiles module-level
# integers in as constants, so a slot costs nothing at run time). The columns reach the registry
# (`features.py`) under the same names (`block.KernelPlan.crop_columns`), so a name is the whole contract.

MORPH_2D = ("perimeter", "perimeter_crofton", "euler_number", "area_convex", "feret_diameter_max",
            "feret_diameter_max_um", "mu20", "mu11", "mu02", "mu30", "mu21", "mu12", "mu03")  # `morphology_2d`
_M2_PERIMETER = MORPH_2D.index("perimeter")
_M2_CROFTON = MORPH_2D.index("perimeter_crofton")
_M2_EULER = MORPH_2D.index("euler_number")
_M2_AREA_CONVEX = MORPH_2D.index("area_convex")
FERET = ("feret_diameter_max", "feret_diameter_max_um")  # `feret_2d`'s columns: computed only where asked for
_M2_FERET, _M2_FERET_UM = MORPH_2D.index(FERET[0]), MORPH_2D.index(FERET[1])
_M2_MU20, _M2_MU11, _M2_MU02 = MORPH_2D.index("mu20"), MORPH_2D.index("mu11"), MORPH_2D.index("mu02")
_M2_MU30, _M2_MU21 = MORPH_2D.index("mu30"), MORPH_2D.index("mu21")
_M2_MU12, _M2_MU03 = MORPH_2D.index("mu12"), MORPH_2D.index("mu03")

MORPH_3D = ("euler_number", "mu200", "mu020", "mu002", "mu110", "mu101", "mu011", "surface_area", "surface_area_um",
            "area_convex")  # `morphology_3d`
_M3_EULER = MORPH_3D.index("euler_number")
_M3_MU200, _M3_MU020, _M3_MU002 = MORPH_3D.index("mu200"), MORPH_3D.index("mu020"), MORPH_3D.index("mu002")
_M3_MU110, _M3_MU101, _M3_MU011 = MORPH_3D.index("mu110"), MORPH_3D.index("mu101"), MORPH_3D.index("mu011")
_M3_SURFACE = MORPH_3D.index("surface_area")
_M3_SURFACE_UM = MORPH_3D.index("surface_area_um")
_M3_AREA_CONVEX = MORPH_3D.index("area_convex")

QUANTILES = (5, 25, 75, 95)  # percent: `intensity_crop`'s columns q05, q25, q75, q95
INTENSITY = ("median", *(f"q{q:02d}" for q in QUANTILES), "mad", "skewness", "kurtosis", "boundary_mean", "sum", "min",
             "max", "m2", "wsum_z", "wsum_y", "wsum_x")  # `intensity_crop`, per channel
_I_MEDIAN = INTENSITY.index("median")
_I_QUANTILES = tuple(INTENSITY.index(f"q{q:02d}") for q in QUANTILES)
_QUANTILE_FRACTIONS = tuple(q / 100 for q in QUANTILES)
_I_MAD = INTENSITY.index("mad")
_I_ORDER_STATS = (_I_MEDIAN, *_I_QUANTILES, _I_MAD)  # NaN together when a pixel is NaN
_I_SKEWNESS = INTENSITY.index("skewness")
_I_KURTOSIS = INTENSITY.index("kurtosis")
_I_BOUNDARY_MEAN = INTENSITY.index("boundary_mean")
_I_SUM = INTENSITY.index("sum")
_I_MIN = INTENSITY.index("min")
_I_MAX = INTENSITY.index("max")
_I_M2 = INTENSITY.index("m2")
_I_WSUM_Z, _I_WSUM_Y, _I_WSUM_X = INTENSITY.index("wsum_z"), INTENSITY.index("wsum_y"), INTENSITY.index("wsum_x")
# The streaming statistics (`accumulate.Stats`) that `intensity_crop` also computes, as (Stats field, columns).
INTENSITY_STATS = (("isum", ("sum",)), ("imin", ("min",)), ("imax", ("max",)), ("m2", ("m2",)),
                   ("wcoord", ("wsum_z", "wsum_y", "wsum_x")))

# `texture_crop`'s columns per channel, with what each is (the start of the texture features' descriptions).
TEXTURE_MEANINGS = {
    "contrast": "Haralick contrast", "dissimilarity": "Haralick dissimilarity", "homogeneity": "Haralick homogeneity",
    "energy": "Haralick energy (sqrt of ASM)", "correlation": "Haralick correlation (1 where a level variance is 0)",
    "ASM": "Angular second moment", "entropy": "Entropy (natural log)",
}
TEXTURE = tuple(TEXTURE_MEANINGS)
_T_CONTRAST = TEXTURE.index("contrast")
_T_DISSIMILARITY = TEXTURE.index("dissimilarity")
_T_HOMOGENEITY = TEXTURE.index("homogeneity")
_T_ENERGY = TEXTURE.index("energy")
_T_CORRELATION = TEXTURE.index("correlation")
_T_ASM = TEXTURE.index("ASM")
_T_ENTROPY = TEXTURE.index("entropy")


@kernel
def _mask(idx, k, z0, z1, y0, y1, x0, x1):
    m = np.zeros((z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    for z in range(z0, z1 + 1):
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if idx[z, y, x] == k:
                    m[z - z0, y - y0, x - x0] = 1
    return m


@kernel
def _padded_mask_2d(idx, k, y0, y1, x0, x1):
    """The object's crop mask with a 2-pixel frame of background, so neighbourhood loops need no bounds checks."""
    m = np.zeros((y1 - y0 + 5, x1 - x0 + 5), np.uint8)
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            if idx[0, y, x] == k:
                m[y - y0 + 2, x - x0 + 2] = 1
    return m


@kernel
def perimeter_padded(mp):
    """skimage.measure.perimeter(m, 4) of a mask given with a 2-pixel background frame."""
    h, w = mp.shape
    b = np.zeros((h, w), np.uint8)  # border pixels: object pixels with a 4-neighbour outside the object
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            if mp[y, x] and not (mp[y - 1, x] and mp[y + 1, x] and mp[y, x - 1] and mp[y, x + 1]):
                b[y, x] = 1
    total = 0.0
    # Only codes with an odd value (the centre on the border) carry weight; visit those pixels only.
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            if b[y, x]:
                code = 1 + 2 * (b[y - 1, x] + b[y + 1, x] + b[y, x - 1] + b[y, x + 1]) + 10 * (
                    b[y - 1, x - 1] + b[y - 1, x + 1] + b[y + 1, x - 1] + b[y + 1, x + 1])
                total += _PERIMETER_WEIGHTS[code]
    return total


@kernel
def _quad_histogram(mp):
    """Histogram of 2x2 configurations of the crop padded by one (skimage's convolve with
    [[0,0,0],[0,1,4],[0,2,8]] on np.pad(m, 1)), from a mask given with a 2-pixel frame."""
    h, w = mp.shape
    hist = np.zeros(16, np.int64)
    # skimage's padded image P has P[y, x] = mp[y + 1, x + 1] for y in [0, h - 2), x in [0, w - 2)
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            hist[mp[y, x] + 4 * mp[y, x - 1] + 2 * mp[y - 1, x] + 8 * mp[y - 1, x - 1]] += 1
    return hist


@kernel
def crofton_and_euler(mp):
    """(perimeter_crofton(m, 4), euler_number(m, 2)) of a mask with a 2-pixel frame: both weigh the same
    histogram of 2x2 configurations."""
    hist = _quad_histogram(mp)
    crofton = 0.0
    euler = 0
    for i in range(16):
        crofton += _CROFTON_COEFS[i] * hist[i]
        euler += _EULER_2D_8[i] * hist[i]
    return crofton, euler


@kernel
def _at3(m, z, y, x):
    if z < 0 or y < 0 or x < 0 or z >= m.shape[0] or y >= m.shape[1] or x >= m.shape[2]:
        return 0
    return m[z, y, x]


@kernel
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


@kernel
def _cross(o0, o1, a0, a1, b0, b1):
    return (a0 - o0) * (b1 - o1) - (a1 - o1) * (b0 - o0)


@kernel
def _chain(pts, n):
    """Convex hull (Andrew's monotone chain) of n points already sorted by (y, x); counter-clockwise, no
    collinear vertices."""
    hull = np.empty((2 * n + 1, 2), np.float64)
    k = 0
    for i in range(n):
        while k >= 2 and _cross(hull[k - 2, 0], hull[k - 2, 1], hull[k - 1, 0], hull[k - 1, 1], pts[i, 0], pts[i, 1]) <= 0:
            k -= 1
        hull[k] = pts[i]
        k += 1
    lower = k + 1
    for i in range(n - 2, -1, -1):
        while k >= lower and _cross(hull[k - 2, 0], hull[k - 2, 1], hull[k - 1, 0], hull[k - 1, 1], pts[i, 0], pts[i, 1]) <= 0:
            k -= 1
        hull[k] = pts[i]
        k += 1
    return hull[: max(k - 1, 1)]


@kernel
def _level_hull(lo, hi, first_y):
    """Hull of points given per horizontal level: level L lies at y = first_y + L / 2 and holds x from lo[L]
    to hi[L] (lo > hi: empty). Only each level's two ends can be vertices, and levels come sorted."""
    n_lev = lo.shape[0]
    pts = np.empty((2 * n_lev, 2), np.float64)
    n = 0
    for L in range(n_lev):
        if lo[L] > hi[L]:
            continue
        y = first_y + 0.5 * L
        pts[n, 0], pts[n, 1] = y, lo[L]
        n += 1
        if hi[L] != lo[L]:
            pts[n, 0], pts[n, 1] = y, hi[L]
            n += 1
    return _chain(pts, n)


@kernel
def _row_runs(m):
    """First and last set column of every row (-1, -1 for an empty row)."""
    h, w = m.shape
    first = np.full(h, -1, np.int64)
    last = np.full(h, -1, np.int64)
    for y in range(h):
        for x in range(w):
            if m[y, x]:
                if first[y] < 0:
                    first[y] = x
                last[y] = x
    return first, last


@kernel
def convex_image_2d(m):
    """skimage.morphology.convex_hull_image(m): pixel centres inside or on the hull of the pixels' corners.

    The corners of pixel (y, x) are (y +- 0.5, x) and (y, x +- 0.5); per horizontal level only the extreme
    corners of each row's first and last pixel matter. Coordinates are half-integers: the test is exact.
    """
    h, w = m.shape
    first, last = _row_runs(m)
    n_lev = 2 * h + 1  # level 2y + 1 is row y; level 2y is y - 0.5
    lo = np.full(n_lev, np.inf)
    hi = np.full(n_lev, -np.inf)
    for y in range(h):
        if first[y] < 0:
            continue
        f, l = float(first[y]), float(last[y])
        for L in (2 * y, 2 * y + 2):
            lo[L] = min(lo[L], f)
            hi[L] = max(hi[L], l)
        lo[2 * y + 1] = min(lo[2 * y + 1], f - 0.5)
        hi[2 * y + 1] = max(hi[2 * y + 1], l + 0.5)
    hull = _level_hull(lo, hi, -0.5)
    out = np.zeros((h, w), np.uint8)
    count = 0
    # The hull is convex and holds every object pixel, so each row's inside set is an interval around the
    # row's object pixels: grow it outwards from them instead of testing every pixel of the crop.
    for y in range(h):
        if first[y] < 0:  # a row without object pixels (separate pieces): test it whole
            for x in range(w):
                if _inside(hull, y, x):
                    out[y, x] = 1
                    count += 1
            continue
        a = first[y]
        while a > 0 and _inside(hull, y, a - 1):
            a -= 1
        b = last[y]
        while b < w - 1 and _inside(hull, y, b + 1):
            b += 1
        out[y, a:b + 1] = 1
        count += b - a + 1
    return out, count


@kernel
def _inside(hull, y, x):
    """Whether (y, x) lies inside or on the counter-clockwise convex polygon `hull` (exact for half-integers)."""
    nv = hull.shape[0]
    for i in range(nv):
        j = (i + 1) % nv
        if _cross(hull[i, 0], hull[i, 1], hull[j, 0], hull[j, 1], y, x) < 0:
            return False
    return True


@kernel
def feret_2d(conv, sy, sx):
    """Largest distance between the 0.5-level contour points of the convex image, in pixels and scaled.

    The 0.5-level contour of a binary image passes through the midpoints between 4-adjacent inside and
    outside pixels: (y, x -+ 0.5) at the ends of each row's run, and (y -+ 0.5, x) where a column enters or
    leaves the image between rows y - 1 and y. Scaling is affine, so the hull's vertices serve both units.
    """
    h, w = conv.shape
    first, last = _row_runs(conv)
    n_lev = 2 * h + 1  # level 2y + 1 is row y; level 2y lies between rows y - 1 and y
    lo = np.full(n_lev, np.inf)
    hi = np.full(n_lev, -np.inf)
    for y in range(h):
        if first[y] >= 0:
            lo[2 * y + 1] = first[y] - 0.5
            hi[2 * y + 1] = last[y] + 0.5
    for y in range(h + 1):
        # columns set in exactly one of rows y - 1 and y: the symmetric difference of two runs
        a1, b1 = (first[y - 1], last[y - 1]) if y > 0 else (-1, -1)
        a2, b2 = (first[y], last[y]) if y < h else (-1, -1)
        if a1 < 0 and a2 < 0:
            continue
        if a1 < 0 or a2 < 0:
            lo[2 * y], hi[2 * y] = (a2, b2) if a1 < 0 else (a1, b1)
            continue
        cands_lo = np.inf
        cands_hi = -np.inf
        if a1 != a2:
            cands_lo = min(a1, a2)
            cands_hi = max(a1, a2) - 1
        if b1 != b2:
            cands_lo = min(cands_lo, min(b1, b2) + 1)
            cands_hi = max(cands_hi, max(b1, b2))
        lo[2 * y], hi[2 * y] = cands_lo, cands_hi
    hull = _level_hull(lo, hi, -0.5)
    best = 0.0
    best_s = 0.0
    for i in range(hull.shape[0]):
        for j in range(i + 1, hull.shape[0]):
            dy = hull[i, 0] - hull[j, 0]
            dx = hull[i, 1] - hull[j, 1]
            best = max(best, dy * dy + dx * dx)
            best_s = max(best_s, dy * dy * sy * sy + dx * dx * sx * sx)
    return math.sqrt(best), math.sqrt(best_s)


@kernel
def morphology_2d(idx, sel, bmin, bmax, sy, sx, feret):
    """Whole-object 2D features (columns `MORPH_2D`) of the compact labels `sel` of a (1, Y, X) block; the Feret
    diameters (a second hull of each object's convex image: 45% of this kernel's time) only with `feret`, else
    NaN."""
    out = np.empty((sel.shape[0], len(MORPH_2D)), np.float64)
    for j in range(sel.shape[0]):
        k = sel[j]
        mp = _padded_mask_2d(idx, k, bmin[k, 1], bmax[k, 1], bmin[k, 2], bmax[k, 2])
        m = mp[2:-2, 2:-2]
        out[j, _M2_PERIMETER] = perimeter_padded(mp)
        out[j, _M2_CROFTON], out[j, _M2_EULER] = crofton_and_euler(mp)
        conv, area_convex = convex_image_2d(m)
        out[j, _M2_AREA_CONVEX] = area_convex
        if feret:
            out[j, _M2_FERET], out[j, _M2_FERET_UM] = feret_2d(conv, sy, sx)
        else:
            out[j, _M2_FERET] = out[j, _M2_FERET_UM] = np.nan
        # central moments in crop coordinates, about the crop centroid (regionprops' moments_central)
        h, w = m.shape
        n = 0.0
        cy = 0.0
        cx = 0.0
        for y in range(h):
            for x in range(w):
                if m[y, x]:
                    n += 1.0
                    cy += y
                    cx += x
        cy /= n
        cx /= n
        m20 = m11 = m02 = m30 = m21 = m12 = m03 = 0.0
        for y in range(h):
            dy = y - cy
            dy2 = dy * dy
            for x in range(w):
                if m[y, x]:
                    dx = x - cx
                    dx2 = dx * dx
                    m20 += dy2
                    m11 += dy * dx
                    m02 += dx2
                    m30 += dy2 * dy
                    m21 += dy2 * dx
                    m12 += dy * dx2
                    m03 += dx2 * dx
        out[j, _M2_MU20], out[j, _M2_MU11], out[j, _M2_MU02] = m20, m11, m02
        out[j, _M2_MU30], out[j, _M2_MU21], out[j, _M2_MU12], out[j, _M2_MU03] = m30, m21, m12, m03
    return out


def surface_lut(spacing: tuple[float, float, float]) -> np.ndarray:
    """Mesh area of each of the 256 corner configurations of one 2x2x2 cube (corner (z, y, x) is bit
    4z + 2y + x), from skimage.measure.marching_cubes at level 0.5 and mesh_surface_area with this spacing.

    Marching cubes triangulates every cube from its own eight corners, so the mesh area of a binary volume
    is the sum of these over its cubes (a test checks this against scikit-image on whole objects).
    """
    from skimage.measure import marching_cubes, mesh_surface_area

    lut = np.zeros(256, np.float64)
    for c in range(1, 255):
        cube = np.array([(c >> b) & 1 for b in range(8)], np.float32).reshape(2, 2, 2)
        verts, faces, _, _ = marching_cubes(cube, 0.5, spacing=spacing)
        lut[c] = mesh_surface_area(verts, faces)
    return lut


@kernel
def surface_area(m, lut):
    """Sum of `lut` over the 2x2x2 cubes of the mask padded by one: marching-cubes mesh area."""
    d, h, w = m.shape
    total = 0.0
    for z in range(-1, d):
        for y in range(-1, h):
            for x in range(-1, w):
                cfg = (_at3(m, z, y, x) | (_at3(m, z, y, x + 1) << 1) | (_at3(m, z, y + 1, x) << 2)
                       | (_at3(m, z, y + 1, x + 1) << 3) | (_at3(m, z + 1, y, x) << 4) | (_at3(m, z + 1, y, x + 1) << 5)
                       | (_at3(m, z + 1, y + 1, x) << 6) | (_at3(m, z + 1, y + 1, x + 1) << 7))
                total += lut[cfg]
    return total


@kernel
def _orient(f, p, q):
    """(b - a) x (c - a) . (q - a) for the face f = (a, b, c) of points p: > 0 when q sees the face."""
    a0, a1, a2 = p[f[0], 0], p[f[0], 1], p[f[0], 2]
    b0, b1, b2 = p[f[1], 0] - a0, p[f[1], 1] - a1, p[f[1], 2] - a2
    c0, c1, c2 = p[f[2], 0] - a0, p[f[2], 1] - a1, p[f[2], 2] - a2
    n0, n1, n2 = b1 * c2 - b2 * c1, b2 * c0 - b0 * c2, b0 * c1 - b1 * c0
    return n0 * (q[0] - a0) + n1 * (q[1] - a1) + n2 * (q[2] - a2)


@kernel
def hull_3d(p):
    """Faces (a, b, c), outward by the right-hand rule, of the convex hull of the points p (n, 3).

    Incremental, with exact arithmetic for the small integer coordinates it is given (doubled half-integers);
    a point sees a face only strictly, so coplanar points never split faces. Empty if p is flat.
    """
    n = p.shape[0]
    # a non-degenerate tetrahedron: extreme in the first coordinate, then farthest from the line, the plane
    i0 = 0
    i1 = 0
    for i in range(n):
        if p[i, 0] < p[i0, 0] or (p[i, 0] == p[i0, 0] and (p[i, 1] < p[i0, 1] or (p[i, 1] == p[i0, 1] and p[i, 2] < p[i0, 2]))):
            i0 = i
    best = -1.0
    for i in range(n):
        d = (p[i, 0] - p[i0, 0]) ** 2 + (p[i, 1] - p[i0, 1]) ** 2 + (p[i, 2] - p[i0, 2]) ** 2
        if d > best:
            best, i1 = d, i
    best = 0.0
    i2 = -1
    u0, u1, u2 = p[i1, 0] - p[i0, 0], p[i1, 1] - p[i0, 1], p[i1, 2] - p[i0, 2]
    for i in range(n):
        v0, v1, v2 = p[i, 0] - p[i0, 0], p[i, 1] - p[i0, 1], p[i, 2] - p[i0, 2]
        c = (u1 * v2 - u2 * v1) ** 2 + (u2 * v0 - u0 * v2) ** 2 + (u0 * v1 - u1 * v0) ** 2
        if c > best:
            best, i2 = c, i
    if i2 < 0:
        return np.empty((0, 3), np.int64)
    face = np.array([i0, i1, i2], np.int64)
    best = 0.0
    i3 = -1
    for i in range(n):
        o = abs(_orient(face, p, p[i]))
        if o > best:
            best, i3 = o, i
    if i3 < 0:
        return np.empty((0, 3), np.int64)
    cap = 64
    faces = np.empty((cap, 3), np.int64)
    alive = np.zeros(cap, np.bool_)
    nf = 0
    if _orient(face, p, p[i3]) > 0:
        i1, i2 = i2, i1
    for a, b, c in ((i0, i1, i2), (i0, i3, i1), (i1, i3, i2), (i2, i3, i0)):
        faces[nf, 0], faces[nf, 1], faces[nf, 2] = a, b, c
        alive[nf] = True
        nf += 1
    edges = np.empty((3 * cap, 2), np.int64)
    for q in range(n):
        if q == i0 or q == i1 or q == i2 or q == i3:
            continue
        ne = 0
        seen = False
        for f in range(nf):
            if alive[f] and _orient(faces[f], p, p[q]) > 0:
                seen = True
                alive[f] = False
                if ne + 3 > edges.shape[0]:
                    grown = np.empty((2 * edges.shape[0], 2), np.int64)
                    grown[:ne] = edges[:ne]
                    edges = grown
                for e in range(3):
                    edges[ne, 0], edges[ne, 1] = faces[f, e], faces[f, (e + 1) % 3]
                    ne += 1
        if not seen:
            continue
        for e in range(ne):
            a, b = edges[e, 0], edges[e, 1]
            horizon = True
            for g in range(ne):
                if edges[g, 0] == b and edges[g, 1] == a:
                    horizon = False
                    break
            if horizon:
                if nf == cap:
                    cap *= 2
                    grown_f = np.empty((cap, 3), np.int64)
                    grown_f[:nf] = faces[:nf]
                    grown_a = np.zeros(cap, np.bool_)
                    grown_a[:nf] = alive[:nf]
                    faces, alive = grown_f, grown_a
                faces[nf, 0], faces[nf, 1], faces[nf, 2] = a, b, q
                alive[nf] = True
                nf += 1
    return faces[:nf][alive[:nf]]


@kernel
def _plane_hull_points(first, last, layers_lo, layers_hi, pts, n, z2):
    """Append to pts (doubled coordinates, at doubled height z2) the 2D hull vertices of the points given by
    the row runs of the layers in [layers_lo, layers_hi) with diamond corners in-plane (integer planes) or
    the voxel centres (half planes between two layers)."""
    h = first.shape[1]
    n_lev = 2 * h + 1
    lo = np.full(n_lev, np.inf)
    hi = np.full(n_lev, -np.inf)
    diamond = layers_hi - layers_lo == 1
    for z in range(layers_lo, layers_hi):
        if z < 0 or z >= first.shape[0]:
            continue
        for y in range(h):
            if first[z, y] < 0:
                continue
            f, l = float(first[z, y]), float(last[z, y])
            if diamond:
                for L in (2 * y, 2 * y + 2):
                    lo[L] = min(lo[L], f)
                    hi[L] = max(hi[L], l)
                lo[2 * y + 1] = min(lo[2 * y + 1], f - 0.5)
                hi[2 * y + 1] = max(hi[2 * y + 1], l + 0.5)
            else:
                lo[2 * y + 1] = min(lo[2 * y + 1], f)
                hi[2 * y + 1] = max(hi[2 * y + 1], l)
    if not np.any(lo <= hi):
        return n
    hull = _level_hull(lo, hi, -0.5)
    for i in range(hull.shape[0]):
        pts[n, 0], pts[n, 1], pts[n, 2] = z2, 2.0 * hull[i, 0], 2.0 * hull[i, 1]
        n += 1
    return n


@kernel
def convex_volume_3d(m):
    """Voxels of skimage.morphology.convex_hull_image(m) for a 3D mask: voxel centres inside or on the hull
    of the voxels' diamond corners (+-0.5 along each axis). Per plane only the 2D hull of the corners lying in
    it can hold hull vertices; coordinates are doubled so that every test is exact."""
    d, h, w = m.shape
    first = np.full((d, h), -1, np.int64)
    last = np.full((d, h), -1, np.int64)
    for z in range(d):
        for y in range(h):
            for x in range(w):
                if m[z, y, x]:
                    if first[z, y] < 0:
                        first[z, y] = x
                    last[z, y] = x
    pts = np.empty(((2 * d + 1) * (4 * h + 4), 3), np.float64)
    n = 0
    for z in range(d):  # the plane of layer z, and the plane between layers z - 1 and z
        n = _plane_hull_points(first, last, z, z + 1, pts, n, 2.0 * z)
        n = _plane_hull_points(first, last, z - 1, z + 1, pts, n, 2.0 * z - 1.0)
    n = _plane_hull_points(first, last, d - 1, d + 1, pts, n, 2.0 * d - 1.0)
    # Farthest points first: the hull reaches its final shape early and most later points are inside it.
    c0, c1, c2 = pts[:n, 0].mean(), pts[:n, 1].mean(), pts[:n, 2].mean()
    far = (pts[:n, 0] - c0) ** 2 + (pts[:n, 1] - c1) ** 2 + (pts[:n, 2] - c2) ** 2
    p = pts[:n][np.argsort(-far)]
    faces = hull_3d(p)
    count = 0
    q = np.empty(3, np.float64)
    for z in range(d):
        for y in range(h):
            a = 0
            b = w - 1
            if first[z, y] >= 0:  # the inside set of the row is an interval around its voxels: grow it
                a = first[z, y]
                b = last[z, y]
                while a > 0 and _in_hull3(faces, p, q, z, y, a - 1):
                    a -= 1
                while b < w - 1 and _in_hull3(faces, p, q, z, y, b + 1):
                    b += 1
                count += b - a + 1
            else:
                for x in range(w):
                    if _in_hull3(faces, p, q, z, y, x):
                        count += 1
    return count


@kernel
def _in_hull3(faces, p, q, z, y, x):
    q[0], q[1], q[2] = 2.0 * z, 2.0 * y, 2.0 * x
    for f in range(faces.shape[0]):
        if _orient(faces[f], p, q) > 0:
            return False
    return True


@kernel
def morphology_3d(idx, sel, bmin, bmax, lut, lut_um):
    """Whole-object 3D features (columns `MORPH_3D`) of the compact labels `sel` of a (Z, Y, X) block;
    `lut` and `lut_um` are `surface_lut` in voxel and physical units."""
    out = np.empty((sel.shape[0], len(MORPH_3D)), np.float64)
    for j in range(sel.shape[0]):
        k = sel[j]
        m = _mask(idx, k, bmin[k, 0], bmax[k, 0], bmin[k, 1], bmax[k, 1], bmin[k, 2], bmax[k, 2])
        out[j, _M3_EULER] = euler_3d(m)
        out[j, _M3_SURFACE] = surface_area(m, lut)
        out[j, _M3_SURFACE_UM] = surface_area(m, lut_um)
        out[j, _M3_AREA_CONVEX] = convex_volume_3d(m)
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
        out[j, _M3_MU200], out[j, _M3_MU020], out[j, _M3_MU002] = s[0], s[1], s[2]
        out[j, _M3_MU110], out[j, _M3_MU101], out[j, _M3_MU011] = s[3], s[4], s[5]
    return out


@kernel
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


@kernel
def _radix_sort_u16(keys, lo, hi, out):
    """Sort 16-bit unsigned keys (all within [lo, hi]) into `out` (float64) by counting: one pass of
    key - lo when the keys span at most 256 values, else two stable 8-bit passes."""
    n = keys.shape[0]
    if hi - lo < 256:
        c = np.zeros(257, np.int64)
        for i in range(n):
            c[keys[i] - lo + 1] += 1
        for b in range(256):
            c[b + 1] += c[b]
        for i in range(n):
            d = keys[i] - lo
            out[c[d]] = keys[i]
            c[d] += 1
        return
    tmp = np.empty(n, np.uint16)
    c0 = np.zeros(257, np.int64)
    c1 = np.zeros(257, np.int64)
    for i in range(n):  # both digits' histograms in one pass
        c0[(keys[i] & 0xFF) + 1] += 1
        c1[(keys[i] >> 8) + 1] += 1
    for b in range(256):
        c0[b + 1] += c0[b]
        c1[b + 1] += c1[b]
    for i in range(n):
        d = keys[i] & 0xFF
        tmp[c0[d]] = keys[i]
        c0[d] += 1
    for i in range(n):
        d = tmp[i] >> 8
        out[c1[d]] = tmp[i]
        c1[d] += 1


@kernel
def _first_not_below(v, x):
    """`np.searchsorted(v, x)` of sorted v (NaN last, as numpy sorts it): the first i with v[i] >= x, or where x
    is NaN the first NaN. Written out because numba's searchsorted lives in numba.np.arraymath, whose environment,
    unpickled with a cached kernel, imports scipy.linalg: about 75 ms of every process's start."""
    lo = 0
    hi = v.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        a = v[mid]
        if a < x or (x != x and a == a):  # a before x in numpy's order, where NaN is largest
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _mad_sorted(v, med):
    """median(|v - med|) of sorted v without a second sort: the deviations below the median, read right to
    left, and those above it, read left to right, are two sorted runs; merge them up to the middle."""
    n = v.shape[0]
    split = _first_not_below(v, med)  # v[:split] < med <= v[split:]
    want_lo = (n - 1) // 2
    want_hi = min(want_lo + 1, n - 1)
    i = split - 1  # next deviation from the left run: med - v[i]
    k = split  # next from the right run: v[k] - med
    a = 0.0
    b = 0.0
    for t in range(want_hi + 1):
        if k >= n or (i >= 0 and med - v[i] <= v[k] - med):
            d = med - v[i]
            i -= 1
        else:
            d = v[k] - med
            k += 1
        if t == want_lo:
            a = d
        if t == want_hi:
            b = d
    pos = 0.5 * (n - 1)
    frac = pos - want_lo
    if frac >= 0.5:
        return b - (b - a) * (1.0 - frac)
    return a + (b - a) * frac


@kernel
def intensity_crop(idx, sel, counts, bmin, bmax, chans, small_uint, offset):
    """Per-object intensity features of every channel of a (C, Z, Y, X) block (columns `INTENSITY`).

    Returns (len(sel), C * len(INTENSITY)), channel-major. Median and quantiles as numpy.quantile (linear);
    MAD = median(|v - median|) (scipy's median_abs_deviation, scale 1); skewness and kurtosis as
    scipy.stats.skew / kurtosis (biased, Fisher: 0 for a normal distribution), NaN for a constant object;
    boundary mean over the object's pixels with a face neighbour outside the object (4-connected in 2D,
    6-connected in 3D); and the object's sum, min, max (NaN propagates, as in numpy), sum of squared
    deviations from its mean (two passes) and intensity-weighted coordinate sums, with coordinates global
    (block index + `offset`), so that the streaming statistics need not be computed again for objects
    measured here. Each object's pixels and boundary are found once for all channels. `small_uint` says
    the image is 8- or 16-bit unsigned, whose values are sorted by counting rather than by comparison.
    """
    nc = chans.shape[0]
    ni = len(INTENSITY)
    out = np.empty((sel.shape[0], nc * ni), np.float64)
    nz, ny, nx = idx.shape
    plane = ny * nx
    for j in range(sel.shape[0]):
        k = sel[j]
        n = counts[k]
        pos = np.empty(n, np.int64)  # flat index of each pixel in the block
        gz = np.empty(n, np.float64)  # global coordinates, for the weighted sums
        gy = np.empty(n, np.float64)
        gx = np.empty(n, np.float64)
        edge = np.empty(n, np.bool_)
        i = 0
        for z in range(bmin[k, 0], bmax[k, 0] + 1):
            for y in range(bmin[k, 1], bmax[k, 1] + 1):
                for x in range(bmin[k, 2], bmax[k, 2] + 1):
                    if idx[z, y, x] != k:
                        continue
                    inner = (y > 0 and idx[z, y - 1, x] == k) and (y < ny - 1 and idx[z, y + 1, x] == k) and (
                        x > 0 and idx[z, y, x - 1] == k) and (x < nx - 1 and idx[z, y, x + 1] == k)
                    if nz > 1:
                        inner = inner and (z > 0 and idx[z - 1, y, x] == k) and (z < nz - 1 and idx[z + 1, y, x] == k)
                    pos[i] = z * plane + y * nx + x
                    gz[i], gy[i], gx[i] = z + offset[0], y + offset[1], x + offset[2]
                    edge[i] = not inner
                    i += 1
        v = np.empty(n, np.float64)
        keys = np.empty(n if small_uint else 0, np.uint16)
        for c in range(nc):
            img = chans[c].ravel()
            bsum = 0.0
            bn = 0
            total = 0.0
            wz = 0.0
            wy = 0.0
            wx = 0.0
            lo = np.inf
            hi = -np.inf
            for t in range(n):
                raw = img[pos[t]]
                val = np.float64(raw)
                v[t] = val
                total += val
                wz += val * gz[t]
                wy += val * gy[t]
                wx += val * gx[t]
                if val < lo or val != val:
                    lo = val
                if val > hi or val != val:
                    hi = val
                if small_uint:
                    keys[t] = np.uint16(raw)
                if edge[t]:
                    bsum += val
                    bn += 1
            mean = total / n
            m2 = 0.0
            m3 = 0.0
            m4 = 0.0
            for t in range(n):
                d = v[t] - mean
                d2 = d * d
                m2 += d2
                m3 += d2 * d
                m4 += d2 * d2
            o = c * ni
            out[j, o + _I_SUM] = total
            out[j, o + _I_MIN] = lo
            out[j, o + _I_MAX] = hi
            out[j, o + _I_M2] = m2
            out[j, o + _I_WSUM_Z] = wz
            out[j, o + _I_WSUM_Y] = wy
            out[j, o + _I_WSUM_X] = wx
            m2 /= n
            m3 /= n
            m4 /= n
            if small_uint:
                _radix_sort_u16(keys, int(lo), int(hi), v)
            else:
                v.sort()
            if v[n - 1] != v[n - 1]:  # a NaN pixel (sorted last): the order statistics are NaN, as in numpy
                for slot in _I_ORDER_STATS:
                    out[j, o + slot] = np.nan
            else:
                med = _quantile_sorted(v, 0.5)
                out[j, o + _I_MEDIAN] = med
                for i in range(len(QUANTILES)):
                    out[j, o + _I_QUANTILES[i]] = _quantile_sorted(v, _QUANTILE_FRACTIONS[i])
                out[j, o + _I_MAD] = _mad_sorted(v, med)
            if m2 > 0:
                out[j, o + _I_SKEWNESS] = m3 / m2**1.5
                out[j, o + _I_KURTOSIS] = m4 / (m2 * m2) - 3.0
            else:
                out[j, o + _I_SKEWNESS] = np.nan
                out[j, o + _I_KURTOSIS] = np.nan
            out[j, o + _I_BOUNDARY_MEAN] = bsum / bn
    return out


_GLCM_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))  # skimage's (round(sin a), round(cos a)) for a = 0, pi/4, pi/2, 3pi/4


@kernel
def quantise(vals, levels):
    """Object levels 1..levels, linear between the object's min and max (all 1 for a constant object)."""
    lo = vals.min()
    hi = vals.max()
    out = np.ones(vals.shape[0], np.int64)
    if hi > lo:
        for i in range(vals.shape[0]):
            q = int(math.floor((vals[i] - lo) / (hi - lo) * levels))
            out[i] = min(q, levels - 1) + 1
    return out


@kernel
def _graycoprops_mean(glcm, levels):
    """skimage.feature.graycoprops of each angle's (levels x levels) matrix, averaged over the angles."""
    res = np.zeros(len(TEXTURE), np.float64)
    n_angles = glcm.shape[0]
    for a in range(n_angles):
        total = glcm[a].sum()
        p = glcm[a] / (total if total > 0 else 1.0)
        contrast = dissim = homog = asm = ent = 0.0
        mi = mj = 0.0
        for i in range(levels):
            for j in range(levels):
                v = p[i, j]
                d = i - j
                contrast += v * d * d
                dissim += v * abs(d)
                homog += v / (1.0 + d * d)
                asm += v * v
                if v != 0:
                    ent -= v * math.log(v)
                mi += i * v
                mj += j * v
        si = sj = cov = 0.0
        for i in range(levels):
            for j in range(levels):
                v = p[i, j]
                si += v * (i - mi) ** 2
                sj += v * (j - mj) ** 2
                cov += v * (i - mi) * (j - mj)
        si = math.sqrt(si)
        sj = math.sqrt(sj)
        corr = 1.0 if (si < 1e-15 or sj < 1e-15) else cov / (si * sj)
        res[_T_CONTRAST] += contrast
        res[_T_DISSIMILARITY] += dissim
        res[_T_HOMOGENEITY] += homog
        res[_T_ENERGY] += math.sqrt(asm)
        res[_T_CORRELATION] += corr
        res[_T_ASM] += asm
        res[_T_ENTROPY] += ent
    return res / n_angles


@kernel
def texture_crop(idx, sel, counts, bmin, bmax, chans, levels):
    """Haralick features (columns `TEXTURE`) of every channel of a (C, 1, Y, X) block, channel-major.

    Per object and channel: the object's pixels quantised by `quantise`, the background of its crop as
    level 0; the grey-level co-occurrence matrix at distance 1 and angles 0, pi/4, pi/2, 3pi/4, symmetric
    (skimage.feature.graycomatrix), without the background's row and column; skimage.feature.graycoprops
    of it, averaged over the four angles.
    """
    nc = chans.shape[0]
    nt = len(TEXTURE)
    out = np.empty((sel.shape[0], nc * nt), np.float64)
    for j in range(sel.shape[0]):
        k = sel[j]
        y0, y1, x0, x1 = bmin[k, 1], bmax[k, 1], bmin[k, 2], bmax[k, 2]
        h, w = y1 - y0 + 1, x1 - x0 + 1
        n = counts[k]
        py = np.empty(n, np.int64)
        px = np.empty(n, np.int64)
        t = 0
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                if idx[0, y, x] == k:
                    py[t], px[t] = y, x
                    t += 1
        vals = np.empty(n, np.float64)
        q = np.zeros((h, w), np.int64)
        for c in range(nc):
            finite = True
            for t in range(n):
                vals[t] = chans[c, 0, py[t], px[t]]
                finite = finite and math.isfinite(vals[t])
            if not finite:  # no linear quantisation between the object's min and max
                out[j, c * nt:(c + 1) * nt] = np.nan
                continue
            lv = quantise(vals, levels)
            for t in range(n):
                q[py[t] - y0, px[t] - x0] = lv[t]
            glcm = np.zeros((4, levels, levels), np.float64)
            for a in range(4):
                dr, dc = _GLCM_OFFSETS[a]
                for r in range(max(0, -dr), min(h, h - dr)):
                    for cc in range(max(0, -dc), min(w, w - dc)):
                        i1 = q[r, cc]
                        i2 = q[r + dr, cc + dc]
                        if i1 > 0 and i2 > 0:
                            glcm[a, i1 - 1, i2 - 1] += 1.0
                            glcm[a, i2 - 1, i1 - 1] += 1.0  # symmetric
            out[j, c * nt:(c + 1) * nt] = _graycoprops_mean(glcm, levels)
    return out
