"""The feature registry: every column of the objects table, declared once.

Each `Feature` names its column template, group, dimensionality, dtype, unit, description, its
scikit-image `regionprops_table` equivalent (if any), the kernel that feeds it and the function that
finishes it from a `Results` (merged streaming statistics, whole-object kernel columns, touching pairs).
The schema JSON (`schemas/objects.json`), the concrete columns of every store, the README's feature table,
the choice of kernels to run and the exactness tests are all driven from `FEATURES`.

Templates: ``{axis}`` is a spatial axis name (``z``, ``y``, ``x``), ``{channel}`` a channel's column suffix,
``{k}`` a component index, ``{ndim}`` the number of spatial dimensions. Units: ``{px}`` is ``pixel`` in 2D
and ``voxel`` in 3D, ``{length}`` is ``micrometer`` for calibrated images and ``pixel`` otherwise. Physical
(``_um``) columns are in micrometres, converted from the NGFF axis units, and present only when every spatial
axis has a length unit (and, for perimeters, when the pixels are square, as regionprops requires).

Kernels: ``stats`` (the streaming pass: counts, sums, extrema, moments of intensity), ``shape`` and
``intensity_crop`` (whole-object kernels on each object's crop), ``touching`` (face-sharing label pairs),
``spatial`` (centroid neighbourhoods, after the merge). The whole-object kernels' columns are read by the names
`shape_kernels` declares them under (`MORPH_2D`, `MORPH_3D`, `INTENSITY`, `TEXTURE`), which also give the
quantiles and the texture features.

Run ``python -m cellar.measure --write-schema --update-readme`` to regenerate ``schemas/objects.json`` and the
README's feature table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .accumulate import Stats
from .shape_kernels import QUANTILES, TEXTURE_MEANINGS
from ..schemas.errors import UsageError

GROUPS = ("morphology", "intensity", "spatial", "texture")
DEFAULT_GROUPS = ("morphology", "intensity", "spatial")
DEFAULT_RADIUS_UM = 20.0
DEFAULT_RADIUS_PX = 50.0


@dataclass(frozen=True)
class Geometry:
    """What a feature needs to know about the image besides the statistics."""

    axes: tuple[str, ...]  # spatial axis names, e.g. ("y", "x")
    spacing_um: tuple[float, ...] | None  # pixel size per spatial axis, None if uncalibrated
    origin_um: tuple[float, ...] | None  # NGFF translation per spatial axis
    channels: tuple[str, ...]  # channel column suffixes
    radius: float = DEFAULT_RADIUS_UM  # neighbourhood radius, micrometres (pixels when uncalibrated)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    @property
    def spacing(self) -> np.ndarray:
        """Pixel size per axis in micrometres, or ones for an uncalibrated image."""
        return np.asarray(self.spacing_um if self.spacing_um else (1.0,) * self.ndim, np.float64)

    @property
    def isotropic(self) -> bool:
        """Square (2D) pixels in physical units: what regionprops needs for physical perimeters."""
        return self.spacing_um is not None and len(set(self.spacing_um[-2:])) == 1


@dataclass
class Results:
    """Everything features are finished from, row-aligned with `stats.ids`."""

    stats: Stats
    crop: dict[str, np.ndarray] = field(default_factory=dict)  # whole-object kernel columns
    touching: np.ndarray | None = None  # face-sharing neighbours per object
    cache: dict = field(default_factory=dict)  # values shared by several features (neighbour queries)
    subset: bool = False  # some objects only (`rows`): features over all objects must be in the cache

    def rows(self, sel: np.ndarray, stats: Stats, crop: dict[str, np.ndarray]) -> Results:
        """The results of the objects at positions `sel`, given their `stats` and whole-object columns
        `crop`. Needs `prepare` first: the neighbour queries are over all objects and come from the cache."""
        neighbours = self.cache.get("neighbours")
        return Results(stats=stats, crop=crop,
                       touching=None if self.touching is None else self.touching[sel],
                       cache={} if neighbours is None else {"neighbours": {k: v[sel] for k, v in neighbours.items()}},
                       subset=True)


def prepare(results: Results, geo: Geometry, features: tuple[Feature, ...]) -> None:
    """Compute the values that need every object at once (the neighbour queries of the spatial group), so
    that columns can then be finished a slice of objects at a time (`Results.rows`)."""
    if any(f.kernel == "spatial" and next(f.columns(geo), None) is not None for f in features):
        results.cache["neighbours"] = _spatial_neighbours(results, geo)


@dataclass(frozen=True)
class Column:
    """One concrete column of a store's objects table."""

    name: str
    dtype: str
    unit: str
    description: str
    feature: str
    axis: int | None = None  # index into the spatial axes, for per-axis features
    channel: int | None = None  # index into the channels, for per-channel features
    component: int | None = None  # index of a multi-valued feature (moments_hu_{k})
    skimage: str | None = None  # regionprops_table column to compare with
    skimage_spacing: bool = False  # regionprops must be given the physical spacing (and offset)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "unit": self.unit, "description": self.description}


@dataclass(frozen=True)
class Feature:
    """The declaration of one feature; see the module docstring for the templates."""

    name: str
    group: str
    description: str
    dtype: str
    unit: str
    compute: Callable[[Results, Geometry], np.ndarray]
    kernel: str = "stats"
    dims: tuple[int, ...] = (2, 3)
    per_axis: bool = False
    per_channel: bool = False
    components: int = 0  # number of {k} components; -1 means one per spatial dimension
    physical: bool = False
    isotropic: bool = False
    skimage: str | None = None
    key: bool = False
    # the streamed statistics it reads beyond counts, coordinates, bounds and intensity sum/min/max, which the
    # streaming pass computes only where a selected feature asks (`streams_needed`): "spread" (the sum of
    # squared deviations, a second pass) and "weighted" (intensity-weighted coordinate sums)
    streams: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        """The name without its template parts, as users select it: `intensity_mean`, `centroid_um`."""
        return re.sub(r"_*\{(axis|channel|k|ndim)\}", "", self.name)

    def n_components(self, ndim: int) -> int:
        return ndim if self.components == -1 else self.components

    def columns(self, geo: Geometry) -> Iterator[Column]:
        """The concrete columns this feature gives for an image of this geometry."""
        if geo.ndim not in self.dims or (self.physical and geo.spacing_um is None):
            return
        if self.isotropic and not geo.isotropic:
            return
        unit = self.unit.format(px="pixel" if geo.ndim == 2 else "voxel", ndim=geo.ndim,
                                length="micrometer" if geo.spacing_um else "pixel")
        base = dict(dtype=self.dtype, unit=unit, feature=self.name, skimage_spacing=self.physical)
        axes = list(enumerate(geo.axes)) if self.per_axis else [(None, "")]
        channels = list(enumerate(geo.channels)) if self.per_channel else [(None, "")]
        comps = range(self.n_components(geo.ndim)) if self.components else [None]
        for c, channel in channels:
            for i, axis in axes:
                for k in comps:
                    fmt = dict(axis=axis, channel=channel, k=k, ndim=geo.ndim, radius=f"{geo.radius:g}",
                               length="micrometres" if geo.spacing_um else "pixels")
                    sk = self.skimage.format(i=i, j=(i or 0) + geo.ndim, k=k) if self.skimage else None
                    yield Column(self.name.format(**fmt), description=self.description.format(**fmt),
                                 axis=i, channel=c, component=k, skimage=sk, **base)

    def to_json(self) -> dict:
        return {
            "name": self.name, "group": self.group, "dims": list(self.dims), "per_axis": self.per_axis,
            "per_channel": self.per_channel, "components": self.components, "physical": self.physical,
            "dtype": self.dtype, "unit": self.unit, "description": self.description, "skimage": self.skimage,
            "kernel": self.kernel,
        }


# --- finishing functions -------------------------------------------------------------------------------


def _spatial(geo: Geometry, arr: np.ndarray) -> np.ndarray:
    """The last `ndim` columns of an (n, 3) z/y/x statistic (2D images carry a z of 0)."""
    return arr[..., 3 - geo.ndim:]


def _centroid(r: Results, geo: Geometry) -> np.ndarray:
    return _spatial(geo, r.stats.coord_sum) / r.stats.count[:, None]


def _centroid_um(r: Results, geo: Geometry) -> np.ndarray:
    return _centroid(r, geo) * geo.spacing + np.asarray(geo.origin_um)


def _physical_area(r: Results, geo: Geometry) -> np.ndarray:
    return r.stats.count * float(np.prod(geo.spacing))


def _weighted_centroid(r: Results, geo: Geometry) -> np.ndarray:
    """(n, ndim, C): sum(I * coordinate) / sum(I), per axis and channel (NaN where sum(I) is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.moveaxis(_spatial(geo, r.stats.wcoord) / r.stats.isum[:, :, None], 2, 1)


def _moments2(r: Results, geo: Geometry, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(second-order central moments as an (n, ndim, ndim) covariance sum, mu0) scaled by `spacing`."""
    c = r.crop
    n = len(r.stats)
    cov = np.empty((n, geo.ndim, geo.ndim))
    if geo.ndim == 2:
        sy, sx = spacing
        cov[:, 0, 0], cov[:, 1, 1] = c["mu20"] * sy * sy, c["mu02"] * sx * sx
        cov[:, 0, 1] = cov[:, 1, 0] = c["mu11"] * sy * sx
    else:
        sz, sy, sx = spacing
        cov[:, 0, 0], cov[:, 1, 1], cov[:, 2, 2] = c["mu200"] * sz * sz, c["mu020"] * sy * sy, c["mu002"] * sx * sx
        cov[:, 0, 1] = cov[:, 1, 0] = c["mu110"] * sz * sy
        cov[:, 0, 2] = cov[:, 2, 0] = c["mu101"] * sz * sx
        cov[:, 1, 2] = cov[:, 2, 1] = c["mu011"] * sy * sx
    return cov, r.stats.count.astype(np.float64)


def _inertia_tensor(r: Results, geo: Geometry, spacing: np.ndarray) -> np.ndarray:
    """regionprops' inertia_tensor: I_ii = sum of the other axes' second moments, I_ij = -mu_ij, over mu0."""
    cov, mu0 = _moments2(r, geo, spacing)
    diag = np.einsum("nii->ni", cov)
    tensor = -cov
    idx = np.arange(geo.ndim)
    tensor[:, idx, idx] = diag.sum(axis=1, keepdims=True) - diag
    return tensor / mu0[:, None, None]


def _eigvals(r: Results, geo: Geometry, spacing: np.ndarray | None = None) -> np.ndarray:
    """Inertia tensor eigenvalues, clipped at 0, largest first (as regionprops' inertia_tensor_eigvals);
    cached, since several features share them."""
    key = ("eigvals", None if spacing is None else tuple(spacing))
    if key not in r.cache:
        tensor = _inertia_tensor(r, geo, np.ones(geo.ndim) if spacing is None else spacing)
        ev = np.clip(np.linalg.eigvalsh(tensor), 0, None) if len(tensor) else np.zeros((0, geo.ndim))
        r.cache[key] = ev[:, ::-1]
    return r.cache[key]


def _axis_lengths(r: Results, geo: Geometry, spacing: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    ev = _eigvals(r, geo, spacing)
    if geo.ndim == 2:
        return 4 * np.sqrt(ev[:, 0]), 4 * np.sqrt(ev[:, -1])
    major = np.sqrt(np.maximum(0, 10 * (ev[:, 0] + ev[:, 1] - ev[:, 2])))
    minor = np.sqrt(np.maximum(0, 10 * (-ev[:, 0] + ev[:, 1] + ev[:, 2])))
    return major, minor


def _eccentricity(r: Results, geo: Geometry) -> np.ndarray:
    ev = _eigvals(r, geo)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ev[:, 0] == 0, 0.0, np.sqrt(1 - ev[:, 1] / ev[:, 0]))


def _orientation(r: Results, geo: Geometry) -> np.ndarray:
    t = _inertia_tensor(r, geo, np.ones(2))
    a, b, c = t[:, 0, 0], t[:, 0, 1], t[:, 1, 1]
    tie = np.where(b < 0, np.pi / 4, -np.pi / 4)
    return np.where(a - c == 0, tie, 0.5 * np.arctan2(-2 * b, c - a))


def _hu(r: Results, geo: Geometry) -> np.ndarray:
    """The seven Hu moments from normalised central moments (skimage.measure.moments_hu)."""
    c, mu0 = r.crop, r.stats.count.astype(np.float64)

    def nu(p: int, q: int) -> np.ndarray:
        return c[f"mu{p}{q}"] / mu0 ** ((p + q) / 2 + 1)

    n20, n02, n11 = nu(2, 0), nu(0, 2), nu(1, 1)
    n30, n03, n21, n12 = nu(3, 0), nu(0, 3), nu(2, 1), nu(1, 2)
    t0, t1 = n30 + n12, n21 + n03
    q0, q1 = t0 * t0, t1 * t1
    n4 = 4 * n11
    s, d = n20 + n02, n20 - n02
    hu = np.empty((len(mu0), 7))
    hu[:, 0] = s
    hu[:, 1] = d * d + n4 * n11
    hu[:, 3] = q0 + q1
    hu[:, 5] = d * (q0 - q1) + n4 * t0 * t1
    t0 = t0 * (q0 - 3 * q1)
    t1 = t1 * (3 * q0 - q1)
    q0, q1 = n30 - 3 * n12, 3 * n21 - n03
    hu[:, 2] = q0 * q0 + q1 * q1
    hu[:, 4] = q0 * t0 + q1 * t1
    hu[:, 6] = q1 * t0 - q0 * t1
    return hu


def _equivalent_diameter(area: np.ndarray, geo: Geometry) -> np.ndarray:
    return (2 * geo.ndim * area / math.pi) ** (1 / geo.ndim)


def _extent(r: Results, geo: Geometry) -> np.ndarray:
    box = np.prod(_spatial(geo, r.stats.bbox_max - r.stats.bbox_min + 1), axis=1)
    return r.stats.count / box


def _per_channel(name: str) -> Callable[[Results, Geometry], np.ndarray]:
    """An (n, C) array of the whole-object intensity column `name` of every channel."""
    return lambda r, g: np.stack([r.crop[f"{name}__{c}"] for c in range(len(g.channels))], axis=1)


def _sphericity(r: Results, geo: Geometry) -> np.ndarray:
    volume = _physical_area(r, geo)
    area = r.crop["surface_area_um"] if geo.spacing_um else r.crop["surface_area"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area


def _circularity(r: Results, geo: Geometry) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r.crop["perimeter"] > 0, 4 * math.pi * r.stats.count / r.crop["perimeter"] ** 2, np.nan)


def _spatial_neighbours(r: Results, geo: Geometry) -> dict[str, np.ndarray]:
    """Nearest neighbour (distance, id) and count within the radius, from the centroids (physical if known)."""
    from scipy.spatial import cKDTree

    pts = _centroid_um(r, geo) if geo.spacing_um else _centroid(r, geo)
    n = len(pts)
    dist = np.full(n, np.nan)
    nn_id = np.zeros(n, np.uint64)
    within = np.zeros(n, np.int64)
    if n >= 2:
        tree = cKDTree(pts)
        d, i = tree.query(pts, k=min(n, 3), workers=-1)
        d = np.where(i == np.arange(n)[:, None], np.inf, d)  # each point itself (not always first: ties at 0)
        best = d.argmin(axis=1)
        dist = d[np.arange(n), best]
        nn_id = r.stats.ids[i[np.arange(n), best]]
        # Ties (equal distances to rounding) go to the smallest label_id, whatever order the tree returns:
        # points with a second neighbour at their nearest distance (or possibly beyond the k returned) are
        # settled with a ball query.
        close = d <= dist[:, None] * (1 + 1e-9)
        for p in np.flatnonzero((close.sum(axis=1) >= 2) | close[:, -1]):
            near = [q for q in tree.query_ball_point(pts[p], dist[p] * (1 + 1e-9)) if q != p]
            nn_id[p] = r.stats.ids[near].min()
        within = tree.query_ball_point(pts, geo.radius, return_length=True, workers=-1) - 1
    return {"distance": dist, "id": nn_id, "within": np.asarray(within, np.int64)}


def _cached_neighbours(key: str) -> Callable[[Results, Geometry], np.ndarray]:
    def compute(r: Results, g: Geometry) -> np.ndarray:
        if "neighbours" not in r.cache:
            if r.subset:
                raise RuntimeError("bug: neighbour queries on a subset of the objects (call prepare first)")
            r.cache["neighbours"] = _spatial_neighbours(r, g)
        return r.cache["neighbours"][key]

    return compute


_Q = "Linear-interpolated {q} quantile of channel {{channel}} over the object's pixels (numpy.quantile)."

FEATURES: tuple[Feature, ...] = (
    Feature("label_id", "key", "The object's value in the label image (0 is background and never a row).",
            "uint64", "", lambda r, g: r.stats.ids, key=True),
    # --- morphology: streaming ------------------------------------------------------------------------
    Feature("area", "morphology", "Number of pixels (voxels in 3D) of the object.", "int64", "{px}",
            lambda r, g: r.stats.count, skimage="num_pixels"),
    Feature("area_um{ndim}", "morphology",
            "Physical area (volume in 3D): pixel count times the product of the pixel sizes.",
            "float64", "micrometer^{ndim}", _physical_area, physical=True, skimage="area"),
    Feature("bbox_min_{axis}", "morphology", "First {axis} index of the bounding box (inclusive).", "int64",
            "{px}", lambda r, g: _spatial(g, r.stats.bbox_min), per_axis=True, skimage="bbox-{i}"),
    Feature("bbox_max_{axis}", "morphology",
            "End {axis} index of the bounding box (exclusive, as regionprops' bbox and Python slices).", "int64",
            "{px}", lambda r, g: _spatial(g, r.stats.bbox_max) + 1, per_axis=True, skimage="bbox-{j}"),
    Feature("centroid_{axis}", "morphology", "Mean {axis} pixel index of the object's pixels.", "float64",
            "{px}", _centroid, per_axis=True, skimage="centroid-{i}"),
    Feature("centroid_{axis}_um", "morphology",
            "Centroid {axis} in physical coordinates: centroid_{axis} x pixel size + the NGFF translation "
            "(regionprops(spacing=...) centroid plus the image's translation).",
            "float64", "micrometer", _centroid_um, per_axis=True, physical=True, skimage="centroid-{i}"),
    Feature("extent", "morphology", "Area over bounding-box area (volume over box volume in 3D).", "float64", "dimensionless",
            _extent, skimage="extent"),
    Feature("equivalent_diameter", "morphology",
            "Diameter of the disc (sphere in 3D) with the object's area (volume), in pixels.", "float64", "{px}",
            lambda r, g: _equivalent_diameter(r.stats.count.astype(float), g), skimage="equivalent_diameter_area"),
    Feature("equivalent_diameter_um", "morphology",
            "Diameter of the disc (sphere in 3D) with the object's physical area (volume).", "float64",
            "micrometer", lambda r, g: _equivalent_diameter(_physical_area(r, g), g), physical=True,
            skimage="equivalent_diameter_area"),
    # --- morphology: whole-object kernels ---------------------------------------------------------------
    Feature("perimeter", "morphology",
            "Perimeter (skimage.measure.perimeter, 4-connected border, weighted by neighbourhood), in pixels.",
            "float64", "pixel", lambda r, g: r.crop["perimeter"], kernel="shape", dims=(2,), skimage="perimeter"),
    Feature("perimeter_um", "morphology", "Perimeter in micrometres (square pixels only, as regionprops).",
            "float64", "micrometer", lambda r, g: r.crop["perimeter"] * g.spacing[-1], kernel="shape", dims=(2,),
            physical=True, isotropic=True, skimage="perimeter"),
    Feature("perimeter_crofton", "morphology", "Crofton perimeter estimate (4 directions), in pixels.",
            "float64", "pixel", lambda r, g: r.crop["perimeter_crofton"], kernel="shape", dims=(2,),
            skimage="perimeter_crofton"),
    Feature("perimeter_crofton_um", "morphology", "Crofton perimeter in micrometres (square pixels only).",
            "float64", "micrometer", lambda r, g: r.crop["perimeter_crofton"] * g.spacing[-1], kernel="shape",
            dims=(2,), physical=True, isotropic=True, skimage="perimeter_crofton"),
    Feature("circularity", "morphology",
            "4 pi area / perimeter^2 with `perimeter` above (about 1 for a disc; NaN for a zero perimeter, "
            "i.e. a single pixel).", "float64", "dimensionless", _circularity, kernel="shape", dims=(2,)),
    Feature("area_convex", "morphology",
            "Pixels (voxels) of the convex hull image (skimage.morphology.convex_hull_image: centres inside or on "
            "the hull of the pixels' diamond corners). 3D objects whose voxel centres are coplanar get their true "
            "hull here, where scikit-image's Qhull call fails and it returns 0.", "float64", "{px}",
            lambda r, g: r.crop["area_convex"], kernel="shape", skimage="area_convex"),
    Feature("area_convex_um{ndim}", "morphology", "Physical area (volume) of the convex hull image.", "float64",
            "micrometer^{ndim}", lambda r, g: r.crop["area_convex"] * float(np.prod(g.spacing)), kernel="shape",
            physical=True, skimage="area_convex"),
    Feature("solidity", "morphology", "Area (volume) over convex hull area (volume).", "float64", "dimensionless",
            lambda r, g: r.stats.count / r.crop["area_convex"], kernel="shape", skimage="solidity"),
    Feature("feret_diameter_max", "morphology",
            "Largest distance between points of the convex hull's contour (regionprops' definition), in pixels.",
            "float64", "pixel", lambda r, g: r.crop["feret_diameter_max"], kernel="shape", dims=(2,),
            skimage="feret_diameter_max"),
    Feature("feret_diameter_max_um", "morphology", "Maximum Feret diameter in micrometres.", "float64",
            "micrometer", lambda r, g: r.crop["feret_diameter_max_um"], kernel="shape", dims=(2,), physical=True,
            skimage="feret_diameter_max"),
    Feature("euler_number", "morphology",
            "Euler characteristic: objects minus holes (8-connected in 2D; 26-connected in 3D).", "int64", "count",
            lambda r, g: r.crop["euler_number"], kernel="shape", skimage="euler_number"),
    Feature("axis_major_length", "morphology",
            "Major axis of the ellipse (ellipsoid) with the same second moments, in pixels.", "float64", "{px}",
            lambda r, g: _axis_lengths(r, g)[0], kernel="shape", skimage="axis_major_length"),
    Feature("axis_minor_length", "morphology",
            "Minor axis of the ellipse (ellipsoid) with the same second moments, in pixels.", "float64", "{px}",
            lambda r, g: _axis_lengths(r, g)[1], kernel="shape", skimage="axis_minor_length"),
    Feature("axis_major_length_um", "morphology", "Major axis length from the physical second moments.",
            "float64", "micrometer", lambda r, g: _axis_lengths(r, g, g.spacing)[0], kernel="shape", physical=True,
            skimage="axis_major_length"),
    Feature("axis_minor_length_um", "morphology", "Minor axis length from the physical second moments.",
            "float64", "micrometer", lambda r, g: _axis_lengths(r, g, g.spacing)[1], kernel="shape", physical=True,
            skimage="axis_minor_length"),
    Feature("surface_area", "morphology",
            "Area of the object's marching-cubes mesh (skimage.measure.marching_cubes at level 0.5 on its crop "
            "padded by one voxel, then mesh_surface_area), in voxel units.", "float64", "voxel^2",
            lambda r, g: r.crop["surface_area"], kernel="shape", dims=(3,)),
    Feature("surface_area_um2", "morphology", "Marching-cubes mesh area with the physical voxel size.", "float64",
            "micrometer^2", lambda r, g: r.crop["surface_area_um"], kernel="shape", dims=(3,), physical=True),
    Feature("sphericity", "morphology",
            "pi^(1/3) (6 V)^(2/3) / A with V the volume and A the surface area above (physical units when "
            "calibrated, else voxels): 1 for a sphere, less for other shapes (the mesh makes small objects "
            "deviate).", "float64", "dimensionless", lambda r, g: _sphericity(r, g), kernel="shape", dims=(3,)),
    Feature("eccentricity", "morphology",
            "Eccentricity of the ellipse with the same second moments (0 a circle, towards 1 a line), in the "
            "pixel grid.", "float64", "dimensionless", _eccentricity, kernel="shape", dims=(2,), skimage="eccentricity"),
    Feature("orientation", "morphology",
            "Angle between the image's first (y) axis and the ellipse's major axis, in radians in [-pi/2, pi/2] "
            "(regionprops' convention, pixel grid; pi/2 and -pi/2 are the same axis; undefined, pi/4 or -pi/4, "
            "for objects with an isotropic inertia tensor).",
            "float64", "radian", _orientation, kernel="shape", dims=(2,), skimage="orientation"),
    Feature("moments_hu_{k}", "morphology",
            "Hu moment invariant {k} of the object's mask (skimage.measure.moments_hu); the high orders of "
            "near-symmetric objects are ~0 with rounding-level sign.", "float64", "dimensionless",
            lambda r, g: _hu(r, g), kernel="shape", dims=(2,), components=7, skimage="moments_hu-{k}"),
    Feature("inertia_tensor_eigvals_{k}", "morphology",
            "Eigenvalue {k} (largest first) of the inertia tensor, in pixels^2.", "float64", "pixel^2",
            lambda r, g: _eigvals(r, g), kernel="shape", components=-1, skimage="inertia_tensor_eigvals-{k}"),
    # --- intensity: streaming ---------------------------------------------------------------------------
    Feature("intensity_sum__{channel}", "intensity", "Sum of channel {channel} over the object's pixels.",
            "float64", "a.u.", lambda r, g: r.stats.isum, per_channel=True),
    Feature("intensity_mean__{channel}", "intensity",
            "Mean of channel {channel} over the object's pixels, accumulated in float64 (regionprops averages "
            "float32 images in float32, so for those it can differ from cellar by float32 rounding, ~1e-6).",
            "float64", "a.u.", lambda r, g: r.stats.isum / r.stats.count[:, None], per_channel=True,
            skimage="intensity_mean"),
    Feature("intensity_std__{channel}", "intensity",
            "Population standard deviation (ddof=0) of channel {channel} over the object's pixels.", "float64",
            "a.u.", lambda r, g: np.sqrt(r.stats.m2 / r.stats.count[:, None]), per_channel=True,
            skimage="intensity_std", streams=("spread",)),
    Feature("intensity_min__{channel}", "intensity", "Minimum of channel {channel} over the object's pixels.",
            "float64", "a.u.", lambda r, g: r.stats.imin, per_channel=True, skimage="intensity_min"),
    Feature("intensity_max__{channel}", "intensity", "Maximum of channel {channel} over the object's pixels.",
            "float64", "a.u.", lambda r, g: r.stats.imax, per_channel=True, skimage="intensity_max"),
    Feature("centroid_weighted_{axis}__{channel}", "intensity",
            "Intensity-weighted centroid {axis} (weights: channel {channel}), in pixels; NaN if the object's "
            "intensities sum to 0.", "float64", "{px}",
            _weighted_centroid, per_axis=True, per_channel=True, skimage="centroid_weighted-{i}", streams=("weighted",)),
    Feature("centroid_weighted_{axis}_um__{channel}", "intensity",
            "Intensity-weighted centroid {axis} (weights: channel {channel}) in physical coordinates, with the "
            "NGFF translation.", "float64", "micrometer",
            lambda r, g: _weighted_centroid(r, g) * g.spacing[None, :, None]
            + np.asarray(g.origin_um)[None, :, None],
            per_axis=True, per_channel=True, physical=True, skimage="centroid_weighted-{i}", streams=("weighted",)),
    # --- intensity: whole-object kernels ------------------------------------------------------------------
    Feature("intensity_median__{channel}", "intensity", "Median of channel {channel} over the object's pixels.",
            "float64", "a.u.", _per_channel("median"), kernel="intensity_crop", per_channel=True,
            skimage="intensity_median"),
    *(
        Feature(f"intensity_q{q:02d}__{{channel}}", "intensity", _Q.format(q=f"{q / 100:.2f}"), "float64", "a.u.",
                _per_channel(f"q{q:02d}"), kernel="intensity_crop", per_channel=True)
        for q in QUANTILES
    ),
    Feature("intensity_mad__{channel}", "intensity",
            "Median absolute deviation from the median of channel {channel} (scipy.stats.median_abs_deviation, "
            "scale 1).", "float64", "a.u.", _per_channel("mad"), kernel="intensity_crop", per_channel=True),
    Feature("intensity_skewness__{channel}", "intensity",
            "Skewness of channel {channel} (scipy.stats.skew, biased); NaN for a constant object.", "float64", "dimensionless",
            _per_channel("skewness"), kernel="intensity_crop", per_channel=True),
    Feature("intensity_kurtosis__{channel}", "intensity",
            "Excess kurtosis of channel {channel} (scipy.stats.kurtosis, Fisher, biased); NaN for a constant "
            "object.", "float64", "dimensionless", _per_channel("kurtosis"), kernel="intensity_crop", per_channel=True),
    Feature("intensity_boundary_mean__{channel}", "intensity",
            "Mean of channel {channel} over the object's boundary pixels: those with a face neighbour (4-connected "
            "in 2D, 6-connected in 3D) outside the object.", "float64", "a.u.", _per_channel("boundary_mean"),
            kernel="intensity_crop", per_channel=True),
    # --- spatial --------------------------------------------------------------------------------------------
    Feature("nearest_neighbor_distance", "spatial",
            "Distance from the centroid to the nearest other object's centroid, in {length} (NaN if alone).",
            "float64", "{length}", _cached_neighbours("distance"), kernel="spatial"),
    Feature("nearest_neighbor_id", "spatial",
            "label_id of the nearest other object by centroid (ties go to the smallest id; 0 if alone).",
            "uint64", "", _cached_neighbours("id"), kernel="spatial"),
    Feature("neighbors_within_radius", "spatial",
            "Number of other objects whose centroid lies within {radius} {length} of this centroid (--radius).",
            "int64", "count", _cached_neighbours("within"), kernel="spatial"),
    Feature("touching_neighbors", "spatial",
            "Number of distinct objects sharing a face (4-connected in 2D, 6-connected in 3D) with this one, "
            "exact across chunk borders.", "int64", "count", lambda r, g: r.touching, kernel="touching"),
)

_TEXTURE_DOC = (
    "of channel {channel}: grey-level co-occurrence matrix of the object (its pixels quantised to "
    "--texture-levels levels, linearly between the object's own min and max; the rest of its crop left out), "
    "distance 1, angles 0, 45, 90, 135 degrees, symmetric (skimage.feature.graycomatrix); "
    "skimage.feature.graycoprops averaged over the angles. NaN if a pixel of the object is NaN or infinite."
)
FEATURES = FEATURES + tuple(
    Feature(f"texture_{name.lower()}__{{channel}}", "texture", f"{doc} {_TEXTURE_DOC}", "float64", "dimensionless",
            _per_channel(f"texture_{name}"), kernel="texture", dims=(2,), per_channel=True)
    for name, doc in TEXTURE_MEANINGS.items()
)

# Columns every table has besides the features: the Hive partition keys.
PARTITION_COLUMNS = (
    {"name": "image", "dtype": "string", "unit": "", "description": "Name of the measured image (partition key)."},
    {
        "name": "label_image", "dtype": "string", "unit": "",
        "description": "Name of the label image under the image's labels/ group (partition key).",
    },
)

# Constant columns of tables measured as parts of a collection (`measure.run.measure_many`): HCS plate fields
# and time points measured one table each.
CONTEXT_COLUMNS = {c["name"]: c for c in (
    {"name": "plate", "dtype": "string", "unit": "", "description": "Name of the HCS plate the image belongs to."},
    {"name": "well", "dtype": "string", "unit": "", "description": "Well path in the plate (row/column)."},
    {"name": "row", "dtype": "string", "unit": "", "description": "Well row name."},
    {"name": "column", "dtype": "string", "unit": "", "description": "Well column name."},
    {"name": "field", "dtype": "int64", "unit": "", "description": "Field (image) index within the well."},
    {"name": "timepoint", "dtype": "int64", "unit": "",
     "description": "Index of the time point (t axis) the table was measured at (cellar measure --timepoint all)."},
)}


def select(spec: str | None) -> tuple[Feature, ...]:
    """The features named by `spec`: comma-separated groups ("morphology", ...) or feature names, or "all".

    None selects the default groups (morphology, intensity, spatial). The key column is always included.
    """
    if spec is None:
        wanted = set(DEFAULT_GROUPS)
    else:
        wanted = {w.strip() for w in spec.split(",") if w.strip()}
    if "all" in wanted:
        wanted = (wanted - {"all"}) | {g for g in GROUPS if any(f.group == g for f in FEATURES)}
    names = {f.short for f in FEATURES} | {f.name for f in FEATURES} | set(GROUPS) | {"all"}
    unknown = sorted(wanted - names)
    if unknown:
        import difflib

        shorts = sorted({f.short for f in FEATURES} | set(GROUPS))
        hints = [m for u in unknown for m in difflib.get_close_matches(u, shorts, n=1)]
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        raise UsageError(f"--features: unknown {', '.join(unknown)} (groups: {', '.join(GROUPS)}, or feature "
                         f"names as in `cellar features`){hint}")
    chosen = tuple(f for f in FEATURES if f.key or f.group in wanted or f.name in wanted or f.short in wanted)
    return chosen


def _present(features: tuple[Feature, ...], geo: Geometry) -> list[Feature]:
    """The features which have columns for this geometry."""
    return [f for f in features if any(True for _ in f.columns(geo))]


def kernels_needed(features: tuple[Feature, ...], geo: Geometry) -> set[str]:
    """The kernels that feed the features which have columns for this geometry."""
    return {f.kernel for f in _present(features, geo)}


def streams_needed(features: tuple[Feature, ...], geo: Geometry) -> set[str]:
    """The optional streamed statistics (`Feature.streams`) of the features which have columns for this geometry."""
    return {name for f in _present(features, geo) for name in f.streams}


def columns(geo: Geometry, features: tuple[Feature, ...] = FEATURES) -> list[Column]:
    """Every concrete feature column for an image of this geometry, in table order."""
    return [col for feature in features for col in feature.columns(geo)]


def compute_columns(results: Results, geo: Geometry, features: tuple[Feature, ...] = FEATURES) -> dict[str, np.ndarray]:
    """Finish every feature: column name -> array of one value per object."""
    out: dict[str, np.ndarray] = {}
    for feature in features:
        cols = list(feature.columns(geo))
        if not cols:
            continue
        values = np.asarray(feature.compute(results, geo))
        for col in cols:
            arr = values
            if feature.per_channel and feature.per_axis:
                arr = arr[:, col.axis, col.channel]
            elif feature.per_axis:
                arr = arr[:, col.axis]
            elif feature.per_channel:
                arr = arr[:, col.channel]
            if feature.components:
                arr = arr[:, col.component]
            out[col.name] = np.ascontiguousarray(arr, dtype=col.dtype)
    return out


def schema_json() -> dict:
    """The generated content of `schemas/objects.json`."""
    return {
        "title": "cellar objects table",
        "description": (
            "One row per labelled object, keyed by (image, label_image, label_id). Column names are templates: "
            "{axis} is a spatial axis name, {channel} a channel's column suffix, {k} a component index, {ndim} the "
            "number of spatial dimensions; {px} in a unit is 'pixel' in 2D and 'voxel' in 3D, {length} is "
            "'micrometer' for calibrated images and 'pixel' otherwise. Physical (_um) columns are in micrometres "
            "and present only when every spatial axis has a length unit."
        ),
        "key": ["image", "label_image", "label_id"],
        "groups": list(GROUPS),
        "default_groups": list(DEFAULT_GROUPS),
        "partition_columns": list(PARTITION_COLUMNS),
        "context_columns": list(CONTEXT_COLUMNS.values()),
        "features": [f.to_json() for f in FEATURES],
    }


def markdown_table() -> str:
    """The README's feature table."""
    rows = ["| column | group | dims | dtype | unit | scikit-image | description |", "|---|---|---|---|---|---|---|"]
    for f in FEATURES:
        sk = f"`{f.skimage}`" if f.skimage else "-"
        dims = "/".join(f"{d}D" for d in f.dims)
        desc = f.description.replace("{", "").replace("}", "")
        rows.append(f"| `{f.name}` | {f.group} | {dims} | {f.dtype} | {f.unit or '-'} | {sk} | {desc} |")
    return "\n".join(rows)


SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "objects.json"
README_PATH = Path(__file__).resolve().parent.parent / "README.md"
_README_MARKERS = ("<!-- features:start -->", "<!-- features:end -->")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cellar.measure", description=__doc__.splitlines()[0])
    parser.add_argument("--write-schema", action="store_true", help=f"regenerate schemas/{SCHEMA_PATH.name}")
    parser.add_argument("--markdown", action="store_true", help="print the README feature table")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's feature table")
    args = parser.parse_args(argv)
    if args.write_schema:
        SCHEMA_PATH.write_text(json.dumps(schema_json(), indent=2) + "\n")
        print(f"wrote {SCHEMA_PATH}")
    if args.markdown:
        print(markdown_table())
    if args.update_readme:
        text = README_PATH.read_text()
        start, end = (text.index(m) for m in _README_MARKERS)
        README_PATH.write_text(text[: start + len(_README_MARKERS[0])] + "\n" + markdown_table() + "\n" + text[end:])
        print(f"updated {README_PATH}")
