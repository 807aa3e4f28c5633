"""Potsdam-3 (STEGO's preprocessed ISPRS Potsdam, 3 coarse classes) as a TFDS builder."""

from __future__ import annotations

from depthg_jax.data import assets
from depthg_jax.data.builders import base


class Potsdam3(base.DepthGBuilder):
    """Potsdam-3: train = the labelled train tiles (not cropped), eval = the labelled test."""

    DATASET = "potsdam3"
    CLASS_NAMES = tuple(assets.dataset_info("potsdam3")["classes"])
    IMAGE_ENCODING = "png"  # The .mat tiles are stored as lossless PNG of their RGB bands.
    BUILDER_CONFIGS = [
        base.DepthGConfig(
            name="train",
            description="The labelled_train.txt tiles, uncropped (the release does not crop).",
            splits=("train",),
        ),
        base.DepthGConfig(name="eval", description="The labelled_test.txt tiles.", splits=("val",)),
    ]
    REQUIRED = (
        ("imgs", "<id>.mat tiles, key 'img' (H,W,4, RGB first)"),
        ("gt", "<id>.mat ground truth, key 'gt' (6 fine classes, 255 = ignore)"),
        ("labelled_train.txt", "ids of the train split, one a line"),
        ("labelled_test.txt", "ids of the val split, one a line"),
        ("depth", "depth maps, <id>_zoedepth.png"),
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Pass --manual_dir=<dataset folder> holding STEGO's preprocessed Potsdam (potsdam.zip):
  imgs/<id>.mat (key 'img'), gt/<id>.mat (key 'gt'),
  labelled_train.txt (train ids), labelled_test.txt (val ids),
  depth/<id>_zoedepth.png
      (depth maps of the RGB tiles, see docs/data.md)
"""
