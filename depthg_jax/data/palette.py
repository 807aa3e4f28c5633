"""Per-dataset class names and colour maps for reports and label pictures.

A dataset's own (the package asset <name>.json, or the synthetic set's) where it has them
for the number of classes asked, else generic names and a fixed deterministic palette.
"""

from __future__ import annotations

import numpy as np

from depthg_jax.data import assets, synthetic

IGNORE_COLOUR = (0, 0, 0)


def default_palette(n: int) -> np.ndarray:
    """n distinct, deterministic RGB colours (golden-ratio hues, alternating lightness)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    lightness = np.where(np.arange(n) % 2 == 0, 0.55, 0.4)
    saturation = 0.75
    c = (1 - np.abs(2 * lightness - 1)) * saturation
    h6 = hues * 6
    x = c * (1 - np.abs(h6 % 2 - 1))
    sector = h6.astype(int) % 6
    zeros = np.zeros(n)
    table = {
        0: (c, x, zeros),
        1: (x, c, zeros),
        2: (zeros, c, x),
        3: (zeros, x, c),
        4: (x, zeros, c),
        5: (c, zeros, x),
    }
    rgb = np.zeros((n, 3))
    for s, (r, g, b) in table.items():
        rgb[sector == s] = np.stack([r, g, b], -1)[sector == s]
    rgb += (lightness - c / 2)[:, None]
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def dataset_colours(dataset: str) -> np.ndarray | None:
    """The dataset's own colour map (n, 3) uint8, or None if it has none."""
    if dataset == "synthetic":
        return np.asarray(synthetic.SYNTHETIC_COLORS, np.uint8)
    if not assets.has_asset(f"{dataset}.json"):
        return None
    colours = assets.dataset_info(dataset).get("colors")
    return None if colours is None else np.asarray(colours, np.uint8)


def class_names(dataset: str, n: int) -> list[str]:
    """The dataset's class names if it defines exactly n, else class_0 .. class_{n-1}."""
    names: list[str] | None = None
    if dataset == "synthetic":
        names = list(synthetic.SYNTHETIC_CLASSES)
    elif assets.has_asset(f"{dataset}.json"):
        names = list(assets.dataset_info(dataset)["classes"])
    if names is not None and len(names) == n:
        return names
    return [f"class_{i}" for i in range(n)]


def palette_for(dataset: str, n: int) -> np.ndarray:
    """(n, 3) uint8: the dataset's colours if it defines at least n, else `default_palette(n)`."""
    colours = dataset_colours(dataset)
    if colours is not None and len(colours) >= n:
        return colours[:n]
    return default_palette(n)


def colorize(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Label ids (H, W) → RGB uint8 (H, W, 3); ids outside [0, len(colours)) are black."""
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(colours))
    out = np.zeros(labels.shape + (3,), np.uint8)
    out[:] = IGNORE_COLOUR
    out[valid] = colours[labels[valid]]
    return out
