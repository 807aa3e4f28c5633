"""Pictures that explain themselves: titled training grids with a near/far depth scale and the
class colours named, confusion pictures with both axes named and a colour scale."""

import jax
import numpy as np
import pytest

from depthg_jax.data import palette
from depthg_jax.evaluation import pictures, reports
from depthg_jax.models import model as model_lib
from depthg_jax.training import summaries

WHITE = np.array(pictures.BACKGROUND, np.uint8)


def luminance(rgb):
    return np.asarray(rgb, np.float64) @ [0.299, 0.587, 0.114]


def test_colour_map_hits_its_anchors_and_interpolates_between():
    anchors = pictures.VIRIDIS
    ends = pictures.apply_colour_map(np.array([0.0, 1.0, -3.0, 7.0, np.nan]))
    np.testing.assert_array_equal(ends, anchors[[0, -1, 0, -1, 0]].astype(np.uint8))
    middle = pictures.apply_colour_map(np.array([1 / 16]))[0]  # halfway between anchors 0, 1
    np.testing.assert_array_equal(middle, np.round((anchors[0] + anchors[1]) / 2))


def test_depth_is_yellow_near_and_dark_far_monotonically():
    depth = np.arange(256, dtype=np.float64)[None]  # 0 = nearest
    rgb = summaries.colorize_depth(depth)[0]
    np.testing.assert_array_equal(rgb[0], pictures.VIRIDIS[-1])  # near: yellow
    np.testing.assert_array_equal(rgb[-1], pictures.VIRIDIS[0])  # far: dark purple
    assert (np.diff(luminance(rgb)) <= 0.6).all()  # never brighter further away (rounding)
    assert luminance(rgb[0]) - luminance(rgb[-1]) > 150


def test_titled_grid_has_titles_the_depth_scale_and_the_class_legend():
    tile = lambda v: np.full((40, 50, 3), v, np.uint8)  # noqa: E731
    rows = [[tile(10), tile(60), tile(110)] for _ in range(2)]
    names, colours = ["ground", "sky"], np.array([[200, 30, 30], [30, 30, 200]], np.uint8)
    grid = summaries.titled_grid(
        rows, ["image", "depth", "label"], depth_column=1, classes=(names, colours)
    )
    scale = -(-summaries.MIN_TILE // 50)  # small tiles are enlarged so the titles fit
    w, h = 50 * scale, 40 * scale
    body_w = 3 * (w + 2) + 2
    assert grid.shape[1] == body_w
    header = grid.shape[0] - (2 * (h + 2) + 2)
    # Find the body (its first tile row starts with the value-10 tile) below the header.
    top = next(y for y in range(grid.shape[0]) if (grid[y, 2 : 2 + w] == 10).all())
    assert 0 < top - 2 < header
    title_band = grid[: top - 2]
    for c in range(3):  # each column has dark title text above it
        x0 = 2 + c * (w + 2)
        assert (luminance(title_band[:, x0 : x0 + w]) < 100).any(), c
    # The depth scale runs from near (yellow) to far (dark purple) inside the depth column.
    x0 = 2 + (w + 2)
    band = title_band[:, x0 : x0 + w].reshape(-1, 3)
    assert any((band == pictures.VIRIDIS[-1].astype(np.uint8)).all(1))
    assert any((band == pictures.VIRIDIS[0].astype(np.uint8)).all(1))
    assert not any((title_band[:, 2 : 2 + w].reshape(-1, 3) == [253, 231, 37]).all(1))
    legend = grid[top + 2 * (h + 2) :].reshape(-1, 3)  # below the body: both class swatches
    for colour in colours:
        assert (legend == colour).all(1).sum() >= 25


def test_image_summary_drops_the_label_column_when_nothing_is_labelled(tiny_config):
    config = tiny_config()
    rng = np.random.default_rng(0)
    res = config.data.eval_res
    batch = {
        "image": rng.integers(0, 256, (2, res, res, 3), dtype=np.uint8),
        "depth": rng.integers(0, 256, (2, res, res)).astype(np.float32),
        "label": np.full((2, res, res), 255, np.int32),
        "valid": np.array([True, True]),
    }
    params = model_lib.init_params(model_lib.ModelSpec.from_config(config), jax.random.key(0))
    unlabelled = summaries.write_image_summary(None, 0, params, config, [batch], None)
    batch["label"] = rng.integers(0, config.data.n_classes, (2, res, res)).astype(np.int32)
    labelled = summaries.write_image_summary(None, 0, params, config, [batch], None)
    scale = -(-summaries.MIN_TILE // res)
    assert unlabelled.shape[1] == 3 * (res * scale + 2) + 2
    assert labelled.shape[1] == 4 * (res * scale + 2) + 2


@pytest.mark.parametrize("n", [3, 27])
def test_confusion_picture_names_both_axes_and_has_a_colour_scale(n):
    names = palette.class_names("cocostuff27", 27)[:n]
    rng = np.random.default_rng(n)
    histogram = rng.integers(0, 50, (n, n)) + np.diag(np.arange(1, n + 1) * 100)
    cell = 28
    image = reports.render_confusion(histogram, names, cell=cell, title="cluster probe")
    counts = histogram.T.astype(np.float64)
    frac = counts / counts.sum(1, keepdims=True)
    # Find the matrix: the top-left cell's colour block.
    expected = pictures.apply_colour_map(frac, pictures.BLUES)
    ys, xs = np.nonzero((image == expected[0, 0]).all(-1))
    top, left = ys.min(), xs.min()
    for r, c in [(0, 0), (n - 1, n - 1), (n // 2, 0)]:
        pixel = image[top + r * cell + 2, left + c * cell + 2]
        np.testing.assert_array_equal(pixel, expected[r, c])
    side = n * cell
    # Row names at the left, column names and the titles above: dark text outside the matrix.
    assert (luminance(image[top : top + side, 20 : left - 2]) < 100).any()
    assert (luminance(image[20 : top - 2, left : left + side]) < 100).any()
    assert (luminance(image[:top, :]) < 100).sum() > (luminance(image[20:top, :]) < 100).sum()
    assert (luminance(image[top : top + side, :18]) < 100).any()  # "true class"
    # The colour scale at the right: a column darkening steadily from white (0%, bottom) to
    # dark blue (100%, top).
    region = luminance(image[top + 1 : top + side - 1, left + side + 1 :])
    ramps = [
        col for col in region.T if (np.diff(col) >= -0.6).all() and col[-1] - col[0] > 150
    ]  # fmt: skip
    assert ramps


def test_confusion_cells_show_the_share_as_text():
    names = ["a", "b"]
    histogram = np.array([[90, 0], [10, 100]])  # rows predicted, columns true
    image = reports.render_confusion(histogram, names, cell=28)
    dark = pictures.apply_colour_map(np.array([0.9]), pictures.BLUES)[0]
    ys, xs = np.nonzero((image == dark).all(-1))
    cell = image[ys.min() : ys.min() + 26, xs.min() : xs.min() + 26]
    assert (luminance(cell) > luminance(dark) + 80).sum() > 10  # "90" in white on the dark cell
