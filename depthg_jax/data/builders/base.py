"""Shared TFDS builder of the DepthG datasets: one prepared, versioned copy in ArrayRecord.

Each dataset's builder reads the user's local download (its ``manual_dir`` is the dataset
folder in the layout `depthg_jax.data.datasets` documents) through the same listing,
readers, label lookup tables and depth normalisation as the loose-file path, and writes
ArrayRecord shards that `depthg_jax.data.records` reads with grain (no TensorFlow).

Builder configs (the split as the release trains and evaluates on it):

* ``train``: the five-crops of the training split (4 corners + centre, half height and width,
  ids ``<id>_0`` .. ``<id>_4``, geometry and JPEG settings of `depthg_jax.data.five_crop`),
  in the order of the loose five-crop folder (ids sorted); Potsdam: the images uncropped.
* ``eval``: the original images of the evaluation split, in the loose path's order.

Every example: ``id`` (text), ``image`` (uint8 RGB; the original file's bytes where it is an
RGB JPEG/PNG, else lossless PNG; five-crops as JPEG), ``depth`` (8-bit PNG, 0 = nearest, the
depth model named by the config's ``depth_model``; float depth is rounded to 8 bits),
``label`` (8-bit PNG of class ids, 255 = ignore). The dataset info records the class names,
ids of every split (in record order), and split sizes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from depthg_jax.data import datasets, five_crop

log = logging.getLogger(__name__)

LABEL_IGNORE = 255  # Stored label value of ignored pixels (read back as -1).
DEPTH_MODEL = "zoedepth"  # What made the depth maps: the release's ZoeDepth ZoeD_N.


@dataclasses.dataclass
class DepthGConfig(tfds.core.BuilderConfig):
    """five_crop: store the five-crops of each image; splits: the loose-path splits held."""

    five_crop: bool = False
    depth_model: str = DEPTH_MODEL
    splits: tuple[str, ...] = ()


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg_crop(array: np.ndarray) -> bytes:
    """A five-crop's JPEG bytes, encoded exactly as `five_crop.write_five_crops` writes them."""
    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(array))
    image.save(buf, format="JPEG", **five_crop.JPEG_OPTIONS)
    return buf.getvalue()


def original_image_bytes(path: str) -> bytes | None:
    """The file's bytes when PIL reads it as RGB JPEG/PNG (decodes to the same array), else None."""
    try:
        with Image.open(path) as im:
            keep = im.format in ("JPEG", "PNG") and im.mode == "RGB"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # Not an image PIL opens (e.g. a .mat): encoded from the decoded array.
    if not keep:
        return None
    with open(path, "rb") as f:
        return f.read()


def depth_to_uint8(depth: np.ndarray) -> tuple[np.ndarray, bool]:
    """Normalised depth in [0,255] -> (uint8, whether rounding changed any value)."""
    rounded = np.clip(np.round(depth), 0, 255)
    return rounded.astype(np.uint8), bool(np.any(rounded != depth))


def label_to_uint8(label: np.ndarray) -> np.ndarray:
    return np.where(label < 0, LABEL_IGNORE, label).astype(np.uint8)


class DepthGBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the DepthG dataset builders (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: train = five-crops, eval = original images."}
    # Set by each dataset: the loose-path name, classes, image encoding and required folders.
    DATASET = ""
    CLASS_NAMES: tuple[str, ...] = ()
    IMAGE_ENCODING: str | None = "png"
    REQUIRED = ()  # (relative path, what goes there) that must exist in the manual dir.

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @property
    def n_classes(self) -> int:
        return len(self.CLASS_NAMES)

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(
            shape=(None, None, 3), dtype=np.uint8, encoding_format=self.IMAGE_ENCODING
        )
        if self.builder_config.five_crop:
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": image,
                    "depth": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # Records in key order = the loose path's order.
        )

    # --- Manual download -----------------------------------------------------------------

    def check_manual_dir(self, root: str) -> None:
        """Raises FileNotFoundError naming every missing part of the download and where it goes."""
        missing = [
            f"  {os.path.join(root, rel)}  ({what})"
            for rel, what in self.REQUIRED
            if not os.path.exists(os.path.join(root, rel))
        ]
        if missing:
            raise FileNotFoundError(
                f"The {self.name} download in {root} is incomplete; missing:\n"
                + "\n".join(missing)
                + f"\n\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )

    def split_names(self, root: str) -> tuple[str, ...]:
        """The loose-path splits this config holds (directory: found on disk)."""
        return self.builder_config.splits

    def loose_source(self, root: str, split: str) -> datasets.ExampleSource:
        """The loose-file source the records are made from (labels kept as stored class ids)."""
        n = self.n_classes or LABEL_IGNORE  # directory: keep every id < 255; read-time n applies.
        return datasets.make_source(self.DATASET, root, split, n)

    # --- Generation ----------------------------------------------------------------------

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        self.check_manual_dir(root)
        generators, ids = {}, {}
        for split in self.split_names(root):
            source = self.loose_source(root, split)
            if self.builder_config.five_crop:
                crop_ids = [f"{i}_{k}" for i in source.ids for k in range(five_crop.NUM_CROPS)]
                ids[split] = sorted(crop_ids)  # The loose five-crop folder's order.
            else:
                ids[split] = source.ids
            generators[split] = self._generate_examples(source, split, ids[split])
        self.info.metadata.update(
            {
                "class_names": list(self.CLASS_NAMES),
                "n_classes": self.n_classes,
                "label_ignore": LABEL_IGNORE,
                "depth_model": self.builder_config.depth_model,
                "five_crop": self.builder_config.five_crop,
                "ids": ids,
            }
        )
        return generators

    def _generate_examples(self, source: datasets.ExampleSource, split: str, ids: list[str]):
        from tqdm import tqdm

        position = {i: k for k, i in enumerate(ids)}
        rounded = 0
        desc = f"{self.name}/{self.builder_config.name} {split}"
        for i in tqdm(range(len(source)), desc=desc, unit="img"):
            rec = source.records[i]
            ex = source[i]
            if self.builder_config.five_crop:
                h, w = ex["image"].shape[:2]
                boxes = five_crop.five_crop_boxes(h, w)
                for k, (t, left, ch, cw) in enumerate(boxes):
                    window = (slice(t, t + ch), slice(left, left + cw))
                    depth, changed = depth_to_uint8(ex["depth"][window])
                    rounded += changed
                    crop_id = f"{rec.id}_{k}"
                    yield (
                        position[crop_id],
                        {
                            "id": crop_id,
                            "image": encode_jpeg_crop(ex["image"][window]),
                            "depth": encode_png(depth),
                            "label": encode_png(label_to_uint8(ex["label"][window])),
                        },
                    )
            else:
                image = original_image_bytes(rec.image)
                depth, changed = depth_to_uint8(ex["depth"])
                rounded += changed
                yield (
                    position[rec.id],
                    {
                        "id": rec.id,
                        "image": image if image is not None else encode_png(ex["image"]),
                        "depth": encode_png(depth),
                        "label": encode_png(label_to_uint8(ex["label"])),
                    },
                )
        if rounded:
            log.warning(
                "%s %s: %d depth maps were not 8-bit and were rounded to 8 bits",
                self.name,
                split,
                rounded,
            )
