"""Features checked against values known by hand: a square, a disc, a ring, one pixel, a line, neighbours."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.draw import disk

from cellar import measure
from cellar.measure import features as registry
from cellar.ngff.write import write_image
from helpers import read_table


def _table(tmp_path, labels, image=None, scale=None, **kw):
    image = np.zeros((1, *labels.shape), np.uint16) if image is None else image
    axes = "czyx" if labels.ndim == 3 else "cyx"
    path = write_image(tmp_path / "img.zarr", image, axes, chunks=(1, *[max(2, s // 3) for s in labels.shape]),
                       labels={"obj": labels}, scale=scale or {a: 1.0 for a in axes[1:]})
    measure.measure(str(path), "obj", tmp_path / "s.cellar", workers=1, region_pixels=0, halo=4, features="all", **kw)
    return read_table(tmp_path / "s.cellar")[1].set_index("label_id")


def test_square_disc_ring_pixel_and_line(tmp_path):
    labels = np.zeros((60, 80), np.uint16)
    labels[5:15, 5:15] = 1  # 10 x 10 square
    labels[disk((40, 20), 10)] = 2  # disc of radius 10
    labels[disk((30, 55), 12)] = 3
    labels[disk((30, 55), 5)] = 0  # ring: a disc with a hole
    labels[55, 75] = 4  # one pixel
    labels[2, 40:60] = 5  # a line of 20 pixels
    image = np.zeros((1, 60, 80), np.uint16)
    image[0, 5:15, 5:15] = np.arange(10)[None, :]  # x gradient 0..9 over the square
    image[0, 55, 75] = 42
    image[0, 2, 40:60] = 7
    t = _table(tmp_path, labels, image)

    sq = t.loc[1]
    assert sq.area == 100 and sq.extent == 1.0 and sq.euler_number == 1 and sq.area_convex == 100
    assert sq.solidity == 1.0 and sq.eccentricity == 0.0
    assert sq.perimeter == 36.0  # 36 border pixels, each of neighbourhood code 5 (weight 1)
    assert sq.circularity == pytest.approx(4 * math.pi * 100 / 36**2)
    assert sq.intensity_mean__c0 == pytest.approx(4.5) and sq.intensity_median__c0 == 4.5
    assert sq.intensity_q25__c0 == pytest.approx(2.0) and sq.intensity_q75__c0 == pytest.approx(7.0)
    assert sq.intensity_mad__c0 == 2.5 and sq.intensity_skewness__c0 == pytest.approx(0.0, abs=1e-12)
    assert sq.intensity_kurtosis__c0 == pytest.approx(-1.2242424242424244)  # uniform 0..9: -6(n^2+1)/(5(n^2-1))
    # boundary: the 36 edge pixels; x = 0 and 9 columns (10 each) and rows 0 and 9 (8 inner each, mean 4.5)
    assert sq.intensity_boundary_mean__c0 == pytest.approx((10 * 0 + 10 * 9 + 16 * 4.5) / 36)
    assert sq.centroid_weighted_x__c0 == pytest.approx(5 + sum(i * i for i in range(10)) / 45)  # sum(x I)/sum(I)
    assert sq.centroid_weighted_y__c0 == pytest.approx(9.5)

    disc = t.loc[2]
    assert disc.euler_number == 1 and 0.9 < disc.circularity < 1.2 and disc.eccentricity < 0.05
    assert disc.equivalent_diameter == pytest.approx(2 * math.sqrt(disc.area / math.pi))
    assert abs(disc.axis_major_length - 20) < 0.5 and abs(disc.axis_minor_length - 20) < 0.5

    ring = t.loc[3]
    assert ring.euler_number == 0  # one object, one hole
    assert ring.area_convex > ring.area and ring.solidity < 0.9

    px = t.loc[4]
    assert px.area == 1 and px.perimeter == 0 and math.isnan(px.circularity) and px.extent == 1.0
    assert px.intensity_median__c0 == px.intensity_q05__c0 == px.intensity_boundary_mean__c0 == 42
    assert px.intensity_mad__c0 == 0 and math.isnan(px.intensity_skewness__c0) and px.intensity_std__c0 == 0

    line = t.loc[5]
    assert line.area == 20 and line.axis_minor_length == pytest.approx(0, abs=1e-6) and line.eccentricity == 1.0
    assert line.intensity_boundary_mean__c0 == 7 and line.feret_diameter_max == pytest.approx(20)
    assert line.orientation == pytest.approx(math.pi / 2) or line.orientation == pytest.approx(-math.pi / 2)


def test_square_perimeter_and_feret_known_values(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[5:15, 5:15] = 1
    t = _table(tmp_path, labels)
    assert t.loc[1].perimeter == 36.0
    # The 0.5-level contour of the 10 x 10 square passes through the edge midpoints (4.5, x), (14.5, x),
    # (y, 4.5), (y, 14.5) for x, y in 5..14: the farthest pair, e.g. (4.5, 5) and (14.5, 14), is sqrt(10^2 + 9^2).
    assert t.loc[1].feret_diameter_max == pytest.approx(math.sqrt(10**2 + 9**2))
    # second moments of a 10 x 10 square: variance (n^2 - 1) / 12 per axis; axis length 4 sqrt(var)
    assert t.loc[1].axis_major_length == pytest.approx(4 * math.sqrt(99 / 12))
    assert t.loc[1].inertia_tensor_eigvals_0 == pytest.approx(99 / 12)


def test_touching_and_neighbour_features(tmp_path):
    labels = np.zeros((40, 40), np.uint16)
    labels[0:10, 0:10] = 1
    labels[0:10, 10:20] = 2  # shares an edge with 1
    labels[10:20, 20:30] = 3  # meets 2 only at a corner: not touching
    labels[30:40, 0:10] = 4  # alone
    t = _table(tmp_path, labels, scale={"y": 0.5, "x": 0.5}, radius=6.0)
    assert t.touching_neighbors.to_dict() == {1: 1, 2: 1, 3: 0, 4: 0}
    # centroids (um): 1 (2.25, 2.25), 2 (2.25, 7.25), 3 (7.25, 12.25), 4 (17.25, 2.25)
    assert t.nearest_neighbor_distance[1] == pytest.approx(5.0) and t.nearest_neighbor_id[1] == 2
    assert t.nearest_neighbor_id[2] == 1  # 5.0 to 1, sqrt(50) to 3
    assert t.nearest_neighbor_distance[3] == pytest.approx(math.sqrt(50)) and t.nearest_neighbor_id[3] == 2
    assert t.nearest_neighbor_distance[4] == pytest.approx(math.sqrt(200)) and t.nearest_neighbor_id[4] == 3
    assert t.neighbors_within_radius.to_dict() == {1: 1, 2: 1, 3: 0, 4: 0}  # radius 6 um


def test_a_lone_object_has_no_neighbour(tmp_path):
    labels = np.zeros((10, 10), np.uint8)
    labels[2:5, 2:5] = 9
    t = _table(tmp_path, labels)
    assert math.isnan(t.loc[9].nearest_neighbor_distance) and t.loc[9].nearest_neighbor_id == 0
    assert t.loc[9].neighbors_within_radius == 0 and t.loc[9].touching_neighbors == 0


def test_3d_cube_and_hollow_shell(tmp_path):
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:7, 2:7, 2:7] = 1  # 5^3 cube
    labels[9:18, 9:18, 9:18] = 2
    labels[11:16, 11:16, 11:16] = 0  # a closed cavity: Euler characteristic of a sphere, 2
    t = _table(tmp_path, labels)
    assert t.loc[1].area == 125 and t.loc[1].euler_number == 1 and t.loc[1].extent == 1.0
    assert t.loc[2].euler_number == 2 and t.loc[2].area == 9**3 - 5**3
    assert t.loc[1].equivalent_diameter == pytest.approx((6 * 125 / math.pi) ** (1 / 3))
    assert t.loc[1].area_convex == 125 and t.loc[1].solidity == 1.0
    assert t.loc[2].area_convex == 9**3 and t.loc[2].solidity == pytest.approx((9**3 - 5**3) / 9**3)


def test_a_flat_3d_object_gets_its_true_convex_hull(tmp_path):
    labels = np.zeros((5, 10, 10), np.uint8)
    labels[2, 2:7, 2:5] = 1  # one z plane: scikit-image's Qhull fails here and reports 0
    t = _table(tmp_path, labels)
    assert t.loc[1].area_convex == 15 and t.loc[1].solidity == 1.0


def test_feature_selection_by_group_and_name(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[2:8, 2:8] = 1
    image = np.ones((1, 20, 20), np.uint16)
    path = write_image(tmp_path / "img.zarr", image, "cyx", labels={"obj": labels})
    measure.measure(str(path), "obj", tmp_path / "a.cellar", workers=1, features="morphology")
    _, df = read_table(tmp_path / "a.cellar")
    assert "perimeter" in df and not any(c.startswith("intensity") for c in df) and "touching_neighbors" not in df
    measure.measure(str(path), "obj", tmp_path / "b.cellar", workers=1, features="area,intensity_median")
    _, df = read_table(tmp_path / "b.cellar")
    assert df.columns.tolist() == ["label_id", "area", "intensity_median__c0"]
    with pytest.raises(Exception, match="unknown perimetre.*did you mean perimeter"):
        registry.select("perimetre")


def test_texture_of_a_constant_and_of_a_striped_object(tmp_path):
    labels = np.zeros((20, 30), np.uint8)
    labels[2:12, 2:12] = 1  # constant: one grey level
    labels[2:12, 15:25] = 2  # vertical stripes 0, 100, 0, 100, ...: two levels alternating along x
    image = np.full((1, 20, 30), 50, np.uint16)
    image[0, 2:12, 15:25] = np.tile([0, 100], 5)[None, :]
    t = _table(tmp_path, labels, image, texture_levels=4)
    const = t.loc[1]
    assert const.texture_contrast__c0 == 0 and const.texture_homogeneity__c0 == 1 and const.texture_asm__c0 == 1
    assert const.texture_energy__c0 == 1 and const.texture_correlation__c0 == 1 and const.texture_entropy__c0 == 0
    stripes = t.loc[2]
    # levels 1 and 4 (indices 0 and 3): at 0 deg every pair differs by 3 (contrast 9); at 90 deg none differ;
    # at 45 and 135 deg every pair differs by 3 again. Mean over the four angles: 9 * 3 / 4.
    assert stripes.texture_contrast__c0 == pytest.approx(27 / 4)
    assert stripes.texture_dissimilarity__c0 == pytest.approx(9 / 4)


def test_euler_lookup_tables_are_scikit_images():
    from skimage.measure._regionprops_utils import EULER_COEFS2D_8, EULER_COEFS3D_26

    from cellar.measure import shape_kernels

    assert shape_kernels._EULER_3D_26.tolist() == list(EULER_COEFS3D_26)
    assert shape_kernels._EULER_2D_8.tolist() == list(EULER_COEFS2D_8)


def test_sphericity_of_a_ball_is_near_one_and_above_a_cube(tmp_path):
    from skimage.morphology import ball

    labels = np.zeros((30, 30, 50), np.uint8)
    labels[3:24, 3:24, 3:24] = ball(10).astype(np.uint8)
    labels[5:15, 5:15, 30:40] = 2
    t = _table(tmp_path, labels)
    assert 0.9 < t.loc[1].sphericity <= 1.0
    assert t.loc[2].sphericity < t.loc[1].sphericity
    # a 10^3 cube's mesh: 6 faces of 10 x 10 less the bevels marching cubes cuts at edges and corners
    assert 550 < t.loc[2].surface_area < 600
