"""Cityscapes-27 (fine annotations, labelIds 7..33) as a TFDS builder."""

from __future__ import annotations

from depthg_jax.data import assets
from depthg_jax.data.builders import base


class Cityscapes27(base.DepthGBuilder):
    """Cityscapes-27: train = five-crops of the fine train split, eval = the val split."""

    DATASET = "cityscapes27"
    CLASS_NAMES = tuple(assets.dataset_info("cityscapes27")["classes"])
    IMAGE_ENCODING = "png"
    BUILDER_CONFIGS = [
        base.DepthGConfig(
            name="train",
            description="Five-crops of the fine-annotated train images.",
            five_crop=True,
            splits=("train",),
        ),
        base.DepthGConfig(name="eval", description="The val images, uncropped.", splits=("val",)),
    ]
    REQUIRED = (
        ("leftImg8bit/train", "leftImg8bit_trainvaltest.zip: <city>/<name>_leftImg8bit.png"),
        ("leftImg8bit/val", "leftImg8bit_trainvaltest.zip: <city>/<name>_leftImg8bit.png"),
        ("gtFine/train", "gtFine_trainvaltest.zip: <city>/<name>_gtFine_labelIds.png"),
        ("gtFine/val", "gtFine_trainvaltest.zip: <city>/<name>_gtFine_labelIds.png"),
        ("depth/train", "depth maps, <city>/<name>_leftImg8bit_zoedepth.png"),
        ("depth/val", "depth maps, <city>/<name>_leftImg8bit_zoedepth.png"),
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Pass --manual_dir=<dataset folder> holding Cityscapes (cityscapes-dataset.com, login needed):
  leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png      (leftImg8bit_trainvaltest.zip)
  gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png       (gtFine_trainvaltest.zip)
  depth/{train,val}/<city>/<name>_leftImg8bit_zoedepth.png
      (python -m depthg_jax.data.depth --images=<folder>/leftImg8bit --out=<folder>/depth)
"""
