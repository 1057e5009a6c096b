"""`measure()`: OME-Zarr image + label image in, one table of a cellar store out.

The label array at the chosen level is cut into regions aligned to its chunks. Each region (labels plus the
selected intensity channels) is read and reduced to per-label statistics by the compiled kernels, in worker
processes that open the arrays themselves from the URL; the statistics are merged as they arrive (at most
two regions per worker are in flight, so memory is bounded by the regions, not the image), finished into
feature columns once, and written to the store atomically.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

import schemas
from measure import features as registry
from measure import ngff, store_write
from measure.accumulate import Merger, Stats, region_stats
from schemas import store as layout
from schemas.errors import InvalidImageError, UsageError

DEFAULT_REGION_PIXELS = 1 << 22  # about 4 Mpixel per region: ~50 MB of working set with 4 uint16 channels


@dataclass(frozen=True)
class ReadPlan:
    """Everything a worker needs to read regions: picklable, no open arrays."""

    url: str
    label_path: str
    label_roles: tuple[str, ...]
    image_path: str
    image_roles: tuple[str, ...]
    timepoint: int
    channels: tuple[int, ...]


@dataclass(frozen=True)
class MeasureResult:
    store: Path
    image: str
    label_image: str
    n_objects: int
    n_regions: int
    elapsed_s: float


def _selection(roles: tuple[str, ...], timepoint: int, channel, spatial: tuple[slice, ...]) -> tuple:
    it = iter(spatial)
    return tuple(timepoint if r == "time" else channel if r == "channel" else next(it) for r in roles)


class RegionReader:
    """Reads regions of one label image and its intensity channels, and reduces them to `Stats`."""

    def __init__(self, plan: ReadPlan):
        self.plan = plan
        self.labels = ngff.open_level(plan.url, plan.label_path)
        self.image = ngff.open_level(plan.url, plan.image_path) if plan.channels else None

    def read(self, region: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(labels as (Z, Y, X), intensities as (C, Z, Y, X)) of a region given as spatial slices."""
        p = self.plan
        labels = np.asarray(self.labels[_selection(p.label_roles, p.timepoint, 0, region)])
        shape = labels.shape
        if self.image is None:
            chans = np.zeros((0, *shape), np.float32)
        elif "channel" in p.image_roles:
            chans = np.asarray(self.image.oindex[_selection(p.image_roles, p.timepoint, list(p.channels), region)])
        else:
            chans = np.asarray(self.image[_selection(p.image_roles, p.timepoint, 0, region)])[None]
        if labels.ndim == 2:
            labels, chans = labels[None], chans[:, None]
        return labels, chans

    def stats(self, region: tuple[slice, ...]) -> Stats:
        try:
            labels, chans = self.read(region)
        except OSError as exc:
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InvalidImageError(
                f"{self.plan.url}: cannot read region [{where}] of {self.plan.label_path} or {self.plan.image_path} "
                f"({ngff.error_text(exc)})"
            ) from None
        origin = tuple(s.start for s in region)
        origin = (0,) * (3 - len(origin)) + origin
        stats, smallest = region_stats(labels, chans, origin)
        if smallest < 0:
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InvalidImageError(
                f"{self.plan.url}/{self.plan.label_path}: negative label value {smallest} in region [{where}]; "
                "label values must be >= 0"
            )
        return stats


def plan_regions(shape: tuple[int, ...], chunks: tuple[int, ...], region_pixels: int) -> list[tuple[slice, ...]]:
    """Regions tiling `shape`, each a block of whole chunks of about `region_pixels` pixels at most.

    Blocks grow by doubling, innermost axis first, while they stay within `region_pixels` and the image;
    `region_pixels=0` gives one chunk per region.
    """
    block = list(chunks)
    grown = True
    while grown:
        grown = False
        for ax in reversed(range(len(block))):
            if block[ax] < shape[ax] and math.prod(block) * 2 <= region_pixels:
                block[ax] = min(block[ax] * 2, shape[ax])
                grown = True
    starts = [range(0, s, b) for s, b in zip(shape, block)]
    return [tuple(slice(o, min(o + b, s)) for o, b, s in zip(origin, block, shape)) for origin in product(*starts)]


_READER: RegionReader | None = None


def _init_worker(plan: ReadPlan) -> None:
    global _READER
    _READER = RegionReader(plan)


def _worker_stats(region: tuple[slice, ...]) -> Stats:
    assert _READER is not None
    return _READER.stats(region)


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: no re-import per worker and no `if __name__ == "__main__"` guard needed in user scripts.

    Elsewhere (macOS, Windows) fork is unsafe or missing, so spawn.
    """
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _run_regions(plan: ReadPlan, regions: list[tuple[slice, ...]], workers: int,
                 on_region: Callable[[], None]) -> Iterator[Stats]:
    if workers <= 1 or len(regions) <= 1:
        reader = RegionReader(plan)
        for region in regions:
            yield reader.stats(region)
            on_region()
        return
    with warnings.catch_warnings():
        # zarr and fsspec reset their IO threads in forked children (os.register_at_fork), so Python 3.12's
        # warning about forking a multi-threaded process does not apply to them.
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning)
        pool = ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(plan,))
    with pool:
        todo = iter(regions)
        running: set[Future] = set()
        try:
            for region in todo:
                running.add(pool.submit(_worker_stats, region))
                if len(running) >= 2 * workers:
                    break
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
                    on_region()
                    region = next(todo, None)
                    if region is not None:
                        running.add(pool.submit(_worker_stats, region))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _resolve_channels(image: ngff.NgffImage, channels: list[str] | None) -> tuple[int, ...]:
    names = image.channel_names
    if channels is None:
        return tuple(range(len(names)))
    out = []
    for ch in channels:
        if ch in names:
            out.append(names.index(ch))
        elif ch.isdigit() and int(ch) < len(names):
            out.append(int(ch))
        else:
            raise UsageError(f"{image.url}: no channel '{ch}' (channels: {', '.join(names)})")
    if len(set(out)) != len(out):
        raise UsageError(f"{image.url}: channel listed twice in {channels}")
    return tuple(out)


def _check_pair(image: ngff.NgffImage, label: ngff.LabelImage, level: int, timepoint: int) -> None:
    im, lb = image.multiscale, label.multiscale
    n_levels = min(len(im.levels), len(lb.levels))
    if not 0 <= level < n_levels:
        raise UsageError(
            f"{image.url}: --level {level} out of range (image has {len(im.levels)} levels, "
            f"labels/{label.name} has {len(lb.levels)}; valid: 0..{n_levels - 1})"
        )
    dtype = np.dtype(lb.levels[level].dtype)
    where = f"{image.url}/{lb.levels[level].path}"
    if dtype.kind not in "iu":
        raise InvalidImageError(f"{where}: dtype {dtype}, expected an integer dtype for a label image")
    if lb.spatial_names != im.spatial_names:
        raise InvalidImageError(f"{where}: spatial axes {lb.spatial_names}, the image has {im.spatial_names}")
    if lb.spatial_shape(level) != im.spatial_shape(level):
        raise InvalidImageError(
            f"{where}: spatial shape {lb.spatial_shape(level)} at level {level}, but the image "
            f"({im.levels[level].path}) has {im.spatial_shape(level)}"
        )
    if lb.size("channel", level) != 1:
        raise InvalidImageError(f"{where}: channel axis of size {lb.size('channel', level)}, expected 1")
    n_t = im.size("time", level)
    if not 0 <= timepoint < n_t:
        raise UsageError(f"{image.url}: --timepoint {timepoint} out of range (the image has {n_t} time points)")
    if lb.index("time") is not None and lb.size("time", level) != n_t:
        raise InvalidImageError(f"{where}: {lb.size('time', level)} time points, the image has {n_t}")


def measure(
    image_url: str,
    labels: str,
    out: str | Path,
    *,
    channels: list[str] | None = None,
    level: int = 0,
    timepoint: int = 0,
    workers: int | None = None,
    region_pixels: int = DEFAULT_REGION_PIXELS,
    image_name: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> MeasureResult:
    """Measure every object of `labels/<labels>` in the image at `image_url` into the store `out`.

    `channels` are channel names (or indices) to measure, all by default; `workers` processes (default: one
    per core) each read and reduce regions of about `region_pixels` pixels.

    Example: ``measure("slide.ome.zarr", "nuclei", "slide.cellar", channels=["DAPI", "CD8"])``
    """
    t0 = time.perf_counter()
    out = Path(out)
    image = ngff.open_image(image_url)
    label = image.label(labels)
    _check_pair(image, label, level, timepoint)
    chan_idx = _resolve_channels(image, channels)
    name = image_name or image.name
    store_write.check_output(out, name, labels, overwrite)

    im, lb = image.multiscale, label.multiscale
    suffixes = layout.unique_identifiers([image.channel_names[i] for i in chan_idx])
    geo = registry.Geometry(
        axes=im.spatial_names, spacing_um=im.spacing_um(level), origin_um=im.origin_um(level), channels=tuple(suffixes)
    )
    plan = ReadPlan(
        url=image.url,
        label_path=lb.levels[level].path,
        label_roles=tuple(a.role for a in lb.axes),
        image_path=im.levels[level].path,
        image_roles=tuple(a.role for a in im.axes),
        timepoint=timepoint,
        channels=chan_idx,
    )
    regions = plan_regions(lb.spatial_shape(level), lb.spatial_chunks(level), region_pixels)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    merger = Merger(len(chan_idx))
    with _progress(len(regions), progress) as tick:
        for stats in _run_regions(plan, regions, workers, tick):
            merger.add(stats)
    stats = merger.result()

    column_specs = [*registry.PARTITION_COLUMNS, *(c.to_json() for c in registry.columns(geo))]
    values = registry.compute_columns(stats, geo)
    level_meta = im.levels[level]
    entry = {
        "image": name,
        "label_image": labels,
        "n_objects": len(stats),
        "cellar_version": schemas.cellar_version(),
        "source": {
            "url": _absolute(image.url),
            "ngff_version": image.version,
            "zarr_format": image.zarr_format,
            "image_path": level_meta.path,
            "label_path": lb.levels[level].path,
        },
        "level": level,
        "timepoint": timepoint if im.index("time") is not None else None,
        "axes": list(im.spatial_names),
        "shape": list(im.spatial_shape(level)),
        "pixel_size": [level_meta.scale[i] for i in im.spatial],
        "pixel_unit": [im.axes[i].unit for i in im.spatial],
        "translation": [level_meta.translation[i] for i in im.spatial],
        "spacing_um": list(geo.spacing_um) if geo.spacing_um else None,
        "channels": [
            {"index": i, "name": image.channel_names[i], "column": s} for i, s in zip(chan_idx, suffixes)
        ],
        "features": [f.name for f in registry.FEATURES],
        "columns": column_specs,
        "regions": len(regions),
        "workers": workers,
    }
    table = store_write.arrow_table(values, column_specs[len(registry.PARTITION_COLUMNS):], entry)
    entry["elapsed_s"] = round(time.perf_counter() - t0, 3)
    store_write.write_table(out, entry, table, overwrite=overwrite)
    return MeasureResult(out, name, labels, len(stats), len(regions), time.perf_counter() - t0)


def _absolute(url: str) -> str:
    path = ngff.local_path(url)
    return str(path.resolve()) if path is not None else url


class _progress:
    """A rich progress bar on an interactive terminal; nothing otherwise."""

    def __init__(self, total: int, enabled: bool | None):
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), TextColumn("regions"),
                             TimeRemainingColumn(), transient=True)
        self._bar.start()
        task = self._bar.add_task("measure", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
