"""The feature registry: every column of the objects table, declared once.

Each `Feature` names its column template, group, dimensionality, dtype, unit, description, its
scikit-image `regionprops_table` equivalent (if any) and the function that finishes it from the merged
per-label statistics (`measure.accumulate.Stats`). The schema JSON (`schemas/objects.json`), the concrete
columns written into every store, the README's feature table and the exactness tests are all driven from
`FEATURES`.

Templates: ``{axis}`` is a spatial axis name (``z``, ``y``, ``x``), ``{channel}`` a channel's column
suffix, ``{ndim}`` the number of spatial dimensions. Units: ``{px}`` is ``pixel`` in 2D and ``voxel`` in
3D; physical columns are always in micrometres, converted from the NGFF axis units, and present only when
every spatial axis has a length unit.

Run ``python -m measure --write-schema`` to regenerate ``schemas/objects.json`` and
``python -m measure --markdown`` to print the README's table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from measure.accumulate import Stats


@dataclass(frozen=True)
class Geometry:
    """What a feature needs to know about the image besides the statistics."""

    axes: tuple[str, ...]  # spatial axis names, e.g. ("y", "x")
    spacing_um: tuple[float, ...] | None  # pixel size per spatial axis, None if uncalibrated
    origin_um: tuple[float, ...] | None  # NGFF translation per spatial axis
    channels: tuple[str, ...]  # channel column suffixes

    @property
    def ndim(self) -> int:
        return len(self.axes)


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
    compute: Callable[[Stats, Geometry], np.ndarray]
    dims: tuple[int, ...] = (2, 3)
    per_axis: bool = False
    per_channel: bool = False
    physical: bool = False
    skimage: str | None = None
    key: bool = False

    def columns(self, geo: Geometry) -> Iterator[Column]:
        """The concrete columns this feature gives for an image of this geometry."""
        if geo.ndim not in self.dims or (self.physical and geo.spacing_um is None):
            return
        unit = self.unit.format(px="pixel" if geo.ndim == 2 else "voxel", ndim=geo.ndim)
        base = dict(dtype=self.dtype, unit=unit, feature=self.name, skimage_spacing=self.physical)
        if self.per_axis:
            for i, axis in enumerate(geo.axes):
                sk = self.skimage.format(i=i, j=i + geo.ndim) if self.skimage else None
                desc = self.description.format(axis=axis)
                yield Column(self.name.format(axis=axis), description=desc, axis=i, skimage=sk, **base)
        elif self.per_channel:
            for c, channel in enumerate(geo.channels):
                desc = self.description.format(channel=channel)
                name = self.name.format(channel=channel)
                yield Column(name, description=desc, channel=c, skimage=self.skimage, **base)
        else:
            yield Column(self.name.format(ndim=geo.ndim), description=self.description, skimage=self.skimage, **base)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "dims": list(self.dims),
            "per_axis": self.per_axis,
            "per_channel": self.per_channel,
            "physical": self.physical,
            "dtype": self.dtype,
            "unit": self.unit,
            "description": self.description,
            "skimage": self.skimage,
        }


def _spatial(stats: Stats, geo: Geometry, arr: np.ndarray) -> np.ndarray:
    """The last `ndim` columns of an (n, 3) z/y/x statistic (2D images carry a z of 0)."""
    return arr[:, 3 - geo.ndim :]


def _centroid(stats: Stats, geo: Geometry) -> np.ndarray:
    return _spatial(stats, geo, stats.coord_sum) / stats.count[:, None]


def _centroid_um(stats: Stats, geo: Geometry) -> np.ndarray:
    return _centroid(stats, geo) * np.asarray(geo.spacing_um) + np.asarray(geo.origin_um)


def _intensity_mean(stats: Stats, geo: Geometry) -> np.ndarray:
    return stats.isum / stats.count[:, None]


def _intensity_std(stats: Stats, geo: Geometry) -> np.ndarray:
    return np.sqrt(stats.m2 / stats.count[:, None])


FEATURES: tuple[Feature, ...] = (
    Feature(
        "label_id", "key", "The object's value in the label image (0 is background and never a row).",
        "uint64", "", lambda s, g: s.ids, key=True,
    ),
    Feature(
        "area", "morphology", "Number of pixels (voxels in 3D) of the object.",
        "int64", "{px}", lambda s, g: s.count, skimage="num_pixels",
    ),
    Feature(
        "area_um{ndim}", "morphology",
        "Physical area (volume in 3D): pixel count times the product of the pixel sizes.",
        "float64", "micrometer^{ndim}", lambda s, g: s.count * float(np.prod(g.spacing_um)),
        physical=True, skimage="area",
    ),
    Feature(
        "bbox_min_{axis}", "morphology", "First {axis} index of the bounding box (inclusive).",
        "int64", "{px}", lambda s, g: _spatial(s, g, s.bbox_min), per_axis=True, skimage="bbox-{i}",
    ),
    Feature(
        "bbox_max_{axis}", "morphology",
        "End {axis} index of the bounding box (exclusive, as regionprops' bbox and Python slices).",
        "int64", "{px}", lambda s, g: _spatial(s, g, s.bbox_max) + 1, per_axis=True, skimage="bbox-{j}",
    ),
    Feature(
        "centroid_{axis}", "morphology", "Mean {axis} pixel index of the object's pixels.",
        "float64", "{px}", _centroid, per_axis=True, skimage="centroid-{i}",
    ),
    Feature(
        "centroid_{axis}_um", "morphology",
        "Centroid {axis} in physical coordinates: centroid_{axis} x pixel size + the NGFF translation "
        "(regionprops(spacing=...) centroid plus the image's translation).",
        "float64", "micrometer", _centroid_um, per_axis=True, physical=True, skimage="centroid-{i}",
    ),
    Feature(
        "intensity_sum__{channel}", "intensity", "Sum of channel {channel} over the object's pixels.",
        "float64", "a.u.", lambda s, g: s.isum, per_channel=True,
    ),
    Feature(
        "intensity_mean__{channel}", "intensity",
        "Mean of channel {channel} over the object's pixels, accumulated in float64 (regionprops averages "
        "float32 images in float32, so for those it can differ from cellar by float32 rounding, ~1e-6).",
        "float64", "a.u.", _intensity_mean, per_channel=True, skimage="intensity_mean",
    ),
    Feature(
        "intensity_std__{channel}", "intensity",
        "Population standard deviation (ddof=0) of channel {channel} over the object's pixels.",
        "float64", "a.u.", _intensity_std, per_channel=True, skimage="intensity_std",
    ),
    Feature(
        "intensity_min__{channel}", "intensity", "Minimum of channel {channel} over the object's pixels.",
        "float64", "a.u.", lambda s, g: s.imin, per_channel=True, skimage="intensity_min",
    ),
    Feature(
        "intensity_max__{channel}", "intensity", "Maximum of channel {channel} over the object's pixels.",
        "float64", "a.u.", lambda s, g: s.imax, per_channel=True, skimage="intensity_max",
    ),
)

# Columns every table has besides the features: the Hive partition keys.
PARTITION_COLUMNS = (
    {"name": "image", "dtype": "string", "unit": "", "description": "Name of the measured image (partition key)."},
    {
        "name": "label_image", "dtype": "string", "unit": "",
        "description": "Name of the label image under the image's labels/ group (partition key).",
    },
)


def columns(geo: Geometry) -> list[Column]:
    """Every concrete feature column for an image of this geometry, in table order."""
    return [col for feature in FEATURES for col in feature.columns(geo)]


def compute_columns(stats: Stats, geo: Geometry) -> dict[str, np.ndarray]:
    """Finish every feature from merged statistics: column name -> array of one value per object."""
    out: dict[str, np.ndarray] = {}
    for feature in FEATURES:
        cols = list(feature.columns(geo))
        if not cols:
            continue
        values = feature.compute(stats, geo)
        for col in cols:
            index = col.axis if col.axis is not None else col.channel
            arr = values[:, index] if index is not None else values
            out[col.name] = np.ascontiguousarray(arr, dtype=col.dtype)
    return out


def schema_json() -> dict:
    """The generated content of `schemas/objects.json`."""
    return {
        "title": "cellar objects table",
        "description": (
            "One row per labelled object, keyed by (image, label_image, label_id). Column names are templates: "
            "{axis} is a spatial axis name, {channel} a channel's column suffix, {ndim} the number of spatial "
            "dimensions; {px} in a unit is 'pixel' in 2D and 'voxel' in 3D. Physical columns are in "
            "micrometres and present only when every spatial axis has a length unit."
        ),
        "key": ["image", "label_image", "label_id"],
        "partition_columns": list(PARTITION_COLUMNS),
        "features": [f.to_json() for f in FEATURES],
    }


def markdown_table() -> str:
    """The README's feature table."""
    rows = ["| column | group | dtype | unit | scikit-image | description |", "|---|---|---|---|---|---|"]
    for f in FEATURES:
        sk = f"`{f.skimage}`" if f.skimage else "-"
        rows.append(f"| `{f.name}` | {f.group} | {f.dtype} | {f.unit or '-'} | {sk} | {f.description} |")
    return "\n".join(rows)


SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "objects.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m measure", description=__doc__.splitlines()[0])
    parser.add_argument("--write-schema", action="store_true", help=f"regenerate schemas/{SCHEMA_PATH.name}")
    parser.add_argument("--markdown", action="store_true", help="print the README feature table")
    args = parser.parse_args(argv)
    if args.write_schema:
        SCHEMA_PATH.write_text(json.dumps(schema_json(), indent=2) + "\n")
        print(f"wrote {SCHEMA_PATH}")
    if args.markdown:
        print(markdown_table())

