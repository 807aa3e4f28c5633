"""Procedural outdoor scenes with exact per-pixel depth and labels (the demo's data).

Each scene is rendered through a pinhole camera (vertical field of view 60 degrees) standing
1.2-2 m above a ground plane: the horizon sits at a random row, ground depth grows as
f * height / (row - horizon), the sky is at the far plane. Behind, a skyline of building
facades (some slanted) stands on the ground at 15-45 m; in front, 3-9 trees, vehicles and
people of real-world sizes stand on the ground at 3-30 m, so their image size and foot row
follow from their depth. A z-buffer resolves occlusion. Every class has its own colours and
texture (ground checkerboard fixed in world units, so it shrinks with distance; facade
window grids; leafy noise; car bodies with windows and wheels; people with heads and
clothes), and distant surfaces fade into haze, so depth and class relate as in real scenes.

Output, in the `directory` layout (see depthg_jax.data.datasets):
  images/<split>/<id>.png, depth/<split>/<id>_zoedepth.png (per-image min-max normalised
  metric depth x 255, 0 = nearest), labels/<split>/<id>.png (class ids), synthetic.json.

Scene i of a split draws from default_rng([seed, split number, i]) only, so a set is
bit-identical for a seed, whatever the counts. Generation is atomic and idempotent.

    python -m depthg_jax.data.synthetic --out=DIR [--num_train=300 --num_val=100]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

SYNTHETIC_CLASSES = ("ground", "sky", "building", "tree", "vehicle", "person")
SYNTHETIC_COLORS = np.array(
    [[128, 64, 128], [70, 130, 180], [70, 70, 70], [107, 142, 35], [0, 0, 142], [220, 20, 60]],
    np.uint8,
)
GROUND, SKY, BUILDING, TREE, VEHICLE, PERSON = range(6)
MANIFEST = "synthetic.json"
FORMAT_VERSION = 1
FAR = 50.0  # Metres: sky and the depth cap.
_SPLITS = (("train", 0), ("val", 1))
_HAZE = np.array([185.0, 200.0, 220.0], np.float32)
_BUILDING_COLORS = np.array([[150, 80, 60], [165, 160, 150], [120, 110, 100], [190, 170, 130]])
_VEHICLE_COLORS = np.array([[200, 30, 30], [30, 60, 190], [230, 230, 230], [30, 30, 30]])
_SHIRT_COLORS = np.array([[200, 60, 60], [60, 160, 60], [240, 200, 40], [80, 80, 200]])


class _Canvas:
    """RGB, depth and label buffers with a z-buffered paint operation."""

    def __init__(self, size: int):
        self.rgb = np.zeros((size, size, 3), np.float32)
        self.depth = np.full((size, size), np.inf, np.float32)
        self.label = np.zeros((size, size), np.uint8)

    def paint(self, rows: slice, cols: slice, mask, depth, rgb, cls: int) -> None:
        """Writes rgb/depth/class where mask holds and depth is nearer than what is there."""
        win = mask & (depth < self.depth[rows, cols])
        self.depth[rows, cols] = np.where(win, depth, self.depth[rows, cols])
        self.rgb[rows, cols] = np.where(win[..., None], rgb, self.rgb[rows, cols])
        self.label[rows, cols] = np.where(win, cls, self.label[rows, cols])


def _box(canvas_size: int, top: float, bottom: float, left: float, right: float):
    """Integer pixel window (row slice, col slice) of a box, clipped; None if empty."""
    r0, r1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), canvas_size)
    c0, c1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), canvas_size)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _grid(rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (row, col) of a window."""
    r = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5
    c = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5
    return r, c


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, ...]:
    """One scene: (uint8 RGB (S,S,3), float32 metric depth (S,S), uint8 labels (S,S))."""
    s = size
    f = 0.5 * s / np.tan(np.radians(30.0))
    horizon = rng.uniform(0.3, 0.55) * s
    cam_h = rng.uniform(1.2, 2.0)
    cv = _Canvas(s)
    all_rows, all_cols = _grid(slice(0, s), slice(0, s))

    # Sky: a vertical gradient at the far plane.
    t = np.clip(all_rows / max(horizon, 1.0), 0, 1)[..., None]
    sky = (1 - t) * np.array([60, 110, 200], np.float32) + t * np.array([150, 190, 235])
    cv.paint(slice(0, s), slice(0, s), np.ones((s, s), bool), np.full((s, s), FAR), sky, SKY)

    # Ground: depth from the row, a checkerboard fixed in world metres.
    below = all_rows > horizon + 0.5
    z = np.where(below, f * cam_h / np.maximum(all_rows - horizon, 1e-3), FAR)
    z = np.minimum(z, FAR - 1.0)
    x_world = (all_cols - s / 2) * z / f
    checker = ((np.floor(x_world / 2.0) + np.floor(z / 2.0)) % 2)[..., None]
    base = np.array(rng.choice([[115, 105, 90], [95, 95, 100], [105, 120, 80]]), np.float32)
    ground = base * (0.88 + 0.2 * checker)
    ground_mask = np.broadcast_to(below, (s, s))
    cv.paint(slice(0, s), slice(0, s), ground_mask, np.broadcast_to(z, (s, s)), ground, GROUND)

    _paint_buildings(cv, rng, f, horizon, cam_h)
    objects = [(rng.uniform(3.0, 30.0), rng.integers(3)) for _ in range(rng.integers(3, 10))]
    for dist, kind in sorted(objects, reverse=True):
        x = rng.uniform(-0.55, 0.55) * dist * s / f
        (_paint_tree, _paint_vehicle, _paint_person)[kind](cv, rng, f, horizon, cam_h, dist, x)

    haze = (1.0 - np.exp(-cv.depth / 60.0))[..., None]
    rgb = cv.rgb * (1 - haze) + _HAZE * haze
    rgb = rgb * rng.uniform(0.8, 1.15) + rng.normal(0.0, 5.0, rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return image, cv.depth.astype(np.float32), cv.label


def _project(f, horizon, cam_h, dist, x, width, height, s):
    """Image box (top, bottom, left, right) of an upright object standing on the ground."""
    foot = horizon + f * cam_h / dist
    top = foot - f * height / dist
    cx = s / 2 + f * x / dist
    half = 0.5 * f * width / dist
    return top, foot, cx - half, cx + half


def _paint_buildings(cv: _Canvas, rng, f, horizon, cam_h) -> None:
    s = cv.depth.shape[0]
    col = 0.0
    while col < s:
        w = rng.uniform(0.15, 0.45) * s
        z0 = rng.uniform(15.0, 45.0)
        slope = rng.uniform(-0.08, 0.08) if rng.random() < 0.5 else 0.0  # metres per pixel
        height = rng.uniform(6.0, 25.0)
        win = _box(s, 0, s, col, col + w)
        col += w + rng.uniform(0, 0.1) * s
        if rng.random() < 0.2 or win is None:
            continue  # A gap in the skyline.
        rows, cols = win
        r, c = _grid(rows, cols)
        z = np.maximum(z0 + slope * (c - cols.start), 8.0) + 0 * r
        top = horizon - f * (height - cam_h) / z
        foot = horizon + f * cam_h / z
        mask = (r >= top) & (r < foot)
        # Windows: a grid in world units (3 m floors, 2.5 m bays).
        y_world = (foot - r) * z / f
        x_world = (c - s / 2) * z / f
        windows = ((y_world % 3.0) > 1.0) & ((y_world % 3.0) < 2.2) & ((x_world % 2.5) > 1.0)
        color = _BUILDING_COLORS[rng.integers(len(_BUILDING_COLORS))].astype(np.float32)
        rgb = np.where(windows[..., None], np.array([50, 60, 80], np.float32), color)
        cv.paint(rows, cols, mask, z, rgb, BUILDING)


def _paint_tree(cv: _Canvas, rng, f, horizon, cam_h, dist, x) -> None:
    s = cv.depth.shape[0]
    height, crown = rng.uniform(4.0, 9.0), rng.uniform(1.5, 3.0)
    top, foot, left, right = _project(f, horizon, cam_h, dist, x, 2 * crown, height, s)
    win = _box(s, top, foot, left, right)
    if win is None:
        return
    rows, cols = win
    r, c = _grid(rows, cols)
    cx, radius_px = (left + right) / 2, f * crown / dist
    cy = top + radius_px
    dy, dx = (r - cy) / radius_px, (c - cx) / radius_px
    canopy = dx**2 + dy**2 <= 1.0
    trunk = (np.abs(c - cx) < 0.15 * radius_px) & (r > cy)
    bulge = crown * np.sqrt(np.clip(1.0 - dx**2 - dy**2, 0.0, 1.0))
    depth = np.where(canopy, dist - bulge, dist)
    leaves = np.array([50, 120, 40], np.float32) * rng.uniform(0.7, 1.3, (*canopy.shape, 1))
    rgb = np.where(canopy[..., None], leaves, np.array([90, 60, 35], np.float32))
    cv.paint(rows, cols, canopy | trunk, depth, rgb, TREE)


def _paint_vehicle(cv: _Canvas, rng, f, horizon, cam_h, dist, x) -> None:
    s = cv.depth.shape[0]
    width, height = rng.uniform(3.8, 4.8), rng.uniform(1.4, 1.9)
    top, foot, left, right = _project(f, horizon, cam_h, dist, x, width, height, s)
    win = _box(s, top, foot, left, right)
    if win is None:
        return
    rows, cols = win
    r, c = _grid(rows, cols)
    v = (r - top) / (foot - top)  # 0 at the roof, 1 at the ground.
    u = (c - left) / (right - left)
    body = (v > 0.35) | ((u > 0.2) & (u < 0.8))
    wheels = (v > 0.8) & ((np.abs(u - 0.2) < 0.09) | (np.abs(u - 0.8) < 0.09))
    glass = (v < 0.35) & (v > 0.05) & (u > 0.25) & (u < 0.75)
    color = _VEHICLE_COLORS[rng.integers(len(_VEHICLE_COLORS))].astype(np.float32)
    rgb = np.where(glass[..., None], np.array([40, 60, 90], np.float32), color)
    rgb = np.where(wheels[..., None], np.array([20, 20, 20], np.float32), rgb)
    cv.paint(rows, cols, body | wheels, np.full(body.shape, dist, np.float32), rgb, VEHICLE)


def _paint_person(cv: _Canvas, rng, f, horizon, cam_h, dist, x) -> None:
    s = cv.depth.shape[0]
    height = rng.uniform(1.5, 1.9)
    top, foot, left, right = _project(f, horizon, cam_h, dist, x, 0.55, height, s)
    win = _box(s, top, foot, left, right)
    if win is None:
        return
    rows, cols = win
    r, c = _grid(rows, cols)
    v = (r - top) / (foot - top)
    u = (c - left) / (right - left)
    head = ((u - 0.5) / 0.3) ** 2 + ((v - 0.07) / 0.07) ** 2 <= 1.0
    torso = (v >= 0.14) & (v < 0.55) & (np.abs(u - 0.5) < 0.5)
    legs = (v >= 0.55) & (np.abs(u - 0.5) > 0.06) & (np.abs(u - 0.5) < 0.35)
    shirt = _SHIRT_COLORS[rng.integers(len(_SHIRT_COLORS))].astype(np.float32)
    rgb = np.where(head[..., None], np.array([220, 180, 150], np.float32), shirt)
    rgb = np.where(legs[..., None], np.array([40, 50, 90], np.float32), rgb)
    mask = head | torso | legs
    cv.paint(rows, cols, mask, np.full(mask.shape, dist, np.float32), rgb, PERSON)


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """Metric depth -> per-image min-max normalised uint8, floor(x * 255), 0 = nearest."""
    lo, hi = float(depth.min()), float(depth.max())
    scaled = (depth.astype(np.float64) - lo) / max(hi - lo, 1e-6) * 255.0
    return np.clip(np.floor(scaled), 0, 255).astype(np.uint8)


def _write_split(root: str, split: str, split_num: int, count: int, size: int, seed: int) -> None:
    for sub in ("images", "depth", "labels"):
        os.makedirs(os.path.join(root, sub, split), exist_ok=True)
    for i in range(count):
        image, depth, label = render_scene(np.random.default_rng([seed, split_num, i]), size)
        name = f"{i:06d}"
        image_path = os.path.join(root, "images", split, name + ".png")
        Image.fromarray(image).save(image_path, compress_level=1)
        Image.fromarray(encode_depth(depth)).save(
            os.path.join(root, "depth", split, name + "_zoedepth.png")
        )
        Image.fromarray(label).save(os.path.join(root, "labels", split, name + ".png"))


def _manifest(num_train: int, num_val: int, size: int, seed: int) -> dict:
    return {
        "generator": "depthg_jax.data.synthetic",
        "version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "size": size,
        "seed": seed,
        "classes": list(SYNTHETIC_CLASSES),
    }


def _read_manifest(root: str) -> dict | None:
    try:
        with open(os.path.join(root, MANIFEST)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def generate_dataset(root: str, *, num_train: int, num_val: int, size: int = 224, seed: int = 0):
    """Writes the synthetic set to root (directory layout); does nothing if already there.

    The set is built in a temporary sibling folder and renamed into place, so root is either
    absent/empty or complete. A non-empty root holding anything else is an error.
    """
    want = _manifest(num_train, num_val, size, seed)
    if _read_manifest(root) == want:
        return root
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} is not empty and holds no synthetic set with parameters {want}; "
            "choose another folder or remove it"
        )
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".synthetic-tmp-")
    try:
        for split, num in _SPLITS:
            _write_split(tmp, split, num, num_train if split == "train" else num_val, size, seed)
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump(want, fh, indent=1)
        if os.path.isdir(root):
            os.rmdir(root)  # Empty (checked above); replace needs it gone or empty.
        try:
            os.replace(tmp, root)
        except OSError:
            if _read_manifest(root) != want:  # Not a concurrent writer of the same set.
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return root


def main(argv) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    generate_dataset(f.out, num_train=f.num_train, num_val=f.num_val, size=f.size, seed=f.seed)
    print(f"Synthetic set in {f.out}")


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("out", None, "Dataset root to write.")
    flags.DEFINE_integer("num_train", 300, "Training images.")
    flags.DEFINE_integer("num_val", 100, "Validation images.")
    flags.DEFINE_integer("size", 224, "Image side (px).")
    flags.DEFINE_integer("seed", 0, "Generator seed.")
    flags.mark_flags_as_required(["out"])
    from depthg_jax import commands

    commands.run_main(main)
