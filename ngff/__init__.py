"""Open an OME-NGFF image (0.4 on Zarr v2, 0.5 on Zarr v3) and its label images, by path or URL.

Metadata is validated with ome-zarr-models' attribute models, then reduced to small frozen dataclasses
(`NgffImage`, `Multiscale`, `Level`, `LabelImage`) that are cheap to pickle into worker processes; the
workers reopen the arrays themselves from the URL (`open_level`), so no array crosses a process boundary.
"""

from __future__ import annotations

import atexit
import multiprocessing.util
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import zarr
from ome_zarr_models.v04.image import ImageAttrs as ImageAttrs04
from ome_zarr_models.v04.image_label import ImageLabelAttrs as ImageLabelAttrs04
from ome_zarr_models.v05.image import ImageAttrs as ImageAttrs05
from ome_zarr_models.v05.image_label import ImageLabelAttrs as ImageLabelAttrs05

from .integrity import at, check_node, metadata_file, register_checked_blosc
from ..schemas.errors import InvalidImageError

register_checked_blosc()  # a truncated Blosc chunk is an error, not the memory past its end

SUPPORTED_VERSIONS = ("0.4", "0.5")

# NGFF length units (UDUNITS-2 names, plus common spellings) in micrometres.
_UM_PER_UNIT = {
    "angstrom": 1e-4, "attometer": 1e-12, "centimeter": 1e4, "decimeter": 1e5, "exameter": 1e24,
    "femtometer": 1e-9, "foot": 304800.0, "gigameter": 1e15, "hectometer": 1e8, "inch": 25400.0,
    "kilometer": 1e9, "megameter": 1e12, "meter": 1e6, "micrometer": 1.0, "mile": 1.609344e9,
    "millimeter": 1e3, "nanometer": 1e-3, "parsec": 3.0856775814913673e22, "petameter": 1e21,
    "picometer": 1e-6, "terameter": 1e18, "yard": 914400.0, "yoctometer": 1e-18, "yottameter": 1e30,
    "zeptometer": 1e-15, "zettameter": 1e27,
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6,
}
_ROLE_BY_NAME = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


@dataclass(frozen=True)
class Axis:
    name: str
    role: str  # "time", "channel" or "space"
    unit: str | None = None


@dataclass(frozen=True)
class Level:
    """One resolution level: its array path (relative to the image root) and physical transform."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Multiscale:
    """A multiscale group (the image, or one label image) reduced to what cellar uses."""

    group: str  # path of the group relative to the image root ("" for the image itself)
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]

    def index(self, role: str) -> int | None:
        """Position of the (first) axis with this role, or None."""
        return next((i for i, a in enumerate(self.axes) if a.role == role), None)

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(self.axes) if a.role == "space")

    @property
    def spatial_names(self) -> tuple[str, ...]:
        return tuple(self.axes[i].name for i in self.spatial)

    def spatial_shape(self, level: int) -> tuple[int, ...]:
        return tuple(self.levels[level].shape[i] for i in self.spatial)

    def spatial_chunks(self, level: int) -> tuple[int, ...]:
        return tuple(self.levels[level].chunks[i] for i in self.spatial)

    def size(self, role: str, level: int = 0) -> int:
        i = self.index(role)
        return 1 if i is None else self.levels[level].shape[i]

    def _in_um(self, values: tuple[float, ...]) -> tuple[float, ...] | None:
        factors = [_UM_PER_UNIT.get((self.axes[i].unit or "").strip().lower()) for i in self.spatial]
        if any(f is None for f in factors):
            return None
        return tuple(values[i] * f for i, f in zip(self.spatial, factors))

    @property
    def unknown_units(self) -> tuple[str, ...]:
        """Units of spatial axes that are not length units cellar knows (such axes leave the image
        uncalibrated)."""
        return tuple(a.unit for i in self.spatial if (a := self.axes[i]).unit
                     and a.unit.strip().lower() not in _UM_PER_UNIT)

    def spacing_um(self, level: int) -> tuple[float, ...] | None:
        """Pixel size per spatial axis in micrometres, or None if any spatial axis lacks a length unit."""
        return self._in_um(self.levels[level].scale)

    def origin_um(self, level: int) -> tuple[float, ...] | None:
        """The level's NGFF translation per spatial axis in micrometres (None if uncalibrated)."""
        return self._in_um(self.levels[level].translation)


@dataclass(frozen=True)
class LabelImage:
    name: str
    multiscale: Multiscale
    image_label: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NgffImage:
    url: str
    version: str
    zarr_format: int
    name: str
    multiscale: Multiscale
    channel_names: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None when the image has no labels group

    def attributes(self) -> dict[str, Any]:
        """The image group's OME attributes as NGFF defines them (0.5: those under "ome"), read afresh; for
        what cellar does not model, such as the `omero` channel colours and windows."""
        return _ome_attrs(_root(self.url), self.version, self.url)

    def label(self, name: str) -> LabelImage:
        """Open the label image `labels/<name>`."""
        if self.label_names is None:
            meta = metadata_file(self.zarr_format, "group")
            raise InvalidImageError(f"{self.url}: no 'labels' group (no labels/{meta}: this image has no label images)")
        if name not in self.label_names:
            have = ", ".join(self.label_names) or "none"
            raise InvalidImageError(f"{self.url}: no label image '{name}' under labels/ (it has: {have})")
        root = _root(self.url)
        path = f"labels/{name}"
        try:
            group = _child(root, self.url, path, "group")
        except KeyError:
            raise InvalidImageError(f"{self.url}: labels/{name} is listed but missing (no "
                                    f"{at('', path, metadata_file(self.zarr_format, 'group'))})") from None
        attrs = _ome_attrs(group, self.version, at(self.url, path))
        meta = at(self.url, path, metadata_file(self.zarr_format, "attrs"))
        model = ImageLabelAttrs05 if self.version == "0.5" else ImageLabelAttrs04
        if "image-label" in attrs:
            _validate(model, attrs, meta, self.version)
        multiscale = _multiscale(group, path, attrs, f"{self.url}/{path}", self.version, meta)
        return LabelImage(name, multiscale, dict(attrs.get("image-label") or {}))


@dataclass(frozen=True)
class PlateField:
    """One field (image) of an HCS plate, with where it sits."""

    url: str
    plate: str
    row: str
    column: str
    field: int

    @property
    def name(self) -> str:
        """The image's name in a store: plate, well and field (`plate1_A1_0`)."""
        return f"{self.plate}_{self.row}{self.column}_{self.field}"

    @property
    def context(self) -> dict[str, str | int]:
        return {"plate": self.plate, "well": f"{self.row}/{self.column}", "row": self.row, "column": self.column,
                "field": self.field}


def plate_fields(url: str) -> list[PlateField] | None:
    """Every field of every well of the HCS plate at `url`, in row, column, field order; None if `url` is not
    a plate."""
    url = str(url).rstrip("/")
    group = _root(url)
    attrs = dict(group.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs
    plate = ome.get("plate")
    if plate is None:
        return None
    if not isinstance(plate, dict) or not isinstance(plate.get("wells"), list):
        raise InvalidImageError(f"{url}: 'plate' metadata without a 'wells' list")
    name = plate.get("name") if isinstance(plate.get("name"), str) and plate.get("name") else _image_name(url, None)
    rows = [r.get("name") for r in plate.get("rows", []) if isinstance(r, dict)]
    columns = [c.get("name") for c in plate.get("columns", []) if isinstance(c, dict)]
    fields = []
    for well in plate["wells"]:
        path = well.get("path") if isinstance(well, dict) else None
        if not isinstance(path, str) or path.count("/") != 1:
            raise InvalidImageError(f"{url}: plate well {well!r}: expected a 'path' like 'A/1'")
        row, column = path.split("/")
        if (rows and row not in rows) or (columns and column not in columns):
            raise InvalidImageError(f"{url}: well {path} is not in the plate's rows and columns")
        try:
            wgroup = _child(group, url, path, "group")
        except KeyError:
            raise InvalidImageError(f"{url}/{path}: well listed in the plate but missing") from None
        wattrs = dict(wgroup.attrs)
        wome = wattrs.get("ome") if isinstance(wattrs.get("ome"), dict) else wattrs
        images = (wome.get("well") or {}).get("images") if isinstance(wome.get("well"), dict) else None
        if not isinstance(images, list):
            raise InvalidImageError(f"{url}/{path}: no 'well.images' list in its metadata")
        for k, img in enumerate(images):
            if not isinstance(img, dict) or not isinstance(img.get("path"), str):
                raise InvalidImageError(f"{url}/{path}: field {k} has no 'path'")
            fields.append(PlateField(f"{url}/{path}/{img['path']}", name, row, column, k))
    return fields


def local_path(url: str) -> Path | None:
    """The filesystem path of a local image (plain path or file:// URL), None for a remote URL."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url):
        return None
    return Path(url)


RETRIES = 4  # further attempts at a remote read that failed for a transient reason
RETRY_DELAY_S = 0.25  # the first wait; each next one doubles


class RetryingStore(zarr.storage.WrapperStore):
    """A read-only remote store whose reads are retried with exponential backoff on transient failures
    (HTTP 5xx, refused or reset connections, truncated bodies, timeouts); a read that keeps failing raises
    an OSError naming its key. Missing keys (404) are not retried: Zarr reads them as fill values."""

    async def get(self, key, prototype, byte_range=None):
        import asyncio

        import aiohttp

        for attempt in range(RETRIES + 1):
            try:
                return await self._store.get(key, prototype, byte_range)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                if attempt == RETRIES:
                    raise OSError(f"{key}: {error_text(exc)} (failed {RETRIES + 1} times)") from None
                await asyncio.sleep(RETRY_DELAY_S * 2**attempt)


def _open_group(url: str) -> zarr.Group:
    path = local_path(url)
    if path is not None and not path.exists():
        raise InvalidImageError(f"{url}: no such file or directory")
    try:
        if path is not None:
            return zarr.open_group(str(path), mode="r")
        return zarr.open_group(store=_remote_store(url), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        raise InvalidImageError(f"{url}: not a Zarr group (no .zgroup or zarr.json found)") from None
    except ImportError as exc:  # e.g. s3fs not installed for s3:// URLs
        raise InvalidImageError(f"{url}: cannot open this URL ({exc})") from None
    except OSError as exc:  # permissions, refused connections (aiohttp's errors are OSErrors too)
        raise InvalidImageError(f"{url}: cannot read ({error_text(exc)})") from None


_REMOTE: dict[str, RetryingStore] = {}  # the remote stores this process opened, by URL
_REMOTE_PID: int | None = None  # the process that opened them
_INHERITED: list[RetryingStore] = []  # a forked child's copies of its parent's stores
_REMOTE_LOCK = threading.Lock()


def _remote_store(url: str) -> RetryingStore:
    """The store of a remote image, opened once per process and URL; its HTTP (or S3) session is closed when
    the process ends (`close_remote`).

    Each store has a filesystem of its own (not fsspec's shared instance): a forked worker must not reuse the
    parent's HTTP session, whose pooled keep-alive connections it would share with the parent and hang on. A
    forked child keeps its copies of the parent's stores untouched (they belong to the parent's event loop:
    closing or collecting them there would close the parent's connections or warn) and opens its own.
    """
    global _REMOTE_PID
    with _REMOTE_LOCK:
        if _REMOTE_PID != os.getpid():
            _INHERITED.extend(_REMOTE.values())
            _REMOTE.clear()
            _REMOTE_PID = os.getpid()
            atexit.register(close_remote)  # the main process
            multiprocessing.util.Finalize(None, close_remote, exitpriority=100)  # a multiprocessing worker
        store = _REMOTE.get(url)
        if store is None:
            store = _REMOTE[url] = RetryingStore(zarr.storage.FsspecStore.from_url(
                url, read_only=True, storage_options={"skip_instance_cache": True}))
        return store


def close_remote() -> None:
    """Close the sessions of the remote stores this process opened (aiohttp warns about, and leaks, sessions
    that are never closed). Images opened afterwards open new ones."""
    from zarr.core.sync import sync

    with _REMOTE_LOCK:
        stores = list(_REMOTE.values()) if _REMOTE_PID == os.getpid() else []
        _REMOTE.clear()
    for store in stores:
        sync(_close_filesystem(store._store.fs))


async def _close_filesystem(fs) -> None:
    session = getattr(fs, "_session", None)  # fsspec's HTTP filesystem: an aiohttp session
    if session is not None:
        await session.close()
    client = getattr(fs, "_s3", None)  # s3fs: an aiobotocore client
    if client is not None:
        await client.__aexit__(None, None, None)


def error_text(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# zarr's errors for metadata it cannot parse: JSON errors and its validation errors are ValueErrors, a
# mistyped field is often a TypeError from a dataclass, an unknown codec a KeyError (handled where it is met).
_METADATA_ERRORS = (ValueError, TypeError)


def _root(url: str) -> zarr.Group:
    """The image's root group (`_open_group`), its metadata files checked first when it is local; metadata
    zarr cannot parse is one line naming the file."""
    path = local_path(url)
    if path is not None and path.is_dir():
        check_node(path, url, "")
    try:
        return _open_group(url)
    except _METADATA_ERRORS as exc:
        raise InvalidImageError(f"{url}: Zarr cannot read the group's metadata (zarr.json, or .zgroup and .zattrs) "
                                f"({type(exc).__name__}: {error_text(exc)})") from None


def _child(group: zarr.Group, url: str, path: str, kind: str) -> zarr.Group | zarr.Array:
    """`group[path]` (a "group" or "array"; `url` is where `group` lies), its metadata files checked first
    when the image is local; metadata zarr cannot parse is one line naming the file. A KeyError means the node
    is not there."""
    node = path.strip("/")
    local = local_path(url)
    fmt = group.metadata.zarr_format
    if local is not None:
        check_node(local, url, node)
    try:
        return group[path]
    except KeyError as exc:
        if local is None or not (local / node / metadata_file(fmt, kind)).is_file():
            raise
        error: Exception = exc  # the metadata is there: an unknown codec or data type, not a missing node
    except _METADATA_ERRORS as exc:
        error = exc
    name = metadata_file(fmt, kind) if local is not None or fmt == 3 or kind == "array" else ".zgroup or .zattrs"
    raise InvalidImageError(f"{at(url, node, name)}: Zarr cannot read this {kind}'s metadata "
                            f"({type(error).__name__}: {error_text(error)})")


def open_level(url: str, path: str) -> zarr.Array:
    """Open one array of an image (for example `labels/nuclei/0`) in read-only mode."""
    return _child(_root(url), url, path, "array")


def _ome_attrs(group: zarr.Group, version: str, where: str) -> dict[str, Any]:
    """A group's OME attributes (0.5: those under "ome"); `where` is the group's URL, for errors."""
    attrs = dict(group.attrs)
    if version != "0.5":
        return attrs
    ome = attrs.get("ome")
    if ome is not None and not isinstance(ome, dict):
        raise InvalidImageError(f"{at(where, '', 'zarr.json')}: attributes.ome is {type(ome).__name__}, "
                                "expected an object")
    return dict(ome or {})


def _validate(model: type[pydantic.BaseModel], attrs: dict, where: str, version: str) -> pydantic.BaseModel:
    try:
        return model.model_validate(attrs)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidImageError(f"{where}: invalid NGFF {version} metadata at {loc}: {msg}") from None


def _version(group: zarr.Group, url: str) -> str:
    attrs = dict(group.attrs)
    zarr_format = group.metadata.zarr_format
    meta = metadata_file(zarr_format, "attrs")
    if zarr_format == 3 and "ome" in attrs:
        if not isinstance(attrs["ome"], dict):
            raise InvalidImageError(f"{at(url, '', meta)}: attributes.ome is {type(attrs['ome']).__name__}, "
                                    "expected an object")
        version = str(attrs["ome"].get("version"))
    elif "multiscales" in attrs:
        ms = attrs["multiscales"]
        version = str(ms[0].get("version", "0.4")) if isinstance(ms, list) and ms and isinstance(ms[0], dict) else "0.4"
        if zarr_format == 3 and version == "0.4":
            raise InvalidImageError(f"{url}: NGFF 0.4 metadata in a Zarr v3 group (0.4 uses Zarr v2, 0.5 Zarr v3)")
    elif "plate" in attrs or "plate" in (attrs.get("ome") or {}):
        raise InvalidImageError(f"{url}: an HCS plate, not an image; give one field, e.g. {url}/A/1/0")
    else:
        raise InvalidImageError(f"{url}: a Zarr group but not an OME-NGFF image (no 'multiscales' in its attributes, "
                                f"{meta})")
    if version not in SUPPORTED_VERSIONS:
        raise InvalidImageError(
            f"{url}: NGFF version {version} is not supported (cellar reads {' and '.join(SUPPORTED_VERSIONS)})"
        )
    if (version == "0.5") != (zarr_format == 3):
        raise InvalidImageError(f"{url}: NGFF {version} metadata in a Zarr v{zarr_format} group")
    return version


def _axes(raw_axes: list, where: str) -> tuple[Axis, ...]:
    axes = []
    for a in raw_axes:
        name = str(a.name)
        role = a.type if a.type in ("time", "channel", "space") else None
        if a.type is None:
            role = _ROLE_BY_NAME.get(name.lower())
        if role is None:
            raise InvalidImageError(
                f"{where}: axis '{name}' has type {a.type!r}; cellar understands 'time', 'channel' and 'space'"
            )
        unit = a.unit if isinstance(a.unit, str) else None
        axes.append(Axis(name, role, unit))
    n_space = sum(a.role == "space" for a in axes)
    if n_space not in (2, 3) or sum(a.role != "space" for a in axes) > 2:
        raise InvalidImageError(f"{where}: axes {[a.name for a in axes]}: expected 2 or 3 spatial axes, at most t and c besides")
    return tuple(axes)


def _vector(transforms, kind: str, ndim: int, where: str) -> np.ndarray:
    default = np.ones(ndim) if kind == "scale" else np.zeros(ndim)
    for t in transforms or ():
        if t.type == kind:
            values = getattr(t, kind, None)
            if values is None:
                raise InvalidImageError(f"{where}: {kind} given by path; cellar needs it inline")
            return np.asarray(values, np.float64)
    return default


def _multiscale(group: zarr.Group, group_path: str, attrs: dict, where: str, version: str, meta: str) -> Multiscale:
    """The multiscale group at `where` (`group_path` under the image); `meta` names its attributes file, for
    errors in the metadata."""
    model = ImageAttrs05 if version == "0.5" else ImageAttrs04
    if "multiscales" not in attrs:
        raise InvalidImageError(f"{meta}: no 'multiscales' in the attributes")
    version_key = {"version": "0.5"} if version == "0.5" else {}
    parsed = _validate(model, {"multiscales": attrs.get("multiscales"), **version_key}, meta, version)
    ms = parsed.multiscales[0]
    axes = _axes(list(ms.axes), meta)
    ndim = len(axes)
    ms_scale = _vector(ms.coordinateTransformations, "scale", ndim, meta)
    ms_trans = _vector(ms.coordinateTransformations, "translation", ndim, meta)
    array_meta = metadata_file(group.metadata.zarr_format, "array")
    levels = []
    for ds in ms.datasets:
        scale = _vector(ds.coordinateTransformations, "scale", ndim, meta)
        trans = _vector(ds.coordinateTransformations, "translation", ndim, meta)
        if np.any(~np.isfinite(scale)) or np.any(scale <= 0):
            raise InvalidImageError(f"{meta}: dataset '{ds.path}' scale {scale.tolist()}: "
                                    "expected positive finite values")
        try:
            arr = _child(group, where, ds.path, "array")
        except KeyError:
            raise InvalidImageError(f"{where}/{ds.path}/{array_meta}: missing (dataset '{ds.path}' is listed in "
                                    "multiscales)") from None
        if not isinstance(arr, zarr.Array) or arr.ndim != ndim:
            found = f"a {arr.ndim}-D array" if isinstance(arr, zarr.Array) else "a group"
            raise InvalidImageError(f"{where}/{ds.path}: {found} ({ds.path}/{array_meta}) where the {ndim} axes of "
                                    f"{meta.rsplit('/', 1)[-1]} expect a {ndim}-D array")
        levels.append(
            Level(
                path=f"{group_path}/{ds.path}".lstrip("/"),
                shape=tuple(arr.shape),
                chunks=tuple(arr.chunks),
                dtype=np.dtype(arr.dtype).str,
                scale=tuple((scale * ms_scale).tolist()),
                translation=tuple((trans * ms_scale + ms_trans).tolist()),
            )
        )
    return Multiscale(group_path, axes, tuple(levels))


def _check_omero(attrs: dict, meta: str) -> None:
    """The optional `omero` metadata, when present, is an object whose `channels` (if any) is a list: other
    types are damage (left alone, they would silently rename the channels c0, c1, ...)."""
    omero = attrs.get("omero")
    if omero is None:
        return
    if not isinstance(omero, dict):
        raise InvalidImageError(f"{meta}: 'omero' is {type(omero).__name__}, expected an object")
    if not isinstance(omero.get("channels", []), list):
        raise InvalidImageError(f"{meta}: 'omero.channels' is {type(omero['channels']).__name__}, expected a list")


def _channel_names(attrs: dict, n: int) -> tuple[str, ...]:
    channels = (attrs.get("omero") or {}).get("channels") if isinstance(attrs.get("omero"), dict) else None
    names = []
    for i in range(n):
        label = None
        if isinstance(channels, list) and i < len(channels) and isinstance(channels[i], dict):
            label = channels[i].get("label")
        names.append(str(label) if isinstance(label, (str, int)) and str(label).strip() else f"c{i}")
    return tuple(names)


def _image_name(url: str, ms_attrs: Any) -> str:
    name = ms_attrs[0].get("name") if isinstance(ms_attrs, list) and ms_attrs and isinstance(ms_attrs[0], dict) else None
    if isinstance(name, str) and name.strip() and name not in ("image", "0"):
        return name
    base = os.path.basename(url.rstrip("/")) or "image"
    for suffix in (".ome.zarr", ".zarr"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)] or "image"
    return base


def open_image(url: str) -> NgffImage:
    """Open an OME-NGFF image by local path or URL (file://, http(s)://, s3:// with s3fs)."""
    url = str(url)
    group = _root(url)
    version = _version(group, url)
    attrs = _ome_attrs(group, version, url)
    meta = at(url, "", metadata_file(group.metadata.zarr_format, "attrs"))
    _check_omero(attrs, meta)
    multiscale = _multiscale(group, "", attrs, url, version, meta)
    label_names: tuple[str, ...] | None = None
    try:
        labels = _child(group, url, "labels", "group")
    except KeyError:
        labels = None
    if isinstance(labels, zarr.Group):
        listed = _ome_attrs(labels, version, at(url, "labels")).get("labels")
        if isinstance(listed, list):
            label_names = tuple(str(n) for n in listed)
        else:
            label_names = tuple(sorted(name for name, _ in labels.groups()))
    return NgffImage(
        url=url,
        version=version,
        zarr_format=group.metadata.zarr_format,
        name=_image_name(url, attrs.get("multiscales")),
        multiscale=multiscale,
        channel_names=_channel_names(attrs, multiscale.size("channel")),
        label_names=label_names,
    )
