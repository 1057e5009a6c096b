"""`cellar demo`: a real pathology image to OME-Zarr, its nuclei measured into a store, three queries, the
Python query API, and the PathViewer-style outputs (label colours written into the NGFF metadata, an overlay
PNG and a histogram).

The image is scikit-image's bundled immunohistochemistry sample (`skimage.data.immunohistochemistry()`,
colonic glands, FHL2 revealed with DAB, haematoxylin counterstain; acquired at CMMI, no known copyright
restrictions). It is unmixed into haematoxylin, eosin and DAB with `skimage.color.rgb2hed`, each stain
rescaled to uint16 (0.1-99.9 percentile range), and nuclei are segmented classically (haematoxylin-high, DAB-low Otsu mask, distance
transform watershed) into `labels/nuclei`. The source gives no pixel size: the demo writes a nominal
0.5 micrometre so that the physical columns are shown; treat them as illustrative.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .schemas.errors import UsageError

NOMINAL_PIXEL_UM = 0.5
MARKER = ".cellar-demo"
CHANNELS = ["hematoxylin", "eosin", "DAB"]

QUERIES = (
    ("How many nuclei, and how large?",
     "SELECT count(*) AS nuclei, round(avg(area_um2), 1) AS mean_area_um2, "
     "round(quantile_cont(area_um2, 0.5), 1) AS median_area_um2, max(area) AS largest_px FROM objects"),
    ("The five most DAB-stained nuclei larger than 25 um^2",
     "SELECT label_id, round(area_um2, 1) AS area_um2, round(centroid_x_um, 1) AS x_um, "
     "round(centroid_y_um, 1) AS y_um, round(intensity_mean__DAB) AS dab_mean FROM objects "
     "WHERE area_um2 > 25 ORDER BY intensity_mean__DAB DESC LIMIT 5"),
    ("Per-stain intensity over all nuclei (the long-form channels view)",
     "SELECT channel, round(avg(intensity_mean)) AS mean_of_means, round(avg(intensity_std)) AS mean_std, "
     "max(intensity_max) AS max FROM channels GROUP BY channel ORDER BY channel"),
)


DAB_FILTER = "intensity_mean__DAB > 2000 AND area_um2 > 25"


def pathviewer_outputs(paths: "DemoPaths", objs) -> None:
    """The Python API on the demo store, then colours, an overlay and a histogram (files in the demo dir)."""
    from . import ngff
    from .query import pathviewer

    q = objs.where(DAB_FILTER)
    print(f"\n[4] The Python query API\n    objs.where(\"{DAB_FILTER}\").count() -> {q.count()}; "
          f".within(0, 0, 100, 100).label_ids() -> {q.within(0, 0, 100, 100).label_ids().tolist()}")
    d = objs.describe("area_um2")
    print(f"    objs.describe(\"area_um2\") -> {d['unit']}, min {d['min']:.1f}, median {d['quantiles'][0.5]:.1f}, "
          f"max {d['max']:.1f}")
    table, entry = pathviewer.table_query(objs, None, None)
    coloring = pathviewer.coloring(table, "intensity_mean__DAB", where=DAB_FILTER, others="grey")
    image = ngff.open_image(str(paths.image))
    pathviewer.write_colors(coloring, image, "nuclei")
    caption = f"ihc / labels/nuclei, coloured by intensity_mean__DAB; filter: {DAB_FILTER}"
    overlay, hist = paths.root / "overlay.png", paths.root / "hist_area.png"
    pathviewer.render(image, "nuclei", coloring, overlay, caption=caption)
    pathviewer.histogram(objs, "area_um2", hist, where=DAB_FILTER, caption=f"area_um2; filter: {DAB_FILTER}")
    print(f"\n[5] PathViewer-style outputs for \"{DAB_FILTER}\" ({int(coloring.matched.sum())} nuclei)\n"
          f"    per-label colours (others grey) written into {paths.image}/labels/nuclei image-label metadata\n"
          f"    overlay: {overlay}\n    histogram: {hist}")


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    image: Path
    store: Path


def segment_nuclei(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stains as a (3, Y, X) uint16 array, nuclei label image) of an H-DAB RGB image."""
    from scipy import ndimage as ndi
    from skimage import color, exposure, feature, filters, morphology, segmentation
    from skimage.measure import label

    hed = color.rgb2hed(rgb)

    def to_uint16(stain: np.ndarray) -> np.ndarray:
        # The 0.1-99.9 percentile range to 0-65535, so a few outlier pixels do not squash the rest; the full
        # range where that is empty (this H-DAB slide has almost no eosin: 99.9% of its pixels are 0).
        lo, hi = np.percentile(stain, (0.1, 99.9))
        if hi <= lo:
            lo, hi = stain.min(), stain.max()
        return exposure.rescale_intensity(stain, in_range=(lo, hi), out_range=(0, 65535)).astype(np.uint16)

    stains = np.stack([to_uint16(hed[..., i]) for i in range(3)])
    h = filters.gaussian(hed[..., 0], sigma=1.5)
    d = filters.gaussian(hed[..., 2], sigma=1.5)
    mask = (h > filters.threshold_otsu(h)) & (d < filters.threshold_otsu(d))
    mask = ndi.binary_opening(mask, morphology.disk(2))
    mask = morphology.remove_small_objects(ndi.binary_fill_holes(mask), max_size=40)
    dist = ndi.distance_transform_edt(mask)
    peaks = feature.peak_local_max(filters.gaussian(dist, 1), min_distance=7, labels=label(mask),
                                   exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=mask).astype(np.uint32)
    return stains, labels


def build(root: Path) -> DemoPaths:
    """Create (or re-create) the demo image under `root`, refusing a directory the demo did not make."""
    from skimage import data

    from .ngff.write import write_image

    if root.exists() and any(root.iterdir()) and not (root / MARKER).exists():
        raise UsageError(f"{root}: exists and was not made by `cellar demo`; choose another --dir")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by `cellar demo`; safe to delete\n")
    paths = DemoPaths(root, root / "ihc.ome.zarr", root / "ihc.cellar")
    stains, labels = segment_nuclei(data.immunohistochemistry())
    write_image(paths.image, stains, "cyx", chunks=(1, 128, 128), labels={"nuclei": labels},
                scale={"y": NOMINAL_PIXEL_UM, "x": NOMINAL_PIXEL_UM}, channel_names=CHANNELS, n_levels=3,
                version="0.5", name="ihc", overwrite=True)
    if paths.store.exists():
        shutil.rmtree(paths.store)
    return paths


def run(root: Path, workers: int | None = None) -> int:
    from . import measure, query

    print(f"Building the demo image from scikit-image's immunohistochemistry sample in {root}/ ...")
    paths = build(root)
    print(f"  wrote {paths.image} (OME-NGFF 0.5: 3 stains {', '.join(CHANNELS)}, labels/nuclei, 3 levels; "
          f"nominal pixel size {NOMINAL_PIXEL_UM} um)")
    result = measure.measure(str(paths.image), "nuclei", paths.store, workers=workers, region_pixels=0)
    print(f"  measured {result.n_objects} nuclei over {result.n_regions} chunks in {result.elapsed_s:.2f} s "
          f"-> {paths.store}\n  ({len(query.open(paths.store).sql('SELECT * FROM columns').fetchall())} columns; "
          "the first run on a machine includes compiling cellar's kernels, later runs reuse them)")
    objs = query.open(paths.store)
    for i, (title, sql) in enumerate(QUERIES, 1):
        print(f"\n[{i}] {title}\n    {sql}")
        objs.sql(sql).show(max_width=120)
    pathviewer_outputs(paths, objs)
    print(f"\nThe store is {paths.store}. Try:\n"
          f"  cellar view {paths.image} --store {paths.store}      # the web viewer\n"
          f"  cellar filter {paths.store} --where \"{DAB_FILTER}\"\n"
          f"  cellar render {paths.image} --store {paths.store} --by area_um2 --where \"{DAB_FILTER}\" "
          f"--region 0:256,0:256 --out zoom.png\n"
          f"  cellar sql {paths.store} \"SELECT * FROM columns\"\n"
          f"  cellar sql {paths.store} \"SELECT label_id, area_um2 FROM objects WHERE area_um2 > 60\" "
          f"--format csv --output big.csv\n"
          f"  python -c \"import query; print(query.open('{paths.store}').sql('SELECT * FROM objects').pl())\"")
    return 0
