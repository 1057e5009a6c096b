"""`measure()`: OME-Zarr image + label image in, one table of a cellar store out.

The label array at the chosen level is cut into regions aligned to its chunks. Each region, read with a halo
around it (labels plus the selected intensity channels), is reduced by the compiled kernels
(`measure.block`) in worker processes that open the arrays themselves from the URL: streaming statistics for
every label, whole-object features for the objects the block owns and saw entirely, touching pairs. Results
are merged as they arrive (at most two regions per worker in flight, so memory is bounded by the regions,
not the image); objects no block saw whole are then measured on crops of their own; features are finished
once and written to the store atomically.

`measure` is these stages in turn, each a function of its own that takes and returns its state explicitly:
`target_table` (what to measure, checked) and `kept_table` (whether the store's copy stays), `plan_measurement`
(a `MeasurePlan`), `reduce_blocks` (`ReducedBlocks`), `finish_objects` (`FinishedObjects`), `commit_table`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice, product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import schemas
from . import features as registry
from .. import ngff
from . import store_write
from .accumulate import Merger, Stats
from .block import BlockResult, KernelPlan, measure_block, measure_object
from .shape_kernels import FERET, INTENSITY_STATS, surface_lut
from ..schemas import store as layout
from ..schemas.errors import InvalidImageError, StoreError, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

DEFAULT_REGION_PIXELS = 1 << 22  # about 4 Mpixel per region: ~50 MB of working set with 4 uint16 channels
DEFAULT_HALO = 64  # pixels around each region: objects reaching further are measured on their own crop


@dataclass(frozen=True)
class ReadPlan:
    """Everything a worker needs to read and reduce blocks: picklable, no open arrays."""

    url: str
    label_path: str
    label_roles: tuple[str, ...]
    label_dtype: str
    image_path: str
    image_roles: tuple[str, ...]
    image_dtype: str
    timepoint: int
    channels: tuple[int, ...]
    shape: tuple[int, ...]  # spatial shape of the level
    halo: int
    kernels: KernelPlan


@dataclass(frozen=True)
class MeasureResult:
    store: Path
    image: str
    label_image: str
    n_objects: int
    n_regions: int
    elapsed_s: float
    skipped: bool = False  # the store already held this table, measured with the same settings


def _selection(roles: tuple[str, ...], timepoint: int, channel, spatial: tuple[slice, ...]) -> tuple:
    it = iter(spatial)
    return tuple(timepoint if r == "time" else channel if r == "channel" else next(it) for r in roles)


def _pad3(items: tuple, fill) -> tuple:
    return (fill,) * (3 - len(items)) + tuple(items)


class RegionReader:
    """Reads blocks and object crops of one label image and its intensity channels, and reduces them."""

    def __init__(self, plan: ReadPlan):
        self.plan = plan
        self.labels = ngff.open_level(plan.url, plan.label_path)
        self.image = ngff.open_level(plan.url, plan.image_path) if plan.channels else None
        ch = plan.channels
        # A run of consecutive channels reads as a slice, which zarr serves faster than a list.
        contiguous = len(ch) > 0 and list(ch) == list(range(ch[0], ch[0] + len(ch)))
        self._channel_sel = slice(ch[0], ch[0] + len(ch)) if contiguous else list(ch)

    def read(self, box: tuple[slice, ...], channel_box: tuple[slice, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels as (Z, Y, X), intensities as (C, Z, Y, X)) of a box given as spatial slices; the intensities of
        `channel_box` instead where given."""
        p = self.plan
        cbox = box if channel_box is None else channel_box
        try:
            labels = np.asarray(self.labels[_selection(p.label_roles, p.timepoint, 0, box)])
            if self.image is None:
                chans = np.zeros((0, *(s.stop - s.start for s in cbox)), np.float32)
            elif "channel" in p.image_roles:
                sel = _selection(p.image_roles, p.timepoint, self._channel_sel, cbox)
                # basic indexing (a slice of channels) is about twice as fast in zarr as orthogonal indexing
                get = self.image.oindex if isinstance(self._channel_sel, list) else self.image
                chans = np.asarray(get[sel])
            else:
                chans = np.asarray(self.image[_selection(p.image_roles, p.timepoint, 0, cbox)])[None]
        except OSError as exc:
            where = ", ".join(f"{s.start}:{s.stop}" for s in box)
            raise InvalidImageError(
                f"{p.url}: cannot read region [{where}] of {p.label_path} or {p.image_path} ({ngff.error_text(exc)})"
            ) from None
        except Exception as exc:  # a codec that cannot decode a chunk (corrupt or truncated data)
            raise InvalidImageError(self._bad_chunk(box, exc)) from None
        if labels.ndim == 2:
            labels, chans = labels[None], chans[:, None]
        return labels, chans

    def _bad_chunk(self, box: tuple[slice, ...], exc: Exception) -> str:
        """One line naming the chunk of `box` that does not decode (found by reading the box chunk by chunk)."""
        p = self.plan
        for arr, path, roles, channel in ((self.labels, p.label_path, p.label_roles, 0),
                                          (self.image, p.image_path, p.image_roles, None)):
            if arr is None:
                continue
            sel = _selection(roles, p.timepoint, slice(None) if channel is None else channel, box)
            ranges = []
            for s_, c, n in zip(sel, arr.chunks, arr.shape):
                if isinstance(s_, slice):
                    start, stop = s_.indices(n)[:2]
                    ranges.append(range(start // c, max(start // c + 1, -(-stop // c))))
                else:
                    ranges.append(range(s_ // c, s_ // c + 1))
            for coords in product(*ranges):
                try:
                    arr[tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(coords, arr.chunks, arr.shape))]
                except Exception as chunk_exc:
                    key = arr.metadata.encode_chunk_key(coords)
                    meta = "zarr.json" if arr.metadata.zarr_format == 3 else ".zarray"
                    return (f"{p.url}/{path}/{key}: chunk cannot be decoded ({type(chunk_exc).__name__}: "
                            f"{ngff.error_text(chunk_exc)}): damaged, or not the data type and chunk shape "
                            f"{path}/{meta} gives")
        return f"{p.url}: cannot decode region of {p.label_path} or {p.image_path} ({ngff.error_text(exc)})"

    def block(self, region: tuple[slice, ...]) -> BlockResult:
        """Reduce the region plus its halo (see `measure.block`)."""
        p = self.plan
        box = tuple(slice(max(0, r.start - p.halo), min(n, r.stop + p.halo)) for r, n in zip(region, p.shape))
        # Chunks are read whole: a 2048 x 2048 region with its halo meets 36 chunks of 512 x 512 where its core
        # meets 16, so the intensities' halo is read only where a whole-object kernel reads intensities.
        labels, chans = self.read(box, None if p.kernels.crop_intensities else region)
        core = _pad3(tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region, box)), slice(0, 1))
        edges = _pad3(tuple((b.start == 0, b.stop == n) for b, n in zip(box, p.shape)), (True, True))
        result = measure_block(labels, chans, core, _pad3(tuple(r.start for r in region), 0), edges, p.kernels)
        if result.smallest < 0:
            where = ", ".join(f"{s.start}:{s.stop}" for s in box)
            raise InvalidImageError(
                f"{p.url}/{p.label_path}: negative label value {result.smallest} in region [{where}]; "
                "label values must be >= 0"
            )
        return result

    def object(self, item: tuple[int, tuple[int, ...], tuple[int, ...]]) -> tuple[int, np.ndarray]:
        """Whole-object columns of one object, from its bounding box (global, inclusive)."""
        label_id, lo, hi = item
        labels, chans = self.read(tuple(slice(a, b + 1) for a, b in zip(lo, hi)))
        return label_id, measure_object(labels, chans, label_id, _pad3(lo, 0), self.plan.kernels)


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


def _in_worker(task: Callable[[RegionReader, Any], Any], item: Any) -> Any:
    """`task(reader, item)` in a pool worker, with the reader its initializer opened (`RegionReader.block` or
    `RegionReader.object`)."""
    assert _READER is not None
    return task(_READER, item)


def _compile_kernels(plan: ReadPlan) -> None:
    """Run the kernels once on a tiny block of the image's dtypes, so that numba compiles (or loads from its
    cache) here, before forking, rather than in every worker at once."""
    image_dtype = plan.image_dtype if plan.channels else np.float32
    labels = np.zeros((1, 4, 4), plan.label_dtype)
    labels[0, 1:3, 1:3] = 1
    chans = np.zeros((len(plan.channels), 1, 4, 4), image_dtype)
    core = (slice(0, 1), slice(0, 4), slice(0, 4))
    if plan.kernels.ndim == 3:
        labels, chans = np.repeat(labels, 4, axis=0), np.repeat(chans, 4, axis=1)
        core = (slice(0, 4), *core[1:])
    measure_block(labels, chans, core, (0, 0, 0), ((True, True),) * 3, plan.kernels)


def _mp_context() -> multiprocessing.context.BaseContext:
    """fork on Linux: no re-import per worker and no `if __name__ == "__main__"` guard needed in user scripts.

    Elsewhere (macOS, Windows) fork is unsafe or missing, so spawn.
    """
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class Executor:
    """Runs reader tasks (`RegionReader.block`, `RegionReader.object`) in worker processes, in this one, or on
    dask.distributed, at most two per worker in flight. The workers start on first use and stop on exit."""

    def __init__(self, plan: ReadPlan, workers: int, scheduler: str | None = None):
        self.plan, self.workers, self.scheduler = plan, workers, scheduler
        self._pool: ProcessPoolExecutor | None = None
        self._reader: RegionReader | None = None
        self._client = None
        self._cluster = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._client is not None:
            if self._cluster is not None:  # our own workers: their readers and sessions go while they can
                self._client.run(_forget_dask_readers, on_error="ignore")
            self._client.close()
        if self._cluster is not None:
            # The cluster is ours and ends with the run: its nannies kill a worker that takes more than 4 s to
            # exit (spawned Python processes with numba and Arrow loaded, on a busy machine) and warn about it,
            # which here is no news.
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                self._cluster.close()
            finally:
                nanny.setLevel(level)

    def _dask(self):
        """A dask.distributed client: a LocalCluster of `workers` processes, or the scheduler at an address."""
        if self._client is None:
            try:
                from distributed import Client, LocalCluster
            except ImportError:
                raise UsageError("--scheduler/--cluster need dask.distributed: pip install 'cellar[dask]'") from None
            try:
                if self.scheduler == "local":
                    # dashboard_address=None still serves the scheduler's HTTP routes on port 8787, and warns
                    # on stderr when another cluster (a notebook's, say) holds it: a free port, no dashboard
                    self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                                 dashboard_address=":0", scheduler_kwargs={"dashboard": False})
                    self._client = Client(self._cluster)
                else:
                    self._client = Client(self.scheduler, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise UsageError(f"--scheduler {self.scheduler}: cannot connect ({ngff.error_text(exc)})") from None
        return self._client

    def map(self, task: Callable[[RegionReader, Any], Any], items: list) -> Iterator:
        """Results of `task(reader, item)` for every item, with a reader of the plan in each worker, in completion
        order."""
        if self.scheduler is not None and items:
            yield from self._map_dask(task, items)
            return
        if self.workers <= 1 or len(items) <= 1:
            if self._reader is None:
                self._reader = RegionReader(self.plan)
            for item in items:
                yield task(self._reader, item)
            return
        if self._pool is None:
            _compile_kernels(self.plan)  # once here, inherited by the forked workers
            with warnings.catch_warnings():
                # zarr and fsspec reset their IO threads in forked children (os.register_at_fork), so Python
                # 3.12's warning about forking a multi-threaded process does not apply to them.
                warnings.filterwarnings("ignore", message=".*use of fork", category=DeprecationWarning)
                self._pool = ProcessPoolExecutor(self.workers, mp_context=_mp_context(), initializer=_init_worker,
                                                 initargs=(self.plan,))
        todo = iter(items)
        running: set[Future] = set()
        for item in todo:
            running.add(self._pool.submit(_in_worker, task, item))
            if len(running) >= 2 * self.workers:
                break
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
                item = next(todo, None)
                if item is not None:
                    running.add(self._pool.submit(_in_worker, task, item))

    def _map_dask(self, task: Callable[[RegionReader, Any], Any], items: list) -> Iterator:
        """`task(reader, item)` as dask tasks, at most two per worker thread in flight. Each task carries the small
        ReadPlan; the workers open the image from its URL themselves and keep a reader per plan."""
        from distributed import as_completed

        client = self._dask()
        slots = 2 * max(1, sum(client.nthreads().values()))
        todo = iter(items)
        first = [client.submit(_dask_task, self.plan, task, item, pure=False) for item in islice(todo, slots)]
        queue = as_completed(first)
        for fut in queue:
            yield fut.result()
            fut.release()
            item = next(todo, None)
            if item is not None:
                queue.add(client.submit(_dask_task, self.plan, task, item, pure=False))


_DASK_READERS: dict[ReadPlan, RegionReader] = {}


def _forget_dask_readers() -> None:
    """On a dask worker: drop the readers and close the remote sessions this process opened."""
    _DASK_READERS.clear()
    ngff.close_remote()


def _dask_task(plan: ReadPlan, task: Callable[[RegionReader, Any], Any], item: Any) -> Any:
    """`task(reader, item)` on a dask worker, with the worker's reader of `plan`."""
    reader = _DASK_READERS.get(plan)
    if reader is None:
        reader = _DASK_READERS[plan] = RegionReader(plan)
    return task(reader, item)


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
        meta = "zarr.json" if image.zarr_format == 3 else ".zarray"
        raise InvalidImageError(f"{where}/{meta}: dtype {dtype}, expected an integer dtype for a label image")
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
    features: str | None = None,
    radius: float | None = None,
    texture_levels: int = 16,
    level: int = 0,
    timepoint: int = 0,
    workers: int | None = None,
    region_pixels: int = DEFAULT_REGION_PIXELS,
    halo: int = DEFAULT_HALO,
    image_name: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    context: dict[str, str | int] | None = None,
    log: Callable[[str], None] | None = None,
    scheduler: str | None = None,
) -> MeasureResult:
    """Measure every object of `labels/<labels>` in the image at `image_url` into the store `out`.

    `channels` are channel names (or indices) to measure, all by default; `features` names groups or
    features ("morphology,intensity,spatial" by default, "all", or names); `radius` is the neighbourhood
    radius of `neighbors_within_radius` (default 20 um, or 50 px for an uncalibrated image);
    `texture_levels` the grey levels of the texture group's co-occurrence matrices. `workers`
    processes (default: one per core) each read and reduce regions of about `region_pixels` pixels plus a
    `halo` of pixels around them; objects reaching beyond the halo are measured on a crop of their own.
    `context` adds constant columns to every row (a plate's `plate`, `well`, `row`, `column`, `field`).
    `progress`: a progress bar on an interactive terminal (None: when stderr is one; False: never); `log`
    receives plain progress lines instead when there is no bar. `scheduler` runs the region and object tasks
    on dask.distributed: "local" starts a LocalCluster of `workers` processes, an address such as
    "tcp://host:8786" uses a running cluster (its workers read the image from its URL themselves).

    A table the store already holds with the same settings (source, level, time point, channels, features,
    radius, texture levels, context) is kept and the call returns at once (`skipped`), so re-running an
    interrupted multi-image command completes the store; with other settings it is refused unless
    `overwrite`.

    Example: ``measure("slide.ome.zarr", "nuclei", "slide.cellar", channels=["DAPI", "CD8"])``
    """
    t0 = time.perf_counter()
    target = target_table(image_url, labels, out, channels=channels, features=features, radius=radius,
                          texture_levels=texture_levels, level=level, timepoint=timepoint, image_name=image_name,
                          overwrite=overwrite, context=context, log=log)
    kept = kept_table(target)
    if kept is not None:
        return MeasureResult(target.out, target.name, labels, kept, 0, time.perf_counter() - t0, skipped=True)
    plan = plan_measurement(target, workers=workers, region_pixels=region_pixels, halo=halo, scheduler=scheduler,
                            log=log)
    with Executor(plan.read, plan.workers, plan.scheduler) as ex:
        # one expression: the blocks' pairs and rows are let go once the objects are finished
        objects = finish_objects(plan, reduce_blocks(plan, ex, progress=progress, log=log), ex)
    commit_table(plan, objects, t0)
    return MeasureResult(target.out, target.name, labels, len(objects), len(plan.regions), time.perf_counter() - t0)


# --- the stages of `measure` --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableTarget:
    """The table a run is asked for, checked against the image: what to measure and where it goes."""

    image: ngff.NgffImage
    label: ngff.LabelImage
    out: Path
    name: str  # the image's name in the store (its Hive partition value)
    labels: str  # the label image's name
    level: int
    timepoint: int
    channels: tuple[int, ...]  # indices of the channels to read; none when no selected feature reads intensities
    features: tuple[registry.Feature, ...]
    radius: float | None
    texture_levels: int
    context: dict[str, str | int]  # constant columns
    settings: dict  # what a table in the store must have been measured with to be kept
    overwrite: bool


def target_table(image_url: str, labels: str, out: str | Path, *, channels: list[str] | None = None,
                 features: str | None = None, radius: float | None = None, texture_levels: int = 16, level: int = 0,
                 timepoint: int = 0, image_name: str | None = None, overwrite: bool = False,
                 context: dict[str, str | int] | None = None,
                 log: Callable[[str], None] | None = None) -> TableTarget:
    """Stage 1a: the table `measure` is asked for (arguments as there), with the image, its label image, the
    channels and the features checked (UsageError, InvalidImageError) and its settings."""
    selected = registry.select(features)
    image = ngff.open_image(image_url)
    label = image.label(labels)
    _check_pair(image, label, level, timepoint)
    chan_idx = _resolve_channels(image, channels)
    if not any(f.per_channel for f in selected):
        chan_idx = ()  # no intensity feature asked for: do not read the image at all
    name = layout.partition_value(image_name or image.name)  # as queries see it: the Hive folder's value
    if name != (image_name or image.name) and log is not None:
        log(f"image name {image_name or image.name!r} is stored as {name!r} (letters, digits, '.', '_', '-')")
    if radius is not None and not (math.isfinite(radius) and radius > 0):
        raise UsageError(f"--radius {radius}: expected a positive distance")
    settings = {
        "url": _absolute(image.url), "labels": labels, "level": level, "timepoint": timepoint,
        "channels": [image.channel_names[i] for i in chan_idx], "features": [f.name for f in selected],
        "radius": radius, "texture_levels": texture_levels, "context": dict(context or {}),
    }
    return TableTarget(image=image, label=label, out=Path(out), name=name, labels=labels, level=level,
                       timepoint=timepoint, channels=chan_idx, features=selected, radius=radius,
                       texture_levels=texture_levels, context=dict(context or {}), settings=settings,
                       overwrite=overwrite)


def kept_table(target: TableTarget) -> int | None:
    """Stage 1b: the number of objects of the table the store already holds for `target` with the same settings
    and intact files, which then stays; None when the table is to be measured. A StoreError if the store holds
    it with other settings (unless `target.overwrite`) or cannot take a table."""
    existing = store_write.existing_entry(target.out, target.name, target.labels)
    if existing is not None and not target.overwrite:
        if existing.get("settings") == target.settings:
            store_write.check_files(target.out, existing)  # kept only if its files are intact
            return int(existing["n_objects"])
        raise StoreError(f"{target.out}: already holds image={target.name} label_image={target.labels}, measured "
                         "with other settings; pass --overwrite to replace it")
    store_write.check_output(target.out, target.name, target.labels, target.overwrite)
    return None


@dataclass(frozen=True)
class MeasurePlan:
    """Everything decided before a pixel is read."""

    target: TableTarget
    geo: registry.Geometry
    read: ReadPlan  # what each worker reads, and the kernels it runs
    regions: list[tuple[slice, ...]]  # tiling the level, in whole chunks
    workers: int
    scheduler: str | None
    columns: list[dict]  # the table's column specs: partition keys, features, context

    @property
    def what(self) -> str:
        return f"{self.target.name}/labels/{self.target.labels}"


def plan_measurement(target: TableTarget, *, workers: int | None = None, region_pixels: int = DEFAULT_REGION_PIXELS,
                     halo: int = DEFAULT_HALO, scheduler: str | None = None,
                     log: Callable[[str], None] | None = None) -> MeasurePlan:
    """Stage 1c: the geometry and columns of the table, the kernels to run, and the regions to read (arguments as
    for `measure`)."""
    im, lb, level = target.image.multiscale, target.label.multiscale, target.level
    suffixes = layout.unique_identifiers([target.image.channel_names[i] for i in target.channels])
    spacing_um = im.spacing_um(level)
    if im.unknown_units and log is not None:
        log(f"{target.image.url}: unit {', '.join(sorted(repr(u) for u in set(im.unknown_units)))} is not a length "
            "unit (NGFF names them as UDUNITS-2 does: micrometer, nanometer, ...); measuring in pixels only")
    geo = registry.Geometry(
        axes=im.spatial_names, spacing_um=spacing_um, origin_um=im.origin_um(level), channels=tuple(suffixes),
        radius=target.radius if target.radius is not None else (
            registry.DEFAULT_RADIUS_UM if spacing_um else registry.DEFAULT_RADIUS_PX),
    )
    kplan = _kernel_plan(target, geo)
    shape = lb.spatial_shape(level)
    read = ReadPlan(
        url=target.image.url,
        label_path=lb.levels[level].path,
        label_roles=tuple(a.role for a in lb.axes),
        label_dtype=lb.levels[level].dtype,
        image_path=im.levels[level].path,
        image_roles=tuple(a.role for a in im.axes),
        image_dtype=im.levels[level].dtype,
        timepoint=target.timepoint,
        channels=target.channels,
        shape=shape,
        halo=max(1, halo) if kplan.halo_needed else 0,
        kernels=kplan,
    )
    return MeasurePlan(target=target, geo=geo, read=read,
                       regions=plan_regions(shape, lb.spatial_chunks(level), region_pixels),
                       workers=max(1, workers if workers is not None else (os.cpu_count() or 1)),
                       scheduler=scheduler, columns=_column_specs(target, geo))


def _kernel_plan(target: TableTarget, geo: registry.Geometry) -> KernelPlan:
    """The kernels the selected features need on this image, with what they need to know."""
    needed = registry.kernels_needed(target.features, geo)
    streams = registry.streams_needed(target.features, geo)
    if not 2 <= target.texture_levels <= 256:
        raise UsageError(f"--texture-levels {target.texture_levels}: expected 2 to 256")
    luts: dict = {}
    if geo.ndim == 3 and "shape" in needed:
        luts = {"surface_lut": tuple(surface_lut((1.0, 1.0, 1.0))),
                "surface_lut_um": tuple(surface_lut(tuple(geo.spacing.tolist())))}
    return KernelPlan(ndim=geo.ndim, shape="shape" in needed, intensity_crop="intensity_crop" in needed,
                      feret=any(f.name in FERET for f in target.features), touching="touching" in needed,
                      texture="texture" in needed, spread="spread" in streams, weighted="weighted" in streams,
                      texture_levels=target.texture_levels, spacing=tuple(geo.spacing[-2:].tolist()), **luts)


def _column_specs(target: TableTarget, geo: registry.Geometry) -> list[dict]:
    """The table's column specs, in table order: partition keys, features, then the constant context columns."""
    specs = [*registry.PARTITION_COLUMNS, *(c.to_json() for c in registry.columns(geo, target.features))]
    for key, value in target.context.items():  # constant columns, for example a plate's well and field
        specs.append(registry.CONTEXT_COLUMNS.get(key) or {
            "name": key, "dtype": "string" if isinstance(value, str) else "int64", "unit": "",
            "description": f"{key} of the measured image"})
    return specs


@dataclass
class ReducedBlocks:
    """What the blocks of a plan leave, merged."""

    stats: Stats  # every object's streaming statistics, merged across blocks (sorted by label id)
    crops: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per block with whole-object kernels: (ids, rows, pixels
    #   the block saw of each) of the objects it owns and saw whole (`measure.block`)
    pairs: np.ndarray  # (p, 2) uint64: touching label pairs (with the touching kernel)


def reduce_blocks(plan: MeasurePlan, ex: Executor, *, progress: bool | None = None,
                  log: Callable[[str], None] | None = None) -> ReducedBlocks:
    """Stage 2: every region of the plan read and reduced by a worker of `ex`, the results merged as they arrive.
    `progress` and `log` as for `measure`."""
    kplan = plan.read.kernels
    merger = Merger(0 if kplan.intensity_crop else len(plan.read.channels))
    crops: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pairs = []
    with _progress(len(plan.regions), progress, log, plan.what) as tick:
        for block in ex.map(RegionReader.block, plan.regions):
            merger.add(block.stats)
            if kplan.crop:
                crops.append((block.crop_ids, block.crop, block.crop_counts))
            pairs.append(block.pairs)
            tick(len(block.crop_ids) if kplan.crop else len(block.stats))  # objects (seen whole, or seen)
    return ReducedBlocks(merger.result(), crops, np.concatenate(pairs) if pairs else np.empty((0, 2), np.uint64))


@dataclass
class FinishedObjects:
    """Every object's inputs to its features, over all objects at once: what the table's rows are finished from."""

    results: registry.Results  # merged statistics, touching counts, neighbour queries
    whole: _WholeRows | None  # whole-object kernel rows, when a selected feature needs them

    def __len__(self) -> int:
        return len(self.results.stats)


def finish_objects(plan: MeasurePlan, reduced: ReducedBlocks, ex: Executor) -> FinishedObjects:
    """Stage 3: what needs all of an object or all objects: the whole-object rows (measuring on crops of their own,
    through `ex`, the objects no block saw whole), the touching counts and the neighbour queries."""
    kplan, stats = plan.read.kernels, reduced.stats
    results = registry.Results(stats)
    whole = None
    if kplan.crop:
        whole = _whole_object_rows(ex, stats, reduced.crops, plan.geo.ndim,
                                   kplan.crop_columns(len(plan.read.channels)))
    if kplan.touching:
        results.touching = _touching_counts(stats.ids, reduced.pairs)
    registry.prepare(results, plan.geo, plan.target.features)  # neighbour queries, over all objects at once
    return FinishedObjects(results, whole)


def commit_table(plan: MeasurePlan, objects: FinishedObjects, t0: float) -> None:
    """Stage 4: the features finished a row group at a time, written, and the table committed to the store with its
    provenance (`table_entry`), whose `elapsed_s` counts from `t0` (the run's start) to the last row group written."""
    entry = table_entry(plan, len(objects))
    tables = row_groups(plan, objects, provenance=dict(entry))
    store_write.write_table(plan.target.out, entry, tables, overwrite=plan.target.overwrite,
                            written=lambda done: done.update(elapsed_s=round(time.perf_counter() - t0, 3)))


def table_entry(plan: MeasurePlan, n_objects: int) -> dict:
    """The table's entry in the store's log, which its Parquet file also carries as provenance."""
    target, geo = plan.target, plan.geo
    im, lb, level = target.image.multiscale, target.label.multiscale, target.level
    level_meta = im.levels[level]
    return {
        "image": target.name,
        "label_image": target.labels,
        "n_objects": n_objects,
        "cellar_version": schemas.cellar_version(),
        "source": {
            "url": _absolute(target.image.url),
            "ngff_version": target.image.version,
            "zarr_format": target.image.zarr_format,
            "image_path": level_meta.path,
            "label_path": lb.levels[level].path,
        },
        "level": level,
        "timepoint": target.timepoint if im.index("time") is not None else None,
        "axes": list(im.spatial_names),
        "shape": list(im.spatial_shape(level)),
        "pixel_size": [level_meta.scale[i] for i in im.spatial],
        "pixel_unit": [im.axes[i].unit for i in im.spatial],
        "translation": [level_meta.translation[i] for i in im.spatial],
        "spacing_um": list(geo.spacing_um) if geo.spacing_um else None,
        "channels": [
            {"index": i, "name": target.image.channel_names[i], "column": s}
            for i, s in zip(target.channels, geo.channels)
        ],
        "features": [f.name for f in target.features if not f.key],
        "radius": geo.radius if "spatial" in registry.kernels_needed(target.features, geo) else None,
        "texture_levels": target.texture_levels if plan.read.kernels.texture else None,
        "halo": plan.read.halo,
        "settings": target.settings,
        "context": dict(target.context),
        "columns": plan.columns,
        "regions": len(plan.regions),
        "workers": plan.workers,
    }


def row_groups(plan: MeasurePlan, objects: FinishedObjects, provenance: dict) -> Iterator[pa.Table]:
    """The table a row group at a time, rows in the store's spatial order (`schemas.store.spatial_order` of the
    centroids): only one row group's columns are ever built, besides the whole-object rows."""
    stats, target = objects.results.stats, plan.target
    specs = plan.columns[len(registry.PARTITION_COLUMNS):]
    n = len(stats)
    order = layout.spatial_order(stats.coord_sum[:, 1] / np.maximum(stats.count, 1),
                                 stats.coord_sum[:, 2] / np.maximum(stats.count, 1))
    for start in range(0, n, store_write.ROW_GROUP_SIZE) if n else [0]:
        sel = order[start:start + store_write.ROW_GROUP_SIZE]
        part, crop = stats.take(sel), {}
        if objects.whole is not None:
            crop = objects.whole.columns(sel)
            if plan.read.kernels.intensity_crop:
                part = _crop_intensity_stats(part, crop, len(target.channels))
        values = registry.compute_columns(objects.results.rows(sel, part, crop), plan.geo, target.features)
        for key, value in target.context.items():
            values[key] = np.full(len(sel), value, dtype=object if isinstance(value, str) else np.int64)
        yield store_write.arrow_table(values, specs, provenance)


def measure_many(images: list[str], labels: str, out: str | Path, *, image_name: str | None = None,
                 timepoint: int | str = 0, log: Callable[[str], None] | None = None,
                 **options) -> list[MeasureResult]:
    """Measure several images, and every field of every well of HCS plates, into one store, one table each.

    Each table is committed on its own, so a run stopped at any moment (even by SIGKILL) and started again
    with the same arguments keeps the tables already written (`measure` skips those with the same settings)
    and measures the rest: the store ends as an uninterrupted run would leave it. Plate fields are named
    `<plate>_<row><column>_<field>` and carry `plate`, `well`, `row`, `column`, `field` columns.
    `timepoint="all"` measures every time point of images with a t axis as a table of its own, named
    `<image>_t<k>` with a `timepoint` column. `log` gets one line per table. Other keyword arguments go to
    `measure`.
    """
    sources: list[tuple[str, str | None, dict | None]] = []
    for url in images:
        fields = ngff.plate_fields(url)
        if fields is None:
            sources.append((url, image_name, None))
        else:
            if not fields:
                raise InvalidImageError(f"{url}: the plate lists no fields")
            sources.extend((f.url, f.name, f.context) for f in fields)
    if image_name is not None and len(sources) > 1:
        raise UsageError("--image-name names one image; several images (or a plate) take their own names")
    runs: list[tuple[str, str | None, dict | None, int]] = []
    for url, name, context in sources:
        if timepoint != "all":
            runs.append((url, name, context, int(timepoint)))
            continue
        image = ngff.open_image(url)
        n_t = image.multiscale.size("time", options.get("level", 0))
        if image.multiscale.index("time") is None:
            runs.append((url, name, context, 0))
        else:
            runs.extend((url, f"{name or image.name}_t{t}", {**(context or {}), "timepoint": t}, t) for t in range(n_t))
    names: dict[str, str] = {}
    for url, name, _, _ in runs:
        key = name or ngff.open_image(url).name
        if key in names:
            raise UsageError(f"{url} and {names[key]} would both be image '{key}' in the store; "
                             "measure them into different stores or rename one")
        names[key] = url
    results = []
    for i, (url, name, context, t) in enumerate(runs, 1):
        result = measure(url, labels, out, image_name=name, context=context, timepoint=t, log=log, **options)
        results.append(result)
        if log is not None and len(runs) > 1:
            what = f"{result.image}/labels/{result.label_image}"
            log(f"[{i}/{len(runs)}] " + (f"{what}: already in the store with the same settings, kept" if result.skipped
                else f"measured {result.n_objects} objects of {what} ({result.n_regions} regions) in "
                     f"{result.elapsed_s:.2f} s"))
    return results


class _WholeRows:
    """The whole-object rows of every object (aligned with `stats.ids`), kept in the pieces the blocks and
    the own-crop measurements sent, so that the rows are never copied into one array: row groups take
    theirs as they are written (`columns`)."""

    def __init__(self, stats, names: list[str]):
        self.ids, self.count, self.names = stats.ids, stats.count, names
        self.pieces: list[np.ndarray] = []
        self.piece = np.full(len(stats), -1, np.int64)  # which piece holds each object's row
        self.row = np.zeros(len(stats), np.int64)  # and where in it

    def add(self, ids: np.ndarray, rows: np.ndarray, counts: np.ndarray | None = None) -> None:
        """Rows of the objects `ids`; with `counts` (pixels the block saw of each), only the rows of objects
        the block saw entirely."""
        pos = np.searchsorted(self.ids, ids)
        at = np.arange(len(pos))
        if counts is not None:  # the block's array is kept as it is, rows of objects not seen whole unused
            keep = counts == self.count[pos]
            pos, at = pos[keep], at[keep]
        if (self.piece[pos] >= 0).any() or len(np.unique(pos)) != len(pos):
            raise RuntimeError("bug: an object was measured whole twice")
        self.piece[pos] = len(self.pieces)
        self.row[pos] = at
        self.pieces.append(rows)

    def missing(self) -> np.ndarray:
        """Positions of the objects no block saw whole."""
        return np.flatnonzero(self.piece < 0)

    def columns(self, sel: np.ndarray) -> dict[str, np.ndarray]:
        """The whole-object columns of the objects at positions `sel`."""
        piece, row = self.piece[sel], self.row[sel]
        if (piece < 0).any():
            raise RuntimeError("bug: whole-object features do not cover every object")
        out = np.empty((len(self.names), len(sel)))
        by_piece = np.argsort(piece, kind="stable")
        bounds = np.flatnonzero(np.diff(piece[by_piece])) + 1
        for group in np.split(by_piece, bounds) if len(sel) else []:
            out[:, group] = self.pieces[piece[group[0]]][row[group]].T
        return {name: out[j] for j, name in enumerate(self.names)}


def _whole_object_rows(ex: Executor, stats: Stats, crops: list, ndim: int, names: list[str]) -> _WholeRows:
    """Whole-object rows of every object: those from blocks that saw all of their object (their pixel count
    is the merged count; `crops` as in `ReducedBlocks`), and for every other object a row measured on a crop of
    its own."""
    whole = _WholeRows(stats, names)
    for ids, rows, counts in crops:
        whole.add(ids, rows.reshape(len(ids), len(names)), counts)
    at = whole.missing()
    items = [(int(stats.ids[r]), tuple(stats.bbox_min[r, 3 - ndim:]), tuple(stats.bbox_max[r, 3 - ndim:])) for r in at]
    own = list(ex.map(RegionReader.object, items))
    if own:
        whole.add(np.array([i for i, _ in own], np.uint64), np.array([v for _, v in own]).reshape(len(own), len(names)))
    if len(whole.missing()):
        raise RuntimeError("bug: whole-object features do not cover every object")
    return whole


def _crop_intensity_stats(stats, crop: dict[str, np.ndarray], n_channels: int):
    """`stats` with its per-channel intensity statistics taken from the whole-object columns."""
    fields = {}
    for name, cols in INTENSITY_STATS:
        per = np.stack([np.stack([crop[f"{col}__{c}"] for col in cols], axis=-1) for c in range(n_channels)], axis=1)
        fields[name] = per if name == "wcoord" else per[..., 0]
    return dataclasses.replace(stats, **fields)


def _touching_counts(ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Number of distinct face-sharing neighbours of each id, from (a, b) label pairs found per block."""
    if not len(pairs):
        return np.zeros(len(ids), np.int64)
    ends = np.searchsorted(ids, pairs)  # positions of both labels, as one int64 key per pair
    keys = np.unique(ends[:, 0] * len(ids) + ends[:, 1])  # a pair seen by two blocks counts once
    return np.bincount(np.concatenate([keys // len(ids), keys % len(ids)]), minlength=len(ids)).astype(np.int64)


def _absolute(url: str) -> str:
    path = ngff.local_path(url)
    return str(path.resolve()) if path is not None else url


class _progress:
    """Progress over the regions of one table: a rich bar (regions, objects, rate, ETA) on an interactive
    terminal; elsewhere plain lines through `log`, at most one every 2 s; nothing when `enabled` is False."""

    def __init__(self, total: int, enabled: bool | None, log: Callable[[str], None] | None = None, what: str = ""):
        self.total, self.what, self.log = total, what, log
        self.bar = sys.stderr.isatty() if enabled is None else enabled
        if enabled is False:
            self.log = None
        self._bar = None
        self._done = self._objects = self._lines = 0
        self._t0 = self._last = time.perf_counter()

    def __enter__(self) -> Callable[[int], None]:
        if self.bar:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Progress(TextColumn(f"measuring {self.what}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("regions"), TaskProgressColumn(),
                                 TextColumn("{task.fields[objects]:,} objects, {task.fields[rate]:,.0f} objects/s"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                                 console=Console(stderr=True))  # where the bar was decided on (stdout is data)
            self._bar.start()
            task = self._bar.add_task("measure", total=self.total, objects=0, rate=0.0)

            def tick(objects: int) -> None:
                self._objects += objects
                rate = self._objects / max(time.perf_counter() - self._t0, 1e-9)
                self._bar.update(task, advance=1, objects=self._objects, rate=rate)

            return tick
        if self.log is None:
            return lambda objects: None

        def log_tick(objects: int) -> None:
            self._done += 1
            self._objects += objects
            now = time.perf_counter()
            # at most a line every 2 s (short runs print none), and the last one if any came before
            if now - self._last >= 2.0 or (self._done == self.total and self._lines):
                self._last = now
                self._lines += 1
                elapsed = now - self._t0
                eta = elapsed / self._done * (self.total - self._done)
                self.log(f"measuring {self.what}: {self._done}/{self.total} regions, {self._objects:,} objects, "
                         f"{self._objects / max(elapsed, 1e-9):,.0f} objects/s, {elapsed:.1f} s elapsed, ETA {eta:.1f} s")

        return log_tick

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
