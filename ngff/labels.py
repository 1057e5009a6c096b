"""Write into an OME-NGFF image's label images (local images only): per-label `colors` and `properties` in a
label image's `image-label` metadata, and new label images derived from an existing one (masks).

Metadata files (`zarr.json` for 0.5, `.zattrs` for 0.4) are replaced atomically (a temporary file, then a
rename), and a new label image is written under a temporary name and renamed into place before it is listed
in `labels/`, so a reader never sees a half-written label image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from itertools import product
from pathlib import Path

import numpy as np
import zarr

from . import NgffImage, local_path
from ..schemas.atomic import atomic_write
from ..schemas.errors import InvalidImageError
from ..schemas.store import write_json_atomic

BLOCK_PIXELS = 1 << 22  # pixels per block when copying a label image: bounded memory whatever its size


def _image_dir(image: NgffImage) -> Path:
    path = local_path(image.url)
    if path is None:
        raise InvalidImageError(f"{image.url}: cannot write into a remote image; copy it locally first")
    return path


def _update_ome(group_dir: Path, zarr_format: int, change: Callable[[dict], None]) -> None:
    """Apply `change` to a group's OME attributes (0.5: `attributes.ome` of zarr.json; 0.4: .zattrs) and
    write the file back atomically."""
    meta = group_dir / ("zarr.json" if zarr_format == 3 else ".zattrs")
    try:
        doc = json.loads(meta.read_text()) if meta.exists() or zarr_format == 3 else {}
    except (OSError, ValueError) as exc:
        raise InvalidImageError(f"{meta}: unreadable metadata ({exc})") from None
    attrs = doc.setdefault("attributes", {}).setdefault("ome", {}) if zarr_format == 3 else doc
    change(attrs)
    try:
        write_json_atomic(meta, doc)
    except OSError as exc:
        raise InvalidImageError(f"{meta}: cannot write ({exc.strerror or exc})") from None


def set_image_label(image: NgffImage, label: str, colors: list[dict] | None = None,
                    properties: list[dict] | None = None) -> Path:
    """Replace `colors` and/or `properties` in `labels/<label>`'s `image-label` metadata.

    `colors` items are `{"label-value": int, "rgba": [r, g, b, a]}` (0-255); `properties` items are
    `{"label-value": int, key: value, ...}`. Other `image-label` keys are kept.
    """
    image.label(label)  # checks that it exists
    group_dir = _image_dir(image) / "labels" / label

    def change(attrs: dict) -> None:
        meta = attrs.setdefault("image-label", {})
        if image.version == "0.4":
            meta.setdefault("version", "0.4")
        if colors is not None:
            meta["colors"] = colors
        if properties is not None:
            meta["properties"] = properties
        _consistent(meta)

    _update_ome(group_dir, image.zarr_format, change)
    return group_dir


def _consistent(meta: dict) -> None:
    """NGFF (and ome-zarr-models) want `colors` and `properties` to name the same label values: an empty
    list is dropped, and each side gains entries for the values only the other names (a transparent colour;
    properties holding only the label value)."""
    for key in ("colors", "properties"):
        if key in meta and not meta[key]:
            del meta[key]
    if "colors" not in meta or "properties" not in meta:
        return
    in_colors = {c["label-value"] for c in meta["colors"]}
    in_props = {p["label-value"] for p in meta["properties"]}
    meta["colors"] += [{"label-value": v, "rgba": [0, 0, 0, 0]} for v in sorted(in_props - in_colors)]
    meta["properties"] += [{"label-value": v} for v in sorted(in_colors - in_props)]


def _blocks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """Boxes of whole chunks tiling `shape`, of about BLOCK_PIXELS each (grown along the last axes first)."""
    block = list(chunks)
    for ax in reversed(range(len(block))):
        while block[ax] < shape[ax] and math.prod(block) * 2 <= BLOCK_PIXELS:
            block[ax] = min(2 * block[ax], shape[ax])
    for start in product(*(range(0, s, b) for s, b in zip(shape, block))):
        yield tuple(slice(o, min(o + b, s)) for o, b, s in zip(start, block, shape))


def write_mask(image: NgffImage, label: str, name: str, keep: np.ndarray, overwrite: bool = False) -> Path:
    """Write `labels/<name>`: `labels/<label>` (every level) with only the label values in `keep`, the rest 0.

    Metadata (axes, scales) is copied; `image-label` gets `source` and the values kept as `properties`
    are left to the caller. Refuses an existing `name` unless `overwrite`.
    """
    src = image.label(label)
    root = _image_dir(image)
    labels_dir = root / "labels"
    target = labels_dir / name
    if name == label:
        raise InvalidImageError(f"{root}: the mask cannot replace its source label image labels/{label}")
    if (target.exists() or name in (image.label_names or ())) and not overwrite:
        raise InvalidImageError(f"{target}: label image exists; pass --overwrite to replace it")
    keep = np.unique(np.asarray(keep, np.uint64))
    source_group = zarr.open_group(str(labels_dir / label), mode="r")
    try:
        with atomic_write(target, overwrite=overwrite) as tmp_dir:  # a directory: swapped in whole
            group = zarr.open_group(str(tmp_dir), mode="w", zarr_format=image.zarr_format)
            attrs = dict(source_group.attrs)
            ome = attrs.get("ome", {}) if image.zarr_format == 3 else attrs
            ome = json.loads(json.dumps(ome))  # a deep copy of plain JSON
            for ms in ome.get("multiscales", []):
                ms["name"] = name
            meta = {"source": {"image": "../../"}, "colors": []}
            if image.version == "0.4":
                meta["version"] = "0.4"
            ome["image-label"] = meta
            group.attrs.update({"ome": ome} if image.zarr_format == 3 else ome)
            for level in src.multiscale.levels:
                sub = level.path.split("/")[-1]
                data = source_group[sub]
                out = group.create_array(sub, shape=data.shape, chunks=data.chunks, dtype=data.dtype,
                                         fill_value=0)
                for box in _blocks(data.shape, data.chunks):
                    block = np.asarray(data[box])
                    if keep.size:
                        pos = np.minimum(np.searchsorted(keep, block.astype(np.uint64, copy=False)), keep.size - 1)
                        block = np.where(keep[pos] == block.astype(np.uint64, copy=False), block, 0).astype(block.dtype)
                    else:
                        block = np.zeros_like(block)
                    if block.any():  # all-zero chunks stay unwritten: the fill value
                        out[box] = block
    except OSError as exc:
        raise InvalidImageError(f"{target}: cannot write ({exc.strerror or exc})") from None

    def listed(attrs: dict) -> None:
        names = list(attrs.get("labels") or [])
        if name not in names:
            attrs["labels"] = [*names, name]

    _update_ome(labels_dir, image.zarr_format, listed)
    return target
