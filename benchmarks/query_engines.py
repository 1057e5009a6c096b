"""The six queries of `bench_query.py --measured`, written for each engine as its users would write them, run in a
fresh process (`python benchmarks/query_engines.py ENGINE QUERY PARAMS_JSON`): the engine's imports are timed
apart from the query, which is timed from before opening the data to the result in memory. Prints one line of
JSON: {"imports": s, "query": s, "rows": n, "digest": ...} (the digest compares the engines' results).

Queries (parameters from `bench_query.measured_params`):
- "filter -> ids": two range conditions -> (image, label_id) of about 1% of all rows;
- "box -> ids": one image, its centroids in a box of 1% of the slide -> label ids;
- "group-by, 10 averages": group by image, ten averages;
- "filter -> all columns": two conditions -> every column of about 0.1% of the rows;
- "top-100": the 100 objects with the largest value of one column, every column;
- "annotation join": the latest annotation version's class and a measurement -> (image, label_id).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np

QUERIES = ("filter -> ids", "box -> ids", "group-by, 10 averages", "filter -> all columns", "top-100",
           "annotation join")


def _filter(p: dict, area: float) -> str:
    return f"area > {area} AND {p['mean']} > {p['mean_hi']}"


def cellar_query(name: str, p: dict):
    from cellar import query

    objs = query.open(p["store"])
    x0, y0, x1, y1 = p["box"]
    if name == "filter -> ids":
        return objs.where(_filter(p, p["area_hi"])).select("image", "label_id").to_arrow()
    if name == "box -> ids":
        return objs.where(f"image = '{p['image']}'").within(x0, y0, x1, y1, units="px").label_ids()
    if name == "group-by, 10 averages":
        return objs.group_by("image").agg(mean=p["averages"])
    if name == "filter -> all columns":
        return objs.where(_filter(p, p["area_top"])).to_arrow()
    if name == "top-100":
        return objs.order_by(p["top"], descending=True).limit(100).to_arrow()
    return objs.where(f"cell_type = 'T' AND area > {p['area_mid']}").select("image", "label_id").to_arrow()


def polars_query(name: str, p: dict):
    import polars as pl

    col = pl.col
    lf = pl.scan_parquet(p["objects_glob"], hive_partitioning=True)
    x0, y0, x1, y1 = p["box"]
    if name == "filter -> ids":
        return lf.filter((col("area") > p["area_hi"]) & (col(p["mean"]) > p["mean_hi"])).select("image", "label_id").collect()
    if name == "box -> ids":
        return (lf.filter((col("image") == p["image"]) & col("centroid_x").is_between(x0, x1)
                          & col("centroid_y").is_between(y0, y1)).select("label_id").collect())
    if name == "group-by, 10 averages":
        return lf.group_by("image").agg([col(c).mean() for c in p["averages"]]).sort("image").collect()
    if name == "filter -> all columns":
        return lf.filter((col("area") > p["area_top"]) & (col(p["mean"]) > p["mean_hi"])).collect()
    if name == "top-100":
        return lf.top_k(100, by=p["top"]).collect()
    notes = pl.scan_parquet(p["annotations_glob"], hive_partitioning=True)
    return (lf.filter(col("area") > p["area_mid"]).select("image", "label_image", "label_id")
            .join(notes.filter(col("cell_type") == "T").select("image", "label_image", "label_id"),
                  on=["image", "label_image", "label_id"]).select("image", "label_id").collect())


def duckdb_query(name: str, p: dict):
    import duckdb

    src = f"read_parquet('{p['objects_glob']}', hive_partitioning = true)"
    x0, y0, x1, y1 = p["box"]
    if name == "filter -> ids":
        sql = f"SELECT image, label_id FROM {src} WHERE {_filter(p, p['area_hi'])}"
    elif name == "box -> ids":
        sql = (f"SELECT label_id FROM {src} WHERE image = '{p['image']}' AND centroid_x BETWEEN {x0} AND {x1} "
               f"AND centroid_y BETWEEN {y0} AND {y1}")
    elif name == "group-by, 10 averages":
        avgs = ", ".join(f'avg("{c}") AS "{c}"' for c in p["averages"])
        sql = f"SELECT image, {avgs} FROM {src} GROUP BY image ORDER BY image"
    elif name == "filter -> all columns":
        sql = f"SELECT * FROM {src} WHERE {_filter(p, p['area_top'])}"
    elif name == "top-100":
        sql = f"SELECT * FROM {src} ORDER BY \"{p['top']}\" DESC LIMIT 100"
    else:
        notes = f"read_parquet('{p['annotations_glob']}', hive_partitioning = true)"
        sql = (f"SELECT o.image, o.label_id FROM {src} o JOIN {notes} a USING (image, label_image, label_id) "
               f"WHERE a.cell_type = 'T' AND o.area > {p['area_mid']}")
    return duckdb.sql(sql).to_arrow_table()


def pytables_query(name: str, p: dict):
    """OMERO.tables' HDF5 files (one per image, as `cellar export --to omero-h5` writes them and as OMERO keeps
    one table per image), read with PyTables as OMERO.tables' server does: `get_where_list` + `read_coordinates`
    for conditions, the table in blocks where it has no query call."""
    import tables

    out = []
    x0, y0, x1, y1 = p["box"]
    files = p["h5"] if name != "box -> ids" else {p["image"]: p["h5"][p["image"]]}
    for image, path in files.items():
        with tables.open_file(path, "r") as fh:
            t = fh.root.OME.Measurements
            if name == "filter -> ids":
                rows = t.get_where_list(f"(area > {p['area_hi']}) & ({p['mean']} > {p['mean_hi']})")
                out.append(t.read_coordinates(rows, field="label_id"))
            elif name == "box -> ids":
                rows = t.get_where_list(f"(centroid_x >= {x0}) & (centroid_x <= {x1}) & (centroid_y >= {y0}) & "
                                        f"(centroid_y <= {y1})")
                out.append(t.read_coordinates(rows, field="label_id"))
            elif name == "group-by, 10 averages":
                out.append([t.col(c).mean() for c in p["averages"]])
            elif name == "filter -> all columns":
                out.append(t.read_coordinates(t.get_where_list(f"(area > {p['area_top']}) & ({p['mean']} > {p['mean_hi']})")))
            elif name == "top-100":
                values = t.col(p["top"])
                best = np.argpartition(-values, 100)[:100] if len(values) > 100 else np.arange(len(values))
                out.append(t.read_coordinates(np.sort(best)))
            else:
                ids = t.read_coordinates(t.get_where_list(f"area > {p['area_mid']}"), field="label_id")
                with tables.open_file(p["h5_notes"][image], "r") as nh:
                    n = nh.root.OME.Measurements
                    typed = n.read_coordinates(n.get_where_list("cell_type == b'T'"), field="label_id")
                out.append(np.intersect1d(ids, typed))
    if name == "top-100":
        rows = np.concatenate(out)
        return rows[np.argsort(-rows[p["top"]], kind="stable")[:100]]
    return out


# The imports an engine's answer needs: cellar's and DuckDB's answers are Arrow tables, so pyarrow is loaded with
# them (both load it on first use; polars answers in its own frames)
ENGINES = {"cellar": (cellar_query, "from cellar.query import api; import pyarrow"), "polars": (polars_query, "import polars"),
           "duckdb": (duckdb_query, "import duckdb, pyarrow"), "pytables": (pytables_query, "import tables")}


def _count(result) -> int:
    if isinstance(result, list):
        return sum(len(r) for r in result) if not (result and isinstance(result[0], list)) else len(result)
    return len(result) if not hasattr(result, "num_rows") else result.num_rows


def main() -> None:
    engine, name, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    run, imports = ENGINES[engine]
    t0 = time.perf_counter()
    exec(imports)
    t1 = time.perf_counter()
    result = run(name, params)
    t2 = time.perf_counter()
    digest = hashlib.sha1(repr(_count(result)).encode()).hexdigest()[:8]
    print(json.dumps({"imports": t1 - t0, "query": t2 - t1, "rows": _count(result), "digest": digest}))


if __name__ == "__main__":
    main()
