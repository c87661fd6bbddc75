"""The image a large map is drawn as, and the points a box or lasso selects."""

from __future__ import annotations

import numpy as np

from app_pages import raster


def test_lasso_and_box_select_the_points_inside_hand_checked():
    x = np.array([0.5, 1.5, 2.5, 0.5, 1.5, 3.5])
    y = np.array([0.5, 0.5, 0.5, 1.5, 1.5, 0.5])
    ell = {"x": [0, 3, 3, 1, 1, 0], "y": [0, 0, 1, 1, 2, 2]}  # an L: (1.5, 1.5) lies in its notch
    assert raster.inside_polygon(x, y, ell["x"], ell["y"]).tolist() == [True, True, True, True, False, False]
    assert raster.selected_rows(x, y, [{"x": [2, 1], "y": [2, 0]}], []).tolist() == [1, 4]  # corners in any order
    assert raster.selected_rows(x, y, [{"x": [3, 4], "y": [0, 1]}], [ell]).tolist() == [0, 1, 2, 3, 5]  # a union
    assert raster.selected_rows(x, y, [], []).tolist() == []


def test_points_land_on_their_pixels_and_later_layers_win():
    canvas = raster.Canvas((0.0, 10.0, 0.0, 5.0), width=10, height=5)
    canvas.draw(np.array([0.0, 9.99]), np.array([5.0, 0.0]), raster.rgb("#ff0000"), size=1)
    assert canvas.pixels[0, 0].tolist() == [255, 0, 0, 255]  # top left: x0, y1
    assert canvas.pixels[4, 9].tolist() == [255, 0, 0, 255]  # bottom right
    canvas.draw(np.array([0.0, np.nan]), np.array([5.0, 1.0]), raster.rgb("#0000ff"), size=2, alpha=60)
    assert canvas.pixels[0, 0].tolist() == [0, 0, 255, 60] and canvas.pixels[1, 1].tolist() == [0, 0, 255, 60]
    assert int((canvas.pixels[..., 3] > 0).sum()) == 1 + 4  # the NaN point is not drawn
    assert canvas.data_uri().startswith("data:image/png;base64,")
    image = canvas.layout_image()
    assert (image["x"], image["y"], image["sizex"], image["sizey"]) == (0.0, 5.0, 10.0, 5.0)


def test_viridis_ends_and_bounds():
    colours = raster.viridis(np.array([-5.0, 0.0, 10.0, 99.0]), 0.0, 10.0)
    assert colours[0].tolist() == colours[1].tolist() == raster.rgb("#440154").tolist()
    assert colours[2].tolist() == colours[3].tolist() == raster.rgb("#fde725").tolist()
    x0, x1, y0, y1 = raster.bounds(np.array([0.0, 10.0, np.nan]), np.array([1.0, 3.0, 2.0]))
    assert (x0, x1) == (-0.2, 10.2) and np.isclose(y0, 0.96) and np.isclose(y1, 3.04)


def test_a_box_or_lasso_on_a_scatter_matrix_panel_reads_that_panels_two_columns():
    a, b, c = np.array([1.0, 2.0, 3.0, np.nan]), np.array([10.0, 20.0, 30.0, 20.0]), np.array([5.0, 5.0, 9.0, 5.0])
    box = {"xref": "x", "yref": "y2", "x": [1.5, 3.5], "y": [15.0, 35.0]}  # columns a (x) and b (y2)
    assert raster.panel_rows([a, b, c], [box], []).tolist() == [1, 2]  # the NaN row is never inside
    lasso = {"xref": "x2", "yref": "y3", "x": [0, 25, 25, 0], "y": [4, 4, 6, 6]}  # columns b (x2) and c (y3)
    assert raster.panel_rows([a, b, c], [box], [lasso]).tolist() == [0, 1, 2, 3]
    assert raster.panel_rows([a, b, c], [{"x": [0, 1], "y": [0, 1]}], []) is None  # no panel named
    assert raster.axis_index("x") == 0 and raster.axis_index("y3") == 2


def test_a_density_shades_pixels_by_the_log_of_their_points_hand_checked():
    canvas = raster.Canvas((0.0, 2.0, 0.0, 1.0), width=2, height=1)
    canvas.shade(np.array([0.1, 0.2, 1.5, np.nan]), np.array([0.5, 0.5, 0.5, 0.5]), raster.rgb("#ff0000"))
    # two points on the left pixel (the most: full alpha), one on the right: 0.3 + 0.7 * log 2 / log 3
    assert canvas.pixels[0, 0].tolist() == [255, 0, 0, 255]
    assert canvas.pixels[0, 1].tolist() == [255, 0, 0, round(255 * (0.3 + 0.7 * np.log(2) / np.log(3)))]
    canvas.shade(np.array([0.1]), np.array([0.5]), values=np.array([10.0]), span=(0.0, 10.0), alpha=255)
    assert canvas.pixels[0, 0].tolist() == [*raster.rgb("#fde725").tolist(), 255]  # a full-alpha layer covers
    over = raster.Canvas((0.0, 1.0, 0.0, 1.0), width=1, height=1)
    over.draw(np.array([0.5]), np.array([0.5]), raster.rgb("#ff0000"), size=1)
    over.shade(np.array([0.5]), np.array([0.5]), raster.rgb("#0000ff"), alpha=102)  # 40% blue over opaque red
    assert over.pixels[0, 0].tolist() == [153, 0, 102, 255]
