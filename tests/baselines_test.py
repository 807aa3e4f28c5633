"""k-means baselines: recover well-separated clusters; score an embedding that encodes labels."""

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.data import palette
from depthg_jax.evaluation import baselines, reports


def test_spherical_kmeans_recovers_separated_directions():
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 5.0
    truth = rng.integers(0, 3, 300)
    x = centres[truth] + rng.normal(0, 0.3, (300, 4))
    centroids = baselines.fit_spherical_kmeans(jax.random.key(0), jnp.asarray(x), 3)
    assign = np.asarray(jnp.argmax(baselines._normalize(jnp.asarray(x)) @ centroids.T, -1))
    # The same partition up to renaming: each true cluster maps to exactly one found cluster.
    pairs = {(t, a) for t, a in zip(truth, assign, strict=True)}
    assert len(pairs) == 3 and len({a for _, a in pairs}) == 3


class _Loader:
    def __init__(self, batches):
        self._batches = batches

    def __iter__(self):
        return iter(self._batches)


def _blocky_batch(rng, n, size, colours, patch):
    grid = size // patch
    labels = rng.integers(0, len(colours), (n, grid, grid))
    labels = labels.repeat(patch, 1).repeat(patch, 2)
    return {
        "image": colours[labels].astype(np.uint8),
        "label": labels.astype(np.int32),
        "depth": np.zeros((n, size, size), np.float32),
        "valid": np.ones(n, bool),
    }


def test_evaluate_kmeans_scores_an_embedding_that_separates_classes():
    rng = np.random.default_rng(1)
    colours = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250]])
    batches = [_blocky_batch(rng, 8, 32, colours, 8) for _ in range(2)]

    def embed(_, images):  # mean colour per 8x8 patch, centred: classes are distinct directions
        x = images.astype(jnp.float32) / 255.0 - 0.35
        return x.reshape(x.shape[0], 4, 8, 4, 8, 3).mean((2, 4))

    result = baselines.evaluate_kmeans(
        embed, None, 3, _Loader(batches), mesh=None, points_per_image=16
    )
    assert result["cluster"]["accuracy"] > 0.9
    assert result["cluster"]["miou"] > 0.8


def test_grid_and_colours():
    tiles = [[np.full((4, 5, 3), v, np.uint8) for v in (0, 100)] for _ in range(3)]
    grid = reports.make_grid(tiles, pad=2)
    assert grid.shape == (3 * 6 + 2, 2 * 7 + 2, 3)
    assert (grid[2:6, 2:7] == 0).all() and (grid[2:6, 9:14] == 100).all()
    colours = palette.default_palette(5)
    assert len({tuple(c) for c in colours}) == 5
    out = palette.colorize(np.array([[0, 4, -1, 7]]), colours)
    assert (out[0, 0] == colours[0]).all() and (out[0, 1] == colours[4]).all()
    assert (out[0, 2] == 0).all() and (out[0, 3] == 0).all()
    assert palette.class_names("synthetic", 6)[0] == "ground"
    assert palette.class_names("directory", 2) == ["class_0", "class_1"]
