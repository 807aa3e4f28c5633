"""COCO-Stuff-27 (STEGO's curated lists, 27 coarse classes) as a TFDS builder."""

from __future__ import annotations

from depthg_jax.data import assets, datasets
from depthg_jax.data.builders import base

_TRAIN_LIST = datasets.COCO_CURATED_LISTS["train2017"]
_VAL_LIST = datasets.COCO_CURATED_LISTS["val2017"]


class Cocostuff27(base.DepthGBuilder):
    """COCO-Stuff-27: train = five-crops of the curated train2017 list, eval = val2017."""

    DATASET = "cocostuff27"
    CLASS_NAMES = tuple(assets.dataset_info("cocostuff27")["classes"])
    IMAGE_ENCODING = "jpeg"
    BUILDER_CONFIGS = [
        base.DepthGConfig(
            name="train",
            description="Five-crops of the curated train2017 images.",
            five_crop=True,
            splits=("train",),
        ),
        base.DepthGConfig(
            name="eval", description="The curated val2017 images, uncropped.", splits=("val",)
        ),
    ]
    REQUIRED = (
        ("images/train2017", "the COCO 2017 train images, <image id>.jpg"),
        ("images/val2017", "the COCO 2017 val images, <image id>.jpg"),
        ("annotations/train2017", "COCO-Stuff 164k fine label PNGs, <image id>.png"),
        ("annotations/val2017", "COCO-Stuff 164k fine label PNGs, <image id>.png"),
        ("depth/train2017", "depth maps, <image id>_zoedepth.png"),
        ("depth/val2017", "depth maps, <image id>_zoedepth.png"),
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Pass --manual_dir=<dataset folder> holding COCO-Stuff 164k in this layout:
  images/train2017/<image id>.jpg, images/val2017/<image id>.jpg   (COCO 2017 images)
  annotations/train2017/<image id>.png, annotations/val2017/<image id>.png
      (COCO-Stuff fine label PNGs from stuffthingmaps_trainval2017.zip: 182 ids, 255 = ignore)
  depth/train2017/<image id>_zoedepth.png, depth/val2017/<image id>_zoedepth.png
      (python -m depthg_jax.data.depth --images=<folder>/images --out=<folder>/depth)
  optional: curated/train2017/{_TRAIN_LIST}, curated/val2017/{_VAL_LIST}
      (replace IIC's curated lists, which ship with the package)
Only the images named by the curated lists are read; every one must be on disk.
"""
