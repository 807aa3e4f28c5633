"""Five-crop preparation (SPEC §8): every image of a split -> 4 corner crops + 1 centre crop.

Crops are half the image's height and width (floor): top-left, top-right, bottom-left,
bottom-right, centre (top = round((H - h) / 2), as torchvision's five_crop), written as
ids ``<id>_0`` .. ``<id>_4`` in the `directory` layout under --out:

  images/<split>/<id>_<k>.jpg (or .png), labels/<split>/<id>_<k>.png (class ids already
  mapped, 255 = ignore; only when the dataset has labels), depth/<split>/<id>_<k>_zoedepth.png.

Depth is cropped from the normalised map and not re-normalised: stored as 8-bit when every
value is a whole number (8-bit sources), else as ``_zoedepth_16.png`` (x 65535/255, rounded).
Each file is written atomically (temporary name, then rename); an image whose crops all
exist is skipped, so an interrupted run resumes and a finished one is a no-op.
Train on the result with data.name="directory", data.root=<out>.

    python -m depthg_jax.data.five_crop --dataset=cocostuff27 --root=DIR --split=train --out=DIR
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from depthg_jax import files
from depthg_jax.data import datasets

NUM_CROPS = 5
JPEG_OPTIONS = {"quality": 95}  # PIL save options of the JPEG crops (records use them too).
DEFAULT_CLASSES = {"cocostuff27": 27, "cityscapes27": 27, "potsdam3": 3}


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
    suffix = "_zoedepth_16.png" if depth16 else "_zoedepth.png"
    paths["depth"] = os.path.join(out, "depth", split, crop_id + suffix)
    if labels:
        paths["label"] = os.path.join(out, "labels", split, crop_id + ".png")
    return paths


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


def write_five_crops(
    source: datasets.ExampleSource, out: str, split: str, *, image_format: str = "jpg"
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
            options = JPEG_OPTIONS if pil_format == "JPEG" else {}
            files.save_image_atomic(paths["image"], ex["image"][window], pil_format, **options)
        done += 1
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=datasets.DATASET_NAMES)
    parser.add_argument("--root", required=True, help="The dataset's root folder.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True, help="Root of the cropped directory dataset.")
    parser.add_argument("--n_classes", type=int, default=0, help="Default: the dataset's.")
    parser.add_argument("--image_format", default="jpg", choices=("jpg", "png"))
    args = parser.parse_args(argv)
    n_classes = args.n_classes or DEFAULT_CLASSES.get(args.dataset, 0)
    if n_classes < 1:
        parser.error(f"--n_classes is required for dataset {args.dataset!r}")
    source = datasets.make_source(args.dataset, args.root, args.split, n_classes)
    n = write_five_crops(source, args.out, args.split, image_format=args.image_format)
    print(f"Cropped {n} of {len(source)} images into {args.out} ({len(source) - n} already done)")


if __name__ == "__main__":
    main()
