"""The generic `directory` layout (images, optional labels, depth per split) as a TFDS builder."""

from __future__ import annotations

import os

from depthg_jax.data.builders import base


class Directory(base.DepthGBuilder):
    """Any dataset in the directory layout: train = five-crops of train, eval = every split."""

    DATASET = "directory"
    CLASS_NAMES = ()  # Unknown: labels are stored as the class ids the files hold.
    IMAGE_ENCODING = None  # The files' own encodings (JPEG or PNG).
    BUILDER_CONFIGS = [
        base.DepthGConfig(
            name="train",
            description="Five-crops of the images of images/train/.",
            five_crop=True,
            splits=("train",),
        ),
        base.DepthGConfig(
            name="eval", description="The images of every split folder under images/, uncropped."
        ),
    ]
    REQUIRED = (("images", "one folder per split: images/<split>/<id>.{jpg,jpeg,png}"),)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Pass --manual_dir=<dataset folder> in the directory layout, one folder per split:
  images/<split>/<id>.{jpg,jpeg,png}      (ids may contain sub-folders)
  labels/<split>/<id>.png                 (optional: uint8 class ids, 255 = ignore)
  depth/<split>/<id>_zoedepth.png
      (python -m depthg_jax.data.depth --images=<folder>/images --out=<folder>/depth)
The train config five-crops images/train/; the eval config holds every split uncropped.
"""

    def split_names(self, root: str) -> tuple[str, ...]:
        if self.builder_config.splits:
            return self.builder_config.splits
        image_dir = os.path.join(root, "images")
        return tuple(
            sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
        )
