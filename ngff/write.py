"""Write small OME-NGFF images with label images (0.4 on Zarr v2, 0.5 on Zarr v3).

Used by `cellar demo`, the tests and the benchmarks to make fixtures; the pyramid is a plain
nearest-neighbour (stride 2 in y and x) downsampling, which keeps label values intact.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

ROLES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _axes_json(axes: str, unit: str | None) -> list[dict]:
    out = []
    for a in axes:
        entry: dict[str, Any] = {"name": a, "type": ROLES[a]}
        if ROLES[a] == "space" and unit:
            entry["unit"] = unit
        out.append(entry)
    return out


def _multiscales(axes: str, scale: dict[str, float], translation: dict[str, float], n_levels: int,
                 unit: str | None, name: str, version: str) -> list[dict]:
    datasets = []
    for k in range(n_levels):
        factor = {a: (2**k if a in "yx" else 1) for a in axes}
        transforms: list[dict] = [{"type": "scale", "scale": [scale.get(a, 1.0) * factor[a] for a in axes]}]
        if translation:
            transforms.append({"type": "translation", "translation": [translation.get(a, 0.0) for a in axes]})
        datasets.append({"path": str(k), "coordinateTransformations": transforms})
    ms: dict[str, Any] = {"name": name, "axes": _axes_json(axes, unit), "datasets": datasets}
    if version == "0.4":
        ms["version"] = "0.4"
    return [ms]


def _set_ome(group: zarr.Group, version: str, attrs: dict) -> None:
    group.attrs.update({"ome": {"version": "0.5", **attrs}} if version == "0.5" else attrs)


def _write_levels(group: zarr.Group, data: np.ndarray, axes: str, n_levels: int, chunks: tuple[int, ...]) -> None:
    for k in range(n_levels):
        step = tuple(slice(None, None, 2**k) if a in "yx" else slice(None) for a in axes)
        level = np.ascontiguousarray(data[step])
        level_chunks = tuple(min(c, s) for c, s in zip(chunks, level.shape))
        arr = group.create_array(str(k), shape=level.shape, chunks=level_chunks, dtype=level.dtype)
        arr[...] = level


def write_image(
    path: str | Path,
    data: np.ndarray,
    axes: str,
    *,
    chunks: tuple[int, ...] | None = None,
    scale: dict[str, float] | None = None,
    translation: dict[str, float] | None = None,
    unit: str | None = "micrometer",
    channel_names: list[str] | None = None,
    labels: dict[str, np.ndarray] | None = None,
    n_levels: int = 1,
    version: str = "0.5",
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `data` (axes such as "cyx", "czyx", "tczyx", "zyx") and label images as an OME-NGFF image.

    `labels` maps label-image names to integer arrays with the image's axes minus "c" (or with a "c" of
    size 1). `chunks` gives the chunk shape of level 0 in the image's axis order; label images use it too.
    """
    path = Path(path)
    if data.ndim != len(axes) or set(axes) - set(ROLES):
        raise ValueError(f"axes {axes!r} do not fit an array of shape {data.shape}")
    if path.exists():
        if not overwrite:
            raise FileExistsError(path)
        shutil.rmtree(path)
    scale = scale or {}
    translation = translation or {}
    chunks = chunks or tuple(min(s, 256 if a in "zyx" else 1) for a, s in zip(axes, data.shape))
    zarr_format = 3 if version == "0.5" else 2
    name = name or path.name.split(".")[0]
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    attrs: dict[str, Any] = {"multiscales": _multiscales(axes, scale, translation, n_levels, unit, name, version)}
    if "c" in axes:
        n_c = data.shape[axes.index("c")]
        names = channel_names or [f"c{i}" for i in range(n_c)]
        attrs["omero"] = {
            "channels": [{"label": n, "color": "FFFFFF", "active": True} for n in names],
            **({"version": version} if version == "0.4" else {}),
        }
    _set_ome(root, version, attrs)
    _write_levels(root, data, axes, n_levels, chunks)
    if labels:
        lgroup = root.create_group("labels")
        _set_ome(lgroup, version, {"labels": list(labels)})
        for lname, lab in labels.items():
            # The image's axes minus "c"; or all of them when the label array keeps a channel axis of size 1.
            keep_c = lab.ndim == len(axes)
            label_axes = axes if keep_c else axes.replace("c", "")
            label_chunks = tuple(c for a, c in zip(axes, chunks) if keep_c or a != "c")
            g = lgroup.create_group(lname)
            image_label: dict[str, Any] = {"colors": [], "source": {"image": "../../"}}
            if version == "0.4":
                image_label["version"] = "0.4"
            _set_ome(g, version, {
                "multiscales": _multiscales(label_axes, scale, translation, n_levels, unit, lname, version),
                "image-label": image_label,
            })
            _write_levels(g, lab, label_axes, n_levels, label_chunks)
    return path


def write_plate(path: str | Path, wells: dict[str, list[tuple[np.ndarray, dict[str, np.ndarray]]]], axes: str, *,
                version: str = "0.5", name: str = "plate", overwrite: bool = False, **image_kw: Any) -> Path:
    """Write an HCS plate: `wells` maps 'A/1' to a list of fields, each (image data, {label name: labels});
    every field is written with `write_image` (same `axes` and keyword arguments)."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(path)
        shutil.rmtree(path)
    zarr_format = 3 if version == "0.5" else 2
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells}, key=lambda c: (len(c), c))
    plate: dict[str, Any] = {
        "name": name, "rows": [{"name": r} for r in rows], "columns": [{"name": c} for c in cols],
        "wells": [{"path": w, "rowIndex": rows.index(w.split("/")[0]), "columnIndex": cols.index(w.split("/")[1])}
                  for w in wells],
        "field_count": max(len(f) for f in wells.values()),
    }
    if version == "0.4":
        plate["version"] = "0.4"
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    _set_ome(root, version, {"plate": plate})
    for well, fields in wells.items():
        row, col = well.split("/")
        rgroup = root.require_group(row)
        wgroup = rgroup.create_group(col)
        well_meta: dict[str, Any] = {"images": [{"path": str(k)} for k in range(len(fields))]}
        if version == "0.4":
            well_meta["version"] = "0.4"
        _set_ome(wgroup, version, {"well": well_meta})
        for k, (data, labels) in enumerate(fields):
            write_image(path / row / col / str(k), data, axes, labels=labels, version=version,
                        name=f"{name}_{row}{col}_{k}", **image_kw)
    return path
