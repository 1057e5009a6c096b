"""Reading OME-NGFF 0.4 and 0.5 metadata: axes, levels, physical pixel sizes, channels, labels."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cellar.ngff import open_image
from cellar.ngff.write import write_image
from cellar.schemas.errors import InvalidImageError


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_axes_levels_pixel_sizes_channels_and_labels(tmp_path, version):
    data = np.zeros((2, 5, 64, 48), np.uint16)
    lab = np.zeros((5, 64, 48), np.uint32)
    path = write_image(tmp_path / "a.ome.zarr", data, "czyx", chunks=(1, 5, 32, 32), scale={"z": 2.0, "y": 0.5, "x": 0.25},
                       translation={"z": 1.0, "y": 10.0, "x": 20.0}, channel_names=["DAPI", "GFP"],
                       labels={"nuclei": lab, "cells": lab}, n_levels=3, version=version)
    img = open_image(str(path))
    assert img.version == version and img.zarr_format == (3 if version == "0.5" else 2)
    assert img.name == "a"
    assert [a.name for a in img.multiscale.axes] == ["c", "z", "y", "x"]
    assert img.multiscale.spatial_names == ("z", "y", "x")
    assert len(img.multiscale.levels) == 3
    assert img.multiscale.spatial_shape(2) == (5, 16, 12)
    assert img.multiscale.spacing_um(0) == (2.0, 0.5, 0.25)
    assert img.multiscale.spacing_um(1) == (2.0, 1.0, 0.5)
    assert img.multiscale.origin_um(0) == (1.0, 10.0, 20.0)
    assert img.channel_names == ("DAPI", "GFP")
    assert img.label_names == ("nuclei", "cells")
    label = img.label("cells")
    assert label.multiscale.levels[1].path == "labels/cells/1"
    assert label.image_label["source"] == {"image": "../../"}


def test_units_are_converted_to_micrometres_and_multiscale_transforms_compose(tmp_path):
    path = write_image(tmp_path / "b.zarr", np.zeros((8, 8), np.uint8), "yx", scale={"y": 250.0, "x": 500.0},
                       unit="nanometer", version="0.4")
    root = zarr.open_group(str(path), mode="r+")
    ms = root.attrs["multiscales"]
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [2.0, 2.0]}]
    root.attrs["multiscales"] = ms
    img = open_image(str(path))
    assert img.multiscale.spacing_um(0) == pytest.approx((0.5, 1.0))
    assert img.channel_names == ("c0",)
    assert img.label_names is None


def test_missing_units_mean_uncalibrated(tmp_path):
    path = write_image(tmp_path / "c.zarr", np.zeros((8, 8), np.uint8), "yx", unit=None)
    assert open_image(str(path)).multiscale.spacing_um(0) is None


def test_channel_names_fall_back_to_c_index_when_omero_is_short(tmp_path):
    path = write_image(tmp_path / "d.zarr", np.zeros((3, 8, 8), np.uint8), "cyx", channel_names=["A", "B", "C"])
    root = zarr.open_group(str(path), mode="r+")
    ome = dict(root.attrs["ome"])
    ome["omero"] = {"channels": [{"label": "A"}]}
    root.attrs["ome"] = ome
    assert open_image(str(path)).channel_names == ("A", "c1", "c2")


def test_file_url_opens_like_a_path(tmp_path):
    path = write_image(tmp_path / "e.zarr", np.zeros((8, 8), np.uint8), "yx")
    assert open_image(f"file://{path}").multiscale.spatial_shape(0) == (8, 8)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a["multiscales"][0].update(axes=[{"name": "x", "type": "space"}]), "Length of axes"),
    (lambda a: a["multiscales"][0]["axes"][0].update(type="wavelength"), "multiscales.0.axes: Length of space axes"),
    (lambda a: a["multiscales"][0]["datasets"][0].update(coordinateTransformations=[{"type": "scale", "scale": [-1, 1]}]),
     "expected positive finite values"),
    (lambda a: a["multiscales"][0]["datasets"][0].update(path="nope"),
     "nope/.zarray: missing \\(dataset 'nope' is listed in multiscales\\)"),
])
def test_invalid_metadata_is_one_clear_error(tmp_path, mutate, message):
    path = write_image(tmp_path / "f.zarr", np.zeros((8, 8), np.uint8), "yx", version="0.4")
    root = zarr.open_group(str(path), mode="r+")
    attrs = dict(root.attrs)
    mutate(attrs)
    root.attrs.update(attrs)
    with pytest.raises(InvalidImageError, match=message) as info:
        open_image(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)
