"""The `cellar` subcommands that act on the objects of a store: `filter`, `color`, `render`, `hist` (the
PathViewer-style outputs of `query.pathviewer`), `annotate` (`query.annotate`), `export` (`query.export`) and
`cache` (`query.hotcache`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .query.formats import FORMATS, MAX_CELLS, MAX_STRING
from .schemas.atomic import atomic_write
from .schemas.errors import UsageError

ID_FORMATS = ("text", "json", "parquet")


def positive_int(text: str) -> int:
    """argparse's type of a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="image name in the store (needed when the store holds several)")
    p.add_argument("--labels", help="label image name in the store (needed when the store holds several)")


def _caption(entry: dict, by: str | None, where: str | None, matched: int | None = None, total: int | None = None) -> str:
    text = f"{entry['image']} / labels/{entry['label_image']}"
    if by:
        text += f", coloured by {by}"
    if where:
        text += f"; filter: {where}"
    if matched is not None:
        text += f" ({matched:,} of {total:,} objects)"
    return text


def cmd_filter(args: argparse.Namespace) -> int:
    from . import query
    from .query import pathviewer

    objs = query.open(args.store)
    q, entry = pathviewer.table_query(objs, args.image, args.labels)
    ids = q.where(args.where).label_id_series()  # polars: numpy stays unloaded (see label_id_series)
    if args.mask:
        from .ngff import labels as ngff_labels  # loads zarr: only masks need it

        image = pathviewer.source_image(entry, args.source)
        target = ngff_labels.write_mask(image, entry["label_image"], args.mask, ids.to_numpy(), overwrite=args.overwrite)
        print(f"wrote {target} with {len(ids):,} of {entry['n_objects']:,} objects ({args.where})", file=sys.stderr)
        return 0
    fmt = args.format or (Path(args.output).suffix.lstrip(".").lower() if args.output else "text")
    if fmt not in ID_FORMATS:
        fmt = "text"
    if fmt == "parquet" and not args.output:
        raise UsageError("--format parquet needs --output FILE (Parquet is binary)")
    if fmt == "json":
        text = json.dumps({"image": entry["image"], "label_image": entry["label_image"], "where": args.where,
                           "label_ids": ids.to_list()}) + "\n"
    else:
        text = "".join(f"{i}\n" for i in ids.to_list())
    if args.output:
        out = Path(args.output)
        if fmt == "parquet":
            with atomic_write(out, overwrite=args.overwrite) as tmp:
                ids.to_frame().write_parquet(tmp)
        else:
            with atomic_write(out, overwrite=args.overwrite) as tmp:
                tmp.write_text(text)
        print(f"wrote {len(ids):,} label ids to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_color(args: argparse.Namespace) -> int:
    from . import query
    from .query import pathviewer

    objs = query.open(args.store)
    q, entry = pathviewer.table_query(objs, args.image, args.labels)
    props = [c.strip() for c in args.properties.split(",") if c.strip()] if args.properties else []
    objs.check_columns(props, "--properties")
    coloring = pathviewer.coloring(q, args.by, where=args.where, cmap=args.cmap,
                                   vrange=tuple(args.range) if args.range else None, others=args.others)
    values = None
    if props:
        from .query.sql import quote

        data = objs.fetch(f"SELECT {', '.join(quote(c) for c in props)} FROM ({q.to_sql()}) ORDER BY label_id",
                          "fetchnumpy")
        values = {c: data[c] for c in props}
    image = pathviewer.source_image(entry, args.source)
    target = pathviewer.write_colors(coloring, image, entry["label_image"], values)
    legend = (f"{coloring.cmap} over {coloring.vrange[0]:g}..{coloring.vrange[1]:g}" if coloring.vrange
              else f"{len(coloring.categories or {})} categories")
    print(f"coloured {len(coloring.ids):,} objects of {target} by {args.by} ({legend}); "
          f"{int(coloring.matched.sum()):,} match{'' if not args.where else ' ' + repr(args.where)}, "
          f"others {'hidden' if args.others == 'hide' else 'grey'}"
          f"{'; properties: ' + ', '.join(props) if props else ''}", file=sys.stderr)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from . import query
    from .query import pathviewer

    objs = query.open(args.store)
    q, entry = pathviewer.table_query(objs, args.image_name, args.labels)
    coloring = pathviewer.coloring(q, args.by, where=args.where, cmap=args.cmap,
                                   vrange=tuple(args.range) if args.range else None, others=args.others)
    image = pathviewer.source_image(entry, args.image)
    caption = _caption(entry, args.by, args.where, int(coloring.matched.sum()), len(coloring.ids))
    with atomic_write(Path(args.out), overwrite=args.overwrite) as tmp:
        info = pathviewer.render(image, entry["label_image"], coloring, tmp, level=args.level, region=args.region,
                                 channel=args.channel, style=args.style, z=args.z, caption=caption)
    print(f"wrote {args.out}: level {info['level']}, {info['shape'][1]} x {info['shape'][0]} px, "
          f"{info['objects_in_view']:,} objects in view; {caption}", file=sys.stderr)
    return 0


def cmd_hist(args: argparse.Namespace) -> int:
    from . import query
    from .query import pathviewer

    objs = query.open(args.store)
    caption = f"{args.column}" + (f"; filter: {args.where}" if args.where else "")
    with atomic_write(Path(args.out), overwrite=args.overwrite) as tmp:
        info = pathviewer.histogram(objs, args.column, tmp, where=args.where, bins=args.bins, log=args.log,
                                    caption=caption)
    matched = f", {info['matched']:,} match" if args.where else ""
    print(f"wrote {args.out}: {info['values']:,} values in {info['bins']} bins{matched}", file=sys.stderr)
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from . import query
    from .query import annotate

    objs = query.open(args.store)
    store, entry = objs.table(args.image, args.labels)
    rows = annotate.read_source(Path(args.source_file), args.key)
    known = annotate.known_ids(store, entry)
    measured = [c["name"] for c in entry.get("columns", [])]
    record = annotate.annotate(store, entry["image"], entry["label_image"], rows, source=str(args.source_file),
                               known_ids=known, measured=measured, drop_unknown=args.drop_unknown)
    dropped = f"; {record['dropped_unknown']} rows with unknown label ids not stored" if record["dropped_unknown"] else ""
    print(f"annotated {record['rows']:,} objects of {entry['image']}/{entry['label_image']} with "
          f"{', '.join(c['name'] for c in record['columns'])} (version {record['version']}){dropped}", file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .query import cachebuild, hotcache
    from .schemas import log
    from .schemas import store as layout

    for store in map(Path, args.stores):
        if args.drop:
            log.read_marker(store)  # a wrong path fails here, before anything is removed
            n = layout.remove_stale_caches(store, None)
            print(f"{store}: {n} cache file{'s' * (n != 1)} removed", file=sys.stderr)
            continue
        # reads the log (a wrong path fails here, before anything is written) and checks the store's files,
        # the cache's too unless it is to be written anew
        info = hotcache.status(store, check=not args.rebuild)
        if args.status or (info["fresh"] and not args.rebuild and (info["row_major"] or not args.rows)):
            rows = " with its row-major copy" if info["row_major"] else ""
            state = (f"fresh{rows}, {info['bytes'] / 2**20:,.1f} MiB (the Parquet files: {info['parquet_bytes'] / 2**20:,.1f} MiB)"
                     if info["fresh"] else "none" + (f" ({info['stale_files']} stale)" if info["stale_files"] else ""))
            print(f"{store}: session cache {state}", file=sys.stderr)
            continue
        info = cachebuild.build(store, rows=args.rows, progress=sys.stderr.isatty())
        kind = " with its row-major copy" if info["row_major"] else ""
        print(f"{store}: session cache{kind} of {info['rows']:,} objects written in {info['seconds']:.1f} s "
              f"({info['bytes'] / 2**20:,.1f} MiB): {info['path']}", file=sys.stderr)
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .schemas import log

    n = log.upgrade(Path(args.store))
    print(f"{args.store}: converted to store format {log.FORMAT_VERSION} (a commit log) with {n} tables", file=sys.stderr)
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from .measure import store_write

    if not args.retain_hours >= 0:
        raise UsageError(f"--retain-hours {args.retain_hours:g}: expected a number of hours >= 0")
    done = store_write.vacuum(Path(args.store), args.retain_hours * 3600)
    print(f"{args.store}: {done['files']} files no commit lists removed ({done['bytes'] / 2**20:,.1f} MiB); "
          f"the store is at version {done['version']}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import query
    from .query import export, formats, pathviewer

    if args.to[0] not in formats.FORMATS:
        raise UsageError(f"--to {args.to[0]}: unknown format (expected one of {', '.join(formats.FORMATS)})")
    if len(args.to) > 2:
        raise UsageError(f"--to {' '.join(args.to)}: expected FORMAT [OUTPUT]")
    args.to, args.output = args.to[0], (args.to[1] if len(args.to) == 2 else None)
    objs = query.open(args.store)
    if args.to == "ngff-properties" or args.image or args.labels:
        q, _ = pathviewer.table_query(objs, args.image, args.labels)
    else:
        q = objs.query()
    if args.where:
        q = q.where(args.where)
    if args.columns:
        q = q.select(*[c.strip() for c in args.columns.split(",") if c.strip()])
    if args.to != "ngff-properties" and not args.output:
        raise UsageError(f"--to {args.to} needs an OUTPUT file")
    summary = export.export(q, args.to, args.output or "", overwrite=args.overwrite, image_id=args.image_id,
                            roi_column=args.roi_column, max_string=args.max_string, max_cells=args.max_cells,
                            image_url=args.source)
    for old, new in summary["renamed"].items():
        print(f"renamed column {old} -> {new} (OMERO needs identifiers; the description keeps the name)",
              file=sys.stderr)
    where = summary.get("target", args.output)
    print(f"exported {summary['rows']:,} rows x {summary['columns']} columns as {args.to} to {where}", file=sys.stderr)
    return 0


def _colour_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", required=True, help="column to colour by (numeric: colormap; other: categories)")
    p.add_argument("--where", help="SQL condition: objects not matching it are hidden or grey")
    p.add_argument("--cmap", default="viridis", help="matplotlib colormap (default: viridis)")
    p.add_argument("--range", nargs=2, type=float, metavar=("LO", "HI"),
                   help="values mapped to the colormap's ends (default: the matching objects' min and max)")
    p.add_argument("--others", choices=("hide", "grey"), default="hide",
                   help="objects not matching --where: hidden (alpha 0, default) or grey")


def _add_filter(sub) -> None:
    p = sub.add_parser("filter", help="label ids of the objects matching a filter, or a label image of only them")
    p.add_argument("store")
    p.add_argument("--where", required=True, help='SQL condition, e.g. "area_um2 > 80 AND intensity_mean__CD8 > 300"')
    _table_args(p)
    p.add_argument("--format", choices=ID_FORMATS, help="text (one id per line; default), json or parquet")
    p.add_argument("--output", help="write the ids to this file")
    p.add_argument("--mask", metavar="NAME", help="instead, write labels/NAME into the source image: the label "
                   "image with only the matching objects")
    p.add_argument("--source", help="the image (path or URL) if it moved since it was measured")
    p.add_argument("--overwrite", action="store_true", help="replace --output or an existing --mask label image")
    p.set_defaults(func=cmd_filter)


def _add_color(sub) -> None:
    p = sub.add_parser("color", help="write per-label colours (and properties) into the NGFF label image metadata")
    p.add_argument("store")
    _colour_args(p)
    _table_args(p)
    p.add_argument("--properties", help="comma-separated columns to write as image-label properties too")
    p.add_argument("--source", help="the image (path or URL) if it moved since it was measured")
    p.set_defaults(func=cmd_color)


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="draw the image with its objects coloured by a column (PNG)")
    p.add_argument("image", help="the OME-Zarr image")
    p.add_argument("--store", required=True)
    _colour_args(p)
    p.add_argument("--labels", help="label image name in the store (needed when the store holds several)")
    p.add_argument("--image-name", help="image name in the store (needed when the store holds several)")
    p.add_argument("--level", type=positive_int, help="pyramid level (default: the sharpest with at most 2048 px a side)")
    p.add_argument("--region", help="y0:y1,x0:x1 in full-resolution pixels (default: the whole image)")
    p.add_argument("--channel", help="channel drawn in grey (name or index; default: the first)")
    p.add_argument("--z", type=positive_int, help="plane of a 3D image (default: the middle one)")
    p.add_argument("--style", choices=("outline", "fill"), default="outline")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_render)


def _add_hist(sub) -> None:
    p = sub.add_parser("hist", help="histogram of a column, the filtered subset highlighted (PNG)")
    p.add_argument("store")
    p.add_argument("column")
    p.add_argument("--where", help="SQL condition: the matching objects are drawn on top")
    p.add_argument("--bins", type=positive_int, default=50)
    p.add_argument("--log", action="store_true", help="logarithmic count axis")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_hist)


def _add_annotate(sub) -> None:
    p = sub.add_parser("annotate", help="add user columns (class, score, ...) joined by label id, as a new version")
    p.add_argument("store")
    p.add_argument("--from", dest="source_file", required=True, metavar="FILE", help="CSV or Parquet file")
    p.add_argument("--key", default="label_id", help="its column holding label ids (default: label_id)")
    _table_args(p)
    p.add_argument("--drop-unknown", action="store_true",
                   help="store the rows whose label ids exist and report the others (default: refuse)")
    p.set_defaults(func=cmd_annotate)


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="write (or drop) a store's session cache: a memory-mapped copy that queries "
                                     "and the viewer answer from at once")
    p.add_argument("stores", nargs="+", metavar="store", help="cellar store directory (several may be given)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="report whether a fresh cache exists and its size")
    what.add_argument("--rebuild", action="store_true", help="write it again even if it is fresh")
    what.add_argument("--drop", action="store_true", help="remove the cache files (the store's data stay)")
    p.add_argument("--rows", action="store_true",
                   help="also write a row-major copy of the numeric columns: whole rows of scattered objects (a "
                        "filter's matches, a top-k) come from it at once (as much disk again)")
    p.set_defaults(func=cmd_cache)


def _add_vacuum(sub) -> None:
    p = sub.add_parser("vacuum", help="remove the files of replaced tables and crashed writes (older than --retain-hours)")
    p.add_argument("store")
    p.add_argument("--retain-hours", type=float, default=1.0,
                   help="keep files younger than this, which readers of an earlier state or writers at work may "
                        "still use (default: 1)")
    p.set_defaults(func=cmd_vacuum)


def _add_upgrade(sub) -> None:
    p = sub.add_parser("upgrade", help="convert a store of cellar's format 1 (manifest.json) to the commit log")
    p.add_argument("store")
    p.set_defaults(func=cmd_upgrade)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write objects as OMERO.tables HDF5, AnnData, CSV, Parquet or NGFF properties")
    p.add_argument("store")
    p.add_argument("--to", required=True, nargs="+", metavar="FORMAT [OUTPUT]",
                   help=f"format ({', '.join(FORMATS)}) and output file (none for ngff-properties, which writes "
                        "into the source image's label metadata)")
    p.add_argument("--where", help="SQL condition: export only the matching objects")
    p.add_argument("--columns", help="comma-separated columns (default: all)")
    _table_args(p)
    p.add_argument("--image-id", type=positive_int, help="omero-h5: add an Image column holding this OMERO image id")
    p.add_argument("--roi-column", help="omero-h5: the column of OMERO ROI ids, written as a Roi column")
    p.add_argument("--max-string", type=positive_int, default=MAX_STRING,
                   help=f"omero-h5: longest text value in bytes (default {MAX_STRING})")
    p.add_argument("--max-cells", type=positive_int, default=MAX_CELLS,
                   help=f"ngff-properties: at most this many objects x columns (default {MAX_CELLS:,})")
    p.add_argument("--source", help="ngff-properties: the image (path or URL) if it moved since it was measured")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_export)


# the object commands' parsers (`cellar.cli.PARSERS` lists them among the others)
PARSERS: dict[str, Callable[[Any], None]] = {
    "filter": _add_filter,
    "color": _add_color,
    "render": _add_render,
    "hist": _add_hist,
    "annotate": _add_annotate,
    "cache": _add_cache,
    "vacuum": _add_vacuum,
    "upgrade": _add_upgrade,
    "export": _add_export,
}
