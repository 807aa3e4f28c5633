"""Segment images from Python with a trained export: `Segmenter.load(export_dir)`, then
`seg.predict(images)`. The `segment` and `evaluate` commands are built on it.

Example (runs as is once the demo, `python -m depthg_jax.main --config=configs/demo.py
--workdir=workdir/demo`, has written its export)::

    import numpy as np
    from depthg_jax import inference

    seg = inference.Segmenter.load("workdir/demo/export")
    photo = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    result = seg.predict(photo)  # also a PIL image, a path, or a list of any of these
    print(result.labels.shape)   # (240, 320): one cluster id per pixel of the photo
    print(result.probs.shape)    # (224, 224, 6): the probe's probabilities at the model input
    print(result.code.shape)     # (28, 28, 32): the head's code on the feature grid
    seg.close()

What `predict` does with each image:
1. Reads it. A path goes through the package's image reader (`data.images.read_image`), then
   its EXIF orientation is applied as `PIL.ImageOps.exif_transpose` applies it, so the labels
   match the photo as a viewer shows it; a PIL image is transposed the same way; a uint8 array
   (H, W), (H, W, 3) or (H, W, 4) is taken as it is (alpha dropped).
2. Resizes it to res x res (bilinear; the aspect ratio is not kept) and batches `batch_size`
   images, the last batch padded, so the model compiles once per batch shape.
3. Runs backbone, head and the chosen probe on the code averaged with the horizontally flipped
   image's flipped code (`flip`), as evaluation does; optionally refines with the dense CRF.
4. Resizes the label map back to the image's own size (nearest neighbour).

Cluster ids are not classes: `load_assignment` reads the Hungarian matching that `evaluate`
(or a labelled training run) found, to map clusters to classes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from depthg_jax.data import images as images_lib
from depthg_jax.data import palette
from depthg_jax.evaluation import crf as crf_lib
from depthg_jax.models import model as model_lib
from depthg_jax.models import partitioning, variants
from depthg_jax.runtime import checkpoint, sharding, xla

# PIL's EXIF orientation (tag 0x0112) -> the numpy operation that shows the image upright.
EXIF_ORIENTATION_TAG = 0x0112
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
PROBES = ("cluster", "linear")


class InputError(ValueError):
    """A problem with the inputs or the export; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What `Segmenter.predict` returns for one image.

    labels: (H, W) int32 ids at the image's size (after EXIF orientation): cluster ids for the
      cluster probe, class ids for the linear probe (after the CRF when the segmenter has one).
    probs: (res, res, n) float32, the probe's per-pixel probabilities at the model input (before
      the CRF; temporally smoothed in `predict_stream` when asked).
    code: (res/p, res/p, dim) float32, the head's code on the feature grid (flip-averaged).
    image: (H, W, 3) uint8, the RGB image that was segmented.
    """

    labels: np.ndarray
    probs: np.ndarray
    code: np.ndarray
    image: np.ndarray


# --- Reading inputs ----------------------------------------------------------------------------


def orient(pixels: np.ndarray, orientation: int | None) -> np.ndarray:
    """The pixels as an EXIF `orientation` (1-8) says to show them (PIL's exif_transpose)."""
    op = _ORIENT.get(int(orientation or 1))
    return pixels if op is None else np.ascontiguousarray(op(pixels))


def exif_orientation(path) -> int:
    """The EXIF orientation tag of an image file (1 when it has none or cannot say)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except (OSError, SyntaxError, ValueError):
        return 1  # the reader then names the file


def read_image(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image file, upright (EXIF orientation applied).

    Raises InputError naming the file when it cannot be decoded."""
    try:
        pixels = images_lib.read_image(path)
    except ValueError as e:
        raise InputError(str(e)) from e
    if Path(path).suffix.lower() == ".mat":
        return pixels
    return orient(pixels, exif_orientation(path))


def to_rgb(image) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a path, a PIL image or a uint8 array (see the module docstring)."""
    if isinstance(image, str | os.PathLike):
        return read_image(image)
    if isinstance(image, Image.Image):
        upright = ImageOps.exif_transpose(image)
        if upright.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
            buffer = io.BytesIO()  # the package's reader scales 16-bit and names 32-bit modes
            upright.save(buffer, format="TIFF")
            buffer.seek(0)
            try:
                return images_lib.read_image(buffer)
            except ValueError as e:
                raise InputError(str(e)) from e
        return np.asarray(upright.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(
            f"an image array is {array.dtype}; predict takes uint8 RGB (0..255): scale and cast "
            "it (np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1])"
        )
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and min(array.shape[:2]) > 0:
        return np.ascontiguousarray(array[..., :3])
    raise InputError(f"an image array has shape {array.shape}; expected (H, W), (H, W, 3|4)")


def resize_rgb(image: np.ndarray, res: int) -> np.ndarray:
    """The model input: the image resized to res x res (bilinear)."""
    return np.asarray(Image.fromarray(image).resize((res, res), Image.BILINEAR))


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map (ids < 256) to (H, W), int32."""
    im = Image.fromarray(np.asarray(labels).astype(np.uint8), mode="L")
    return np.asarray(im.resize((size_hw[1], size_hw[0]), Image.NEAREST)).astype(np.int32)


# --- Cluster -> class assignments ---------------------------------------------------------------


def load_assignment(path: str, n_classes: int, *, step: int | None = None) -> np.ndarray:
    """The cluster -> class map (n_classes,) of a results.json.

    Takes `evaluate`'s report (<export>/eval/results.json: the CRF assignment when it has one)
    and a training run's summary (<workdir>/results.json: the final validation's assignment,
    written when training validated on labels). `step`: the step of the export the map will be
    applied to; a map found on another step's head is refused.
    """
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"--assignment={path}: cannot read it as JSON ({e})") from e
    if not isinstance(saved, dict):
        raise InputError(f"--assignment={path}: not a results.json (a JSON object)")
    kind = saved.get("kind", "evaluation report")
    entry = saved.get("cluster_crf") or saved.get("cluster")
    if kind == "training summary":
        entry = saved.get("assignment")
        if entry is None:
            why = (
                "it is a sweep's summary (no single head)" if "members" in saved
                else "the run validated without labels, so its clusters were never matched to "
                "classes" if saved.get("validation") == "label-free"
                else "it was written before training recorded assignments"
            )  # fmt: skip
            raise InputError(
                f"--assignment={path} is a training summary without a cluster assignment: "
                f"{why}. Run `python -m depthg_jax.evaluate --checkpoint=<export>` on labelled "
                "data and pass its <export>/eval/results.json, or leave --assignment out (clusters "
                "are then coloured by id; --names=FILE names them)"
            )
    elif kind != "evaluation report" or not isinstance(entry, dict) or "assignment" not in entry:
        scored = "no labelled images were scored" if saved.get("labels") == "none" else ""
        raise InputError(
            f"--assignment={path} holds no cluster assignment"
            + (f" ({scored})" if scored else "")
            + ": pass evaluate's <export>/eval/results.json from labelled data, or a labelled "
            "training run's <workdir>/results.json"
        )
    try:
        assignment = np.asarray(entry["assignment"], np.int64)
    except (TypeError, ValueError) as e:
        raise InputError(f"--assignment={path}: its assignment is not a list of ids ({e})") from e
    if assignment.shape != (n_classes,):
        raise InputError(
            f"--assignment={path} maps {assignment.size} clusters, but the checkpoint has "
            f"{n_classes} classes: it belongs to another model"
        )
    found_step = entry.get("step", (saved.get("checkpoint") or {}).get("step"))
    if step is not None and found_step is not None and int(found_step) != int(step):
        raise InputError(
            f"--assignment={path} was found on the head of step {found_step}, but the checkpoint "
            f"holds step {step}: evaluate this checkpoint and pass its eval/results.json"
        )
    return assignment


def read_names(path: str, n: int) -> list[str]:
    """Cluster (or class) names, one per line in id order: exactly n non-empty lines."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise InputError(f"--names={path}: {e.strerror}") from e
    if len(names) != n:
        raise InputError(
            f"--names={path} has {len(names)} names; the checkpoint has {n} ids: give one name "
            "per line, in id order"
        )
    return names


# --- The segmenter -----------------------------------------------------------------------------


@xla.jit(static_argnames=("spec", "flip", "probe"))
def _forward(params, images, spec, flip: bool, probe: str):
    """(labels (B, res, res), log-probabilities (B, res, res, n), code) of a padded batch."""
    out = model_lib.predict(params, images, spec, flip)
    if probe == "cluster":
        scores, log_probs = out["cluster_log_probs"], out["cluster_log_probs"]
    else:
        scores, log_probs = out["linear_logits"], jax.nn.log_softmax(out["linear_logits"])
    return jnp.argmax(scores, axis=-1).astype(jnp.int32), log_probs, out["code"]


class Segmenter:
    """A loaded export and how to run it; see the module docstring. Build with `load`."""

    def __init__(self, config, params, *, probe="cluster", crf=False, res=None, batch_size=8,
                 flip=True):  # fmt: skip
        # On the first mesh.model devices, the backbone split over them as in training.
        model = sharding.model_axis(config)
        if model > jax.local_device_count():
            raise InputError(
                f"the export was trained with mesh.model={model}: running it needs {model} "
                f"devices, this host has {jax.local_device_count()}"
            )
        self.mesh = sharding.make_mesh(jax.local_devices()[:model], model=model)
        self.config, self.params = config, partitioning.place_params(params, self.mesh)
        self.spec = model_lib.ModelSpec.from_config(config)
        self.n_classes = self.spec.n_classes
        patch = variants.patch_size(self.spec.variant)
        res = int(config.data.eval_res if res is None else res)
        if res <= 0 or res % patch:
            raise InputError(
                f"--res={res} must be a positive multiple of the patch size {patch} of "
                f"{self.spec.variant}"
            )
        if probe not in PROBES:
            raise InputError(f"--probe={probe!r}; use 'cluster' or 'linear'")
        if batch_size <= 0:
            raise InputError(f"--batch_size={batch_size} must be positive")
        self.probe, self.crf, self.res = probe, bool(crf), res
        self.batch_size, self.flip = int(batch_size), bool(flip)
        self._pool = None

    @classmethod
    def load(
        cls,
        export_dir: str,
        *,
        probe: str = "cluster",
        crf: bool = False,
        res: int | None = None,
        batch_size: int = 8,
        flip: bool = True,
        unverified: bool = False,
    ) -> Segmenter:
        """Loads an export (`python -m depthg_jax.export`, or a training run's W/export).

        probe: "cluster" (unsupervised ids) or "linear" (classes; needs labelled training).
        crf: refine each label map with the dense CRF (slower). res: the model's input side
        (default: the export's data.eval_res). batch_size: images per forward pass. flip:
        average with the flipped image's code. The export's files are verified against its
        MANIFEST.json; one without a manifest is refused unless `unverified=True`.
        """
        try:
            config, params = checkpoint.load_export(export_dir, unverified=unverified)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"checkpoint {export_dir}: {e}") from e
        return cls(config, params, probe=probe, crf=crf, res=res, batch_size=batch_size, flip=flip)

    @property
    def class_names(self) -> list[str]:
        """The training data's class names (generic ones for clusters of unlabelled data)."""
        return palette.class_names(self.config.data.name, self.n_classes)

    def predict(self, images):
        """Segments images: one (a path, a PIL image, an array) -> a `Prediction`; a list (or a
        (B, H, W, 3) uint8 array) -> a list of them, in order. Any size; see the module doc."""
        single = isinstance(images, str | os.PathLike) or not isinstance(
            images, Sequence | np.ndarray
        )
        if isinstance(images, np.ndarray):
            single = images.ndim < 4
        items = [images] if single else list(images)
        results = list(self.predict_stream(to_rgb(x) for x in items))
        return results[0] if single else results

    def predict_stream(
        self, images: Iterable[np.ndarray], *, smoothing: float = 0.0
    ) -> Iterator[Prediction]:
        """Predictions of a stream of uint8 RGB arrays (video frames), batch by batch, in order.

        smoothing in [0, 1): an exponential moving average of the probabilities across the
        stream, p_t = smoothing * p_(t-1) + (1 - smoothing) * q_t, before the argmax (and
        CRF); 0 leaves each image on its own.
        """
        if not 0.0 <= smoothing < 1.0:
            raise InputError(f"smoothing (segment --smooth) = {smoothing} must be in [0, 1)")
        previous = None
        batch: list[np.ndarray] = []
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                results, previous = self._predict_batch(batch, smoothing, previous)
                yield from results
                batch = []
        if batch:
            results, _ = self._predict_batch(batch, smoothing, previous)
            yield from results

    def _predict_batch(self, originals: list[np.ndarray], smoothing: float, previous):
        inputs = np.zeros((self.batch_size, self.res, self.res, 3), np.uint8)
        for i, image in enumerate(originals):
            inputs[i] = resize_rgb(image, self.res)
        labels, log_probs, code = jax.device_get(
            _forward(
                self.params,
                jax.device_put(inputs, sharding.replicated(self.mesh)),
                spec=self.spec,
                flip=self.flip,
                probe=self.probe,
            )
        )
        count = len(originals)
        probs = np.exp(log_probs[:count].astype(np.float32))
        if smoothing:
            for i in range(count):
                if previous is not None:
                    probs[i] = smoothing * previous + (1 - smoothing) * probs[i]
                previous = probs[i]
            labels = probs.argmax(-1).astype(np.int32)
        else:
            labels = labels[:count]
        if self.crf:
            if self._pool is None:
                self._pool = crf_lib.make_crf_pool()
            scores = np.log(np.maximum(probs, 1e-30)) if smoothing else log_probs[:count]
            labels = crf_lib.dense_crf_batch(inputs[:count], scores, self._pool)
        results = [
            Prediction(
                labels=resize_labels(labels[i], image.shape[:2]),
                probs=probs[i],
                code=np.asarray(code[i], np.float32),
                image=image,
            )
            for i, image in enumerate(originals)
        ]
        return results, previous

    def close(self) -> None:
        """Stops the CRF's worker processes (if any were started)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Segmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
