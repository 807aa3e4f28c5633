"""Five-crop preparation (docs/data.md): every image of a split -> 4 corner crops + 1 centre crop.

Crops are half the image's height and width (floor): top-left, top-right, bottom-left,
bottom-right, centre (top = round((H - h) / 2), as torchvision's five_crop), written as
ids ``<id>_0`` .. ``<id>_4`` in the `directory` layout under --out:

  images/<split>/<id>_<k>.jpg (or .png), labels/<split>/<id>_<k>.png (class ids already
  mapped, 255 = ignore; only when the dataset has labels), depth/<split>/<id>_<k>_zoedepth.png.

Depth is cropped from the normalised map and not re-normalised: stored as 8-bit when every
value is a whole number (8-bit sources), else as ``_zoedepth_16.png`` (x 65535/255, rounded).
Each file is written atomically (temporary name, then rename); an image whose crops all
exist is skipped, so an interrupted run resumes and a finished one is a no-op (the temporary
files of a killed run are removed by the next write into their folder). Every path written
lies inside --out (ids are checked).
Train on the result with data.name="directory", data.root=<out>.

    python -m depthg_jax.data.five_crop --dataset=cocostuff27 --root=DIR --split=train --out=DIR
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from depthg_jax import commands
from depthg_jax.data import datasets, depth_io, images, outputs
from depthg_jax.runtime import files

NUM_CROPS = 5
DEFAULT_CLASSES = {"cocostuff27": 27, "cityscapes27": 27, "potsdam3": 3}
# directory/synthetic: every stored class id (< 255) is copied as it is; 255 stays ignore.
KEEP_STORED_IDS = 255


def five_crop_boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the 4 corner crops and the centre crop, half size."""
    ch, cw = h // 2, w // 2
    if ch < 1 or cw < 1:
        raise ValueError(f"Image of {h}x{w} is too small to five-crop")
    centre = (int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)))
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), centre]
    return [(t, l, ch, cw) for t, l in corners]


def _crop_paths(out: str, split: str, crop_id: str, image_ext: str, labels: bool, depth16: bool):
    paths = {"image": os.path.join(out, "images", split, crop_id + image_ext)}
    depth_stem = os.path.join(out, "depth", split, crop_id)
    paths["depth"] = images.depth_path(depth_stem, "png16" if depth16 else "png8")
    if labels:
        paths["label"] = os.path.join(out, "labels", split, crop_id + ".png")
    what = f"crop {crop_id!r} of split {split!r}"
    return {k: outputs.confine(p, out, what) for k, p in paths.items()}


def _crop_done(out, split, crop_id, image_ext, labels) -> bool:
    for depth16 in (False, True):
        paths = _crop_paths(out, split, crop_id, image_ext, labels, depth16)
        if all(os.path.exists(p) for p in paths.values()):
            return True
    return False


def encode_depth_crop(depth: np.ndarray) -> tuple[np.ndarray, bool]:
    """Depth crop in [0,255] -> (array to write, is 16-bit), without re-normalising."""
    if np.all(depth == np.round(depth)):
        return depth.astype(np.uint8), False
    return np.round(depth.astype(np.float64) * (65535.0 / 255.0)).astype(np.uint16), True


# PIL's default JPEG quality, which the release's crops were written at (docs/release.md).
RELEASE_JPEG_QUALITY = 75
JPEG_OPTIONS = {"quality": RELEASE_JPEG_QUALITY}  # Of the default crops (the records' too).


def write_five_crops(
    source: datasets.ExampleSource,
    out: str,
    split: str,
    *,
    image_format: str = "jpg",
    jpeg_quality: int = RELEASE_JPEG_QUALITY,
) -> int:
    """Writes the five crops of every example of source under out; returns #images cropped."""
    from tqdm import tqdm

    image_ext = {"jpg": ".jpg", "png": ".png"}[image_format]
    pil_format = {"jpg": "JPEG", "png": "PNG"}[image_format]
    labels = all(r.label is not None for r in source.records)
    done = 0
    for i in tqdm(range(len(source)), desc=f"five-crop {split}", unit="img"):
        image_id = source.records[i].id
        crop_ids = [f"{image_id}_{k}" for k in range(NUM_CROPS)]
        if all(_crop_done(out, split, c, image_ext, labels) for c in crop_ids):
            continue
        ex = source[i]
        h, w = ex["image"].shape[:2]
        for crop_id, (t, l, ch, cw) in zip(crop_ids, five_crop_boxes(h, w), strict=True):
            window = (slice(t, t + ch), slice(l, l + cw))
            depth, depth16 = encode_depth_crop(ex["depth"][window])
            paths = _crop_paths(out, split, crop_id, image_ext, labels, depth16)
            files.save_image_atomic(paths["depth"], depth)
            if labels:
                label = np.where(ex["label"][window] < 0, 255, ex["label"][window])
                files.save_image_atomic(paths["label"], label.astype(np.uint8))
            # The image last: its presence (with depth) marks the crop complete.
            options = {"quality": jpeg_quality} if pil_format == "JPEG" else {}
            files.save_image_atomic(paths["image"], ex["image"][window], pil_format, **options)
        done += 1
    return done


def check_out_dir(root: str, out: str) -> None:
    """Refuses an output folder that is the dataset's root or lies inside it: the crops would
    be written among (and later read as) the source images."""
    if depth_io.is_within(out, root):
        raise ValueError(
            f"--out={out} lies inside the source --root={root}: the crops would mix with the "
            "source images; choose a folder outside it"
        )


def define_flags() -> None:
    flags.DEFINE_enum("dataset", None, list(datasets.DATASET_NAMES), "The dataset to crop.")
    flags.DEFINE_string("root", None, "The dataset's root folder.")
    flags.DEFINE_string("split", "train", "Split to crop.")
    flags.DEFINE_string("out", None, "Root of the cropped directory dataset.")
    flags.DEFINE_integer(
        "n_classes",
        0,
        "Label ids at or above this become ignore (255) in the crops. Default (0): 27 for "
        "cocostuff27 and cityscapes27, 3 for potsdam3; directory and synthetic copy every "
        "stored id (< 255) as it is, labelled or not.",
        lower_bound=0,
        upper_bound=KEEP_STORED_IDS,
    )
    flags.DEFINE_enum("image_format", "jpg", ["jpg", "png"], "Crop image format.")
    flags.DEFINE_integer(
        "jpeg_quality",
        RELEASE_JPEG_QUALITY,
        "JPEG quality, 1..95 (75: PIL's default, as released).",
        lower_bound=1,
        upper_bound=95,
    )
    flags.mark_flags_as_required(["dataset", "root", "out"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    n_classes = f.n_classes or DEFAULT_CLASSES.get(f.dataset, KEEP_STORED_IDS)
    try:
        check_out_dir(f.root, f.out)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    source = datasets.make_source(f.dataset, f.root, f.split, n_classes)
    n = write_five_crops(
        source, f.out, f.split, image_format=f.image_format, jpeg_quality=f.jpeg_quality
    )
    print(f"Cropped {n} of {len(source)} images into {f.out} ({len(source) - n} already done)")


if __name__ == "__main__":
    define_flags()
    commands.run_main(main)
