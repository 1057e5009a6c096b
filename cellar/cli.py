"""The `cellar` command: `demo`, `measure`, `features`, `sql`, `info`, `view` (the web viewer of `viewer/`), and
the object commands of `cellar.cli_objects` (`filter`, `color`, `render`, `hist`, `annotate`).

User mistakes (`schemas.errors.CellarError`) print one line, `cellar: error: ...`, and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cli_objects
from .cli_objects import positive_int
from .schemas.atomic import atomic_write
from .schemas.errors import CellarError, QueryError, UsageError

OUTPUT_FORMATS = ("table", "csv", "json", "parquet")


def _timepoint(text: str) -> int | str:
    return "all" if text == "all" else positive_int(text)


class _HelpFromRegistry(argparse.Action):
    """-h/--help of `cellar measure`: fills in the help of `--features` (`self.features`, set once that option is
    declared) from the feature registry, then prints the help. The registry is read here rather than when the
    parser is built: importing it loads the compiled kernels, about a second that no other command should wait for."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)
        self.features: argparse.Action | None = None

    def __call__(self, parser: argparse.ArgumentParser, namespace, values, option_string=None) -> None:
        from .measure import features as registry

        if self.features is not None:
            self.features.help = (f"groups ({', '.join(registry.GROUPS)}), feature names, or 'all' (default: "
                                  f"{','.join(registry.DEFAULT_GROUPS)}; see `cellar features`)")
        parser.print_help()
        parser.exit()


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(Path(args.dir), workers=args.workers)


def _cmd_measure(args: argparse.Namespace) -> int:
    from . import measure

    channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
    # several tables: a log line each as it is committed
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = measure.measure_many(
        args.images, args.labels, args.out, channels=channels, features=args.features, radius=args.radius,
        texture_levels=args.texture_levels,
        level=args.level, timepoint=args.timepoint, workers=args.workers, region_pixels=args.region_pixels,
        halo=args.halo, image_name=args.image_name, overwrite=args.overwrite,
        progress=False if args.quiet else None, log=log, scheduler=args.scheduler or args.cluster,
    )
    if args.quiet:
        pass
    elif len(results) == 1:
        r = results[0]
        print(f"{r.image}/labels/{r.label_image}: already in {r.store} with the same settings, kept (--overwrite "
              "to measure again)" if r.skipped else
              f"measured {r.n_objects} objects of {r.image}/labels/{r.label_image} ({r.n_regions} regions) "
              f"in {r.elapsed_s:.2f} s -> {r.store}")
    else:
        done = sum(not r.skipped for r in results)
        print(f"{sum(r.n_objects for r in results)} objects in {len(results)} tables ({done} measured now, "
              f"{len(results) - done} already there) -> {args.out}")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from .measure import features as registry

    chosen = registry.select(args.features)
    head = ("feature", "columns", "group", "dims", "unit", "scikit-image")
    rows = [(f.short, f.name, f.group, "/".join(f"{d}D" for d in f.dims), f.unit or "-", f.skimage or "-")
            for f in chosen]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"\n{len(rows)} features; default groups: {', '.join(registry.DEFAULT_GROUPS)}. "
          "Descriptions: cellar info STORE --columns, or schemas/objects.json.")
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from .query.store import Tables  # DuckDB's views only: the query API would load polars too

    fmt = args.format
    if fmt is None:
        suffix = Path(args.output).suffix.lower().lstrip(".") if args.output else ""
        fmt = suffix if suffix in ("csv", "json", "parquet") else "table"
    if fmt == "parquet" and not args.output:
        raise UsageError("--format parquet needs --output FILE (Parquet is binary)")
    objs = Tables([Path(s) for s in args.stores], engine="duckdb")
    rel = objs.sql(args.query)
    if not isinstance(rel, duckdb.DuckDBPyRelation):
        raise QueryError("the statement returns no rows; cellar sql runs queries (SELECT, WITH, ...)")
    try:
        if args.output:
            output = Path(args.output)
            if fmt == "table":
                raise UsageError("--output needs --format csv, json or parquet")
            if fmt == "csv":
                with atomic_write(output, overwrite=args.overwrite) as tmp:
                    rel.write_csv(str(tmp), header=True)
            elif fmt == "parquet":
                with atomic_write(output, overwrite=args.overwrite) as tmp:
                    rel.write_parquet(str(tmp), compression="zstd")
            else:
                rel.to_view("cellar_result")
                with atomic_write(output, overwrite=args.overwrite) as tmp:
                    quoted = "'" + str(tmp).replace("'", "''") + "'"
                    objs.con.execute(f"COPY cellar_result TO {quoted} (FORMAT json, ARRAY true)")
            print(f"wrote {output}", file=sys.stderr)
        elif fmt == "csv":
            import pyarrow.csv

            pyarrow.csv.write_csv(rel.to_arrow_table(), sys.stdout.buffer)
        elif fmt == "json":
            json.dump(rel.to_arrow_table().to_pylist(), sys.stdout, default=str)
            print()
        else:
            width = shutil.get_terminal_size((160, 24)).columns
            rel.show(max_width=width, max_rows=args.max_rows)
    except duckdb.Error as exc:
        raise objs.error(exc) from None
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import query

    objs = query.open(args.store)
    if args.files:
        print("\n".join(objs.data_files()))
        return 0
    snap = objs.snapshots[0]
    print(f"{args.store}: {objs.n_tables} tables, {len(objs):,} objects (store version {snap.version})")
    for _, table in objs.tables:
        src = table.get("source", {})
        channels = ", ".join(c["name"] for c in table.get("channels", [])) or "none"
        spacing = table.get("spacing_um")
        size = " x ".join(f"{s:g}" for s in spacing) + " um" if spacing else "uncalibrated"
        print(f"image={table['image']} label_image={table['label_image']}: {table['n_objects']} objects, "
              f"{len(table.get('columns', []))} columns")
        print(f"  source  {src.get('url')} (NGFF {src.get('ngff_version')}, level {table.get('level')}, "
              f"{src.get('label_path')})")
        print(f"  pixels  {' x '.join(map(str, table.get('shape', [])))} ({', '.join(table.get('axes', []))}), {size}")
        print(f"  channels {channels}")
        print(f"  written {table.get('created')} by cellar {table.get('cellar_version')} "
              f"in {table.get('elapsed_s')} s")
    if objs.n_tables:
        from .query import hotcache

        cache = hotcache.status(objs.stores[0])
        state = (f"{cache['bytes'] / 2**20:,.1f} MiB{', with the row-major copy' if cache['row_major'] else ''} "
                 f"(the Parquet files: {cache['parquet_bytes'] / 2**20:,.1f} MiB)" if cache["fresh"]
                 else "none (`cellar cache` writes one for interactive use)")
        print(f"session cache: {state}")
    if args.columns:
        objs.sql("SELECT DISTINCT name, dtype, unit, description FROM columns").show(max_rows=10_000, max_width=200)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    from .viewer.server import serve

    if not args.sql_timeout > 0:
        raise UsageError(f"--sql-timeout {args.sql_timeout:g}: expected a positive number of seconds")
    serve(args.image, args.store, labels=args.labels, image_name=args.image_name, host=args.host, port=args.port,
          open_browser=not args.no_browser, timeout_s=args.sql_timeout)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a demo OME-Zarr image, measure it and run example queries")
    p.add_argument("--dir", default="cellar-demo", help="where the demo image and store go (default: ./cellar-demo)")
    p.add_argument("--workers", type=positive_int, default=None, help="worker processes (default: one per core)")
    p.set_defaults(func=_cmd_demo)


def _add_measure(sub) -> None:
    p = sub.add_parser("measure", help="measure every object of a label image into a store", add_help=False)
    measure_help = p.add_argument("-h", "--help", action=_HelpFromRegistry, help="show this help message and exit")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="OME-Zarr images or HCS plates: local paths or URLs (file://, http(s)://, s3://)")
    p.add_argument("--labels", required=True, help="label image name under the image's labels/ group")
    p.add_argument("--out", required=True, help="store directory (created, or added to if it is a store)")
    p.add_argument("--channels", help="comma-separated channel names or indices to measure (default: all)")
    measure_help.features = p.add_argument("--features", help="feature groups, feature names, or 'all' (see `cellar "
                                           "features`)")  # this text until --help lists the groups
    p.add_argument("--radius", type=float, default=None,
                   help="radius of neighbors_within_radius (default: 20 um, or 50 px without units)")
    p.add_argument("--level", type=positive_int, default=0, help="resolution level (default: 0, the full resolution)")
    p.add_argument("--timepoint", type=_timepoint, default=0,
                   help="time point for images with a t axis, or 'all': every time point as a table of its own")
    p.add_argument("--workers", type=positive_int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the tasks on a running dask.distributed cluster (tcp://host:port); needs cellar[dask]")
    p.add_argument("--cluster", choices=("local",),
                   help="start a dask LocalCluster of --workers processes for the run; needs cellar[dask]")
    p.add_argument("--region-pixels", type=positive_int, default=None,
                   help="pixels per region read by a worker (default: ~4M; 0 = one chunk per region)")
    p.add_argument("--texture-levels", type=positive_int, default=16,
                   help="grey levels of the texture group's co-occurrence matrices (default: 16)")
    p.add_argument("--halo", type=positive_int, default=None,
                   help="pixels read around each region (default: 64); larger objects get a read of their own")
    p.add_argument("--image-name", help="name of the image in the store (default: from the metadata or path)")
    p.add_argument("--overwrite", action="store_true", help="replace this image's table if the store has it")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=_cmd_measure)


def _add_features(sub) -> None:
    p = sub.add_parser("features", help="list the features cellar measures (the registry)")
    p.add_argument("--features", help="only these groups or names, as for measure --features")
    p.set_defaults(func=_cmd_features)


def _add_sql(sub) -> None:
    p = sub.add_parser("sql", help="run SQL over one or more stores (views: objects, channels, columns, annotations)")
    p.add_argument("stores", nargs="+", metavar="STORE", help="store directories")
    p.add_argument("query", help='SQL, e.g. "SELECT label_id, area FROM objects WHERE area > 80"')
    p.add_argument("--format", choices=OUTPUT_FORMATS, help="table (default on screen), csv, json or parquet")
    p.add_argument("--output", help="write the result to this file (format from --format or the extension)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--max-rows", type=positive_int, default=40, help="rows shown in table format (default: 40)")
    p.set_defaults(func=_cmd_sql)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a store: tables, provenance and (with --columns) the columns")
    p.add_argument("store")
    p.add_argument("--columns", action="store_true", help="list every column with dtype, unit and description")
    p.add_argument("--files", action="store_true", help="print only the paths of the snapshot's Parquet files, one "
                   "a line (for dask, Spark or polars; a glob would also read replaced tables' files)")
    p.set_defaults(func=_cmd_info)


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="a local web viewer: the image with its objects, filtered and coloured by columns")
    p.add_argument("image", help="the OME-Zarr image (path or URL)")
    p.add_argument("--store", required=True)
    p.add_argument("--labels", help="label image name in the store (needed when the store holds several)")
    p.add_argument("--image", "--image-name", dest="image_name",
                   help="image name in the store (needed when the store holds several)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=positive_int, default=0, help="port (default: 0, a free one)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL; do not open a browser")
    p.add_argument("--sql-timeout", type=float, default=5.0, help="time limit of a filter's SQL in seconds (default: 5)")
    p.set_defaults(func=_cmd_view)


# every command's parser, in the order `cellar --help` lists them
PARSERS: dict[str, Callable[[Any], None]] = {
    "demo": _add_demo,
    "measure": _add_measure,
    "features": _add_features,
    "sql": _add_sql,
    "info": _add_info,
    **cli_objects.PARSERS,
    "view": _add_view,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. With `command` (a name of PARSERS), only that command's subparser is built: a
    run needs no other, and building them all costs ~10 ms (argparse looks its messages up with gettext, a
    search of the locale folders each time); `cellar --help` and an unknown command build them all."""
    parser = argparse.ArgumentParser(
        prog="cellar", description="Per-object measurements of OME-Zarr images, stored as Parquet, queried with SQL."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in PARSERS.items():
        if command is None or name == command:
            add(sub)
    return parser


def _started() -> None:
    """Collect garbage again, from now on, leaving out what start-up made. Start-up creates objects that live until
    the process ends: `cellar measure` imports about 150,000 (numba, zarr, pydantic's models). The collector, run
    again and again while they are made, walks them all each time, and once more at exit. So collection is off
    until the command's modules are in (`main`), and these are then frozen: the pattern Python's gc docs give for
    a process that forks, as `measure` does, whose workers' collections then leave the parent's pages alone.
    `cellar measure` of a 64 x 64 image: 0.81 -> 0.61 s. Only for a whole process: a caller of `main` from Python
    keeps its collector as it was."""
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None) -> int:
    """Run one command: `argv`, or this process's own command line (as `cellar ...` does)."""
    own_process = argv is None
    if own_process:
        gc.disable()  # see _started
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in PARSERS else None).parse_args(argv)
    if args.command == "measure":
        from .measure.run import DEFAULT_HALO, DEFAULT_REGION_PIXELS

        args.region_pixels = DEFAULT_REGION_PIXELS if args.region_pixels is None else args.region_pixels
        args.halo = DEFAULT_HALO if args.halo is None else args.halo
    if own_process:
        _started()
    try:
        return args.func(args)
    except CellarError as exc:
        print(f"cellar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cellar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`cellar sql ... | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit, when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
