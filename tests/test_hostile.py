"""Hostile input: damaged chunks, extreme label values, objects as large as the image."""

from __future__ import annotations

import numpy as np
import pytest

from cellar import measure
from cellar.ngff.write import write_image
from helpers import assert_matches_regionprops, feature_columns, intensities, nuclei_like, read_table, run_cli

# the columns of the default features of a 2D image with one channel and 1 um pixels (write_image's default)
DEFAULT_COLUMNS = feature_columns("yx", (1.0, 1.0), ["c0"])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("array", ["labels/nuclei/0", "0"])
def test_an_undecodable_chunk_is_named(tmp_path, version, array):
    labels = nuclei_like((64, 64), 10, seed=1)
    image = write_image(tmp_path / "img.zarr", intensities((64, 64), 1, seed=2), "cyx", chunks=(1, 32, 32),
                        labels={"nuclei": labels}, version=version)
    chunk = sorted(p for p in (image / array).rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr")))[-1]
    chunk.write_bytes(b"not a compressed chunk")
    key = chunk.relative_to(image / array).as_posix()
    for workers in ("1", "2"):
        r = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"),
                    "--workers", workers, "--region-pixels", "0")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{array}/{key}: chunk cannot be decoded" in lines[0], lines
    assert not (tmp_path / "s.cellar").exists()


def test_a_missing_chunk_reads_as_the_fill_value(tmp_path):
    labels = nuclei_like((64, 64), 12, seed=3)
    chans = intensities((64, 64), 1, seed=4)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", chunks=(1, 32, 32), labels={"nuclei": labels})
    (image / "0" / "c" / "0" / "1" / "1").unlink()  # intensities of the bottom-right chunk: fill value 0
    measure.measure(str(image), "nuclei", tmp_path / "s.cellar", workers=1)
    filled = chans.copy()
    filled[0, 32:, 32:] = 0
    assert assert_matches_regionprops(tmp_path / "s.cellar", labels, filled) == DEFAULT_COLUMNS


def test_label_values_up_to_the_largest_uint64(tmp_path):
    """The same objects with label values k and 2^64 - 1 - (k - lowest) give the same rows (scikit-image
    cannot take such labels, so the small-valued image is the one compared with regionprops)."""
    labels = nuclei_like((60, 70), 15, seed=5).astype(np.uint64)
    lowest = labels[labels > 0].min()
    top = np.where(labels > 0, np.uint64(2**64 - 1) - (labels - lowest), 0).astype(np.uint64)
    chans = intensities((60, 70), 1, seed=6)
    for name, lab in (("small", labels), ("top", top)):
        image = write_image(tmp_path / f"{name}.zarr", chans, "cyx", chunks=(1, 30, 35), labels={"nuclei": lab})
        measure.measure(str(image), "nuclei", tmp_path / f"{name}.cellar", workers=2, region_pixels=0)
    _, small = read_table(tmp_path / "small.cellar")
    _, big = read_table(tmp_path / "top.cellar")
    assert int(big.label_id.max()) == 2**64 - 1
    to_small = {int(t): int(lowest + (np.uint64(2**64 - 1) - np.uint64(t))) for t in big.label_id}
    big = big.assign(label_id=[to_small[int(t)] for t in big.label_id],
                     nearest_neighbor_id=[to_small[int(t)] for t in big.nearest_neighbor_id])
    big = big.sort_values("label_id", ignore_index=True)
    for col in small.columns:
        np.testing.assert_array_equal(big[col].to_numpy(), small[col].to_numpy(), err_msg=col)
    assert assert_matches_regionprops(tmp_path / "small.cellar", labels, chans) == DEFAULT_COLUMNS


def test_one_object_spanning_the_whole_image(tmp_path):
    labels = np.ones((200, 260), np.uint8)
    labels[50:60, 100:120] = 0  # a hole
    chans = intensities((200, 260), 1, seed=7)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", chunks=(1, 64, 64), labels={"nuclei": labels})
    measure.measure(str(image), "nuclei", tmp_path / "s.cellar", workers=2, region_pixels=0, halo=4)
    assert assert_matches_regionprops(tmp_path / "s.cellar", labels, chans) == DEFAULT_COLUMNS


def test_many_tiny_objects(tmp_path):
    rng = np.random.default_rng(8)
    labels = np.zeros((128, 128), np.uint32)
    labels[::2, ::2] = (rng.permutation(64 * 64) + 1).reshape(64, 64)  # 4,096 one-pixel objects on a grid
    chans = intensities((128, 128), 1, seed=9)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", chunks=(1, 32, 32), labels={"nuclei": labels})
    measure.measure(str(image), "nuclei", tmp_path / "s.cellar", workers=2, region_pixels=0)
    entry, df = read_table(tmp_path / "s.cellar")
    assert entry["n_objects"] == len(df) == 64 * 64 and (df.area == 1).all()
    # every object has 2-4 neighbours at distance 2: ties, settled towards the smallest label id
    assert (df.nearest_neighbor_distance == 2).all()
    grid = np.pad(labels[::2, ::2].astype(np.int64), 1, constant_values=np.iinfo(np.int64).max)
    near = np.minimum.reduce([grid[:-2, 1:-1], grid[2:, 1:-1], grid[1:-1, :-2], grid[1:-1, 2:]])
    expected = dict(zip(labels[::2, ::2].ravel().tolist(), near.ravel().tolist()))
    assert [int(i) for i in df.nearest_neighbor_id] == [expected[int(i)] for i in df.label_id]
    assert assert_matches_regionprops(tmp_path / "s.cellar", labels, chans) == DEFAULT_COLUMNS


def _six_axes(ms: dict, root) -> None:
    ms["axes"] = [{"name": "w", "type": "space"}, *ms["axes"]]
    for ds in ms["datasets"]:
        ds["coordinateTransformations"][0]["scale"] = [1.0, *ds["coordinateTransformations"][0]["scale"]]
    root.create_array("0", shape=(1, 1, 1, 1, 16, 16), dtype="uint16", overwrite=True)


def _scale(value):
    def mutate(ms: dict, root) -> None:
        ms["datasets"][0]["coordinateTransformations"][0]["scale"][-1] = value
    return mutate


@pytest.mark.parametrize("mutate, fragment", [
    (_six_axes, "Length of axes (6) not valid"),
    (_scale(-0.5), "expected positive finite values"),
    (_scale(0.0), "expected positive finite values"),
    (lambda ms, root: ms["axes"][-1].update(type="wavelength"), "multiscales.0.axes"),
], ids=["6-D", "negative scale", "zero scale", "unknown axis type"])
def test_absurd_metadata_is_one_line_at_the_command_line(tmp_path, mutate, fragment):
    import zarr

    image = write_image(tmp_path / "img.zarr", intensities((1, 16, 16), 1, seed=5)[None], "tczyx",
                        labels={"nuclei": nuclei_like((1, 1, 16, 16), 3, seed=6)})
    root = zarr.open_group(str(image), mode="r+")
    ome = dict(root.attrs["ome"])
    mutate(ome["multiscales"][0], root)
    root.attrs["ome"] = ome
    r = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"), "--workers", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(image) in lines[0] and fragment in lines[0], lines[0]
    assert not (tmp_path / "s.cellar").exists()


def test_an_unknown_length_unit_measures_in_pixels_and_says_so(tmp_path):
    image = write_image(tmp_path / "img.zarr", intensities((16, 16), 1, seed=5), "cyx", unit="furlong",
                        labels={"nuclei": nuclei_like((16, 16), 3, seed=6)})
    r = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "unit 'furlong' is not a length unit" in r.stderr and "measuring in pixels only" in r.stderr
    entry, df = read_table(tmp_path / "s.cellar")
    assert entry["spacing_um"] is None and "area_um2" not in df and "area" in df
