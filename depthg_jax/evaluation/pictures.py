"""Drawing helpers for the pictures a run and an evaluation write: text, colour maps, colour
scales and class legends (PIL only, no plotting library).

Used by `evaluation.reports` (confusion pictures) and `training.summaries` (picture grids).
"""

from __future__ import annotations

import functools

import numpy as np

# Viridis sampled at 0, 1/8, ..., 1 (perceptually uniform, readable in grey and by most
# colour-blind readers); linear interpolation between the samples.
VIRIDIS = np.array(
    [
        [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
        [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
    ],
    np.float64,
)  # fmt: skip
# White to dark blue: the confusion pictures' scale (0 = white).
BLUES = np.array([[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]])
TEXT = (0, 0, 0)
BACKGROUND = (255, 255, 255)


@functools.cache
def font(size: int = 12):
    """PIL's built-in scalable font (a bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def text_size(text: str, size: int = 12) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn with font(size)."""
    left, top, right, bottom = font(size).getbbox(text)
    return int(right - left), int(bottom - min(top, 0))


def apply_colour_map(values: np.ndarray, anchors: np.ndarray = VIRIDIS) -> np.ndarray:
    """Values in [0, 1] (any shape; clipped, NaN as 0) -> RGB uint8 (..., 3) along `anchors`."""
    t = np.nan_to_num(np.clip(np.asarray(values, np.float64), 0.0, 1.0)) * (len(anchors) - 1)
    lo = np.minimum(np.floor(t).astype(np.int64), len(anchors) - 2)
    frac = (t - lo)[..., None]
    anchors = np.asarray(anchors, np.float64)
    return np.round(anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).astype(np.uint8)


def draw_text(draw, xy, text: str, size: int = 12, fill=TEXT, anchor: str = "la") -> None:
    draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)


def rotated_text(text: str, size: int = 12, fill=TEXT):
    """A white image holding `text` rotated 90 degrees (reading upwards)."""
    from PIL import Image, ImageDraw

    w, h = text_size(text, size)
    label = Image.new("RGB", (w + 4, h + 4), BACKGROUND)
    ImageDraw.Draw(label).text((2, 2), text, fill=fill, font=font(size))
    return label.rotate(90, expand=True)


def colour_bar(
    length: int,
    thickness: int,
    anchors: np.ndarray,
    *,
    vertical: bool = False,
    reverse: bool = False,
) -> np.ndarray:
    """A bar of the colour map, low values at the left (at the bottom when vertical); `reverse`
    flips it. RGB uint8 (thickness, length, 3), or (length, thickness, 3) when vertical."""
    ramp = np.linspace(0.0, 1.0, length)
    if reverse:
        ramp = ramp[::-1]
    row = apply_colour_map(ramp, anchors)
    if vertical:
        return np.repeat(row[::-1][:, None], thickness, axis=1)
    return np.repeat(row[None], thickness, axis=0)


def class_legend(names: list[str], colours: np.ndarray, width: int, size: int = 11) -> np.ndarray:
    """Swatches with class names, wrapped into lines no wider than `width`; RGB uint8."""
    from PIL import Image, ImageDraw

    swatch, gap, line_h = size, 10, size + 6
    lines, x = [[]], 0
    for name, colour in zip(names, colours, strict=True):
        w = swatch + 4 + text_size(name, size)[0] + gap
        if x and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append((x, name, tuple(int(c) for c in colour)))
        x += w
    canvas = Image.new("RGB", (width, line_h * len(lines) + 4), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, line in enumerate(lines):
        y = 2 + j * line_h
        for x, name, colour in line:
            draw.rectangle([x + 2, y + 2, x + 2 + swatch, y + 2 + swatch], fill=colour,
                           outline=(90, 90, 90))  # fmt: skip
            draw_text(draw, (x + swatch + 6, y + 1), name, size)
    return np.asarray(canvas)
