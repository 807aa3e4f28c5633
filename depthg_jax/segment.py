"""Segment a folder of images with an exported model and write pictures of the result.

python -m depthg_jax.segment --checkpoint=DIR --images=DIR --out=DIR [--res=320]
    [--batch_size=8] [--probe=cluster|linear] [--assignment=results.json] [--crf]

Every image under --images (recursively, any size; `data.images.IMAGE_EXTENSIONS`) is resized
to res x res, segmented (flip-averaged code, as in evaluation), optionally refined by the
dense CRF, and the label map is resized back (nearest) to the image's own size. For each
image, under --out, mirroring the input folders:
  labels/<name>.png   class (or cluster) id per pixel, 8-bit grey
  color/<name>.png    the ids coloured with the dataset's colour map (a fixed palette otherwise)
  overlay/<name>.png  the image and the colour mask blended over it, side by side
<name> is the image's stem, or its whole name (a.jpg.png) when two inputs share a stem.
--out inside --images is refused.
Files are written to a temporary name and renamed, so none is ever half-written. Unreadable
images are reported and skipped; the exit status is then 1.

Cluster ids are not classes: pass --assignment=<evaluate's results.json> to colour clusters by
their Hungarian-matched class (else clusters get the palette by id).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from depthg_jax import commands
from depthg_jax.data import images as images_lib
from depthg_jax.data import palette
from depthg_jax.evaluation import crf
from depthg_jax.models import model as model_lib
from depthg_jax.models import variants
from depthg_jax.runtime import checkpoint, files

OVERLAY_ALPHA = 0.5


class SegmentError(Exception):
    """A problem with the inputs that stops the run; the message says what to fix."""


def find_images(root: str) -> list[Path]:
    """All images under root (recursive, sorted), as paths relative to root."""
    if not Path(root).is_dir():
        raise SegmentError(f"--images={root} is not a directory")
    found = images_lib.find_images(root)
    if not found:
        raise SegmentError(
            f"no {'/'.join(images_lib.IMAGE_EXTENSIONS)} images found under {root}"
        )
    return found


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3); raises SegmentError naming the file if it cannot be decoded."""
    try:
        return images_lib.read_image(path)
    except ValueError as e:
        raise SegmentError(str(e)) from e


def resize_rgb(image: np.ndarray, res: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((res, res), Image.BILINEAR))


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an id map (ids < 256) to (H, W)."""
    im = Image.fromarray(labels.astype(np.uint8), mode="L")
    return np.asarray(im.resize((size_hw[1], size_hw[0]), Image.NEAREST))


def make_overlay(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """[image | colour mask blended over the image], side by side, at the image's size."""
    blend = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colour
    return np.concatenate([image, np.round(blend).astype(np.uint8)], axis=1)


def load_assignment(path: str, n_classes: int) -> np.ndarray:
    """The cluster -> class map from evaluate's results.json (the CRF one if present)."""
    try:
        with open(path) as f:
            saved = json.load(f)
        entry = saved.get("cluster_crf") or saved["cluster"]
        assignment = np.asarray(entry["assignment"], np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SegmentError(
            f"--assignment={path}: not an evaluate results.json with a cluster assignment ({e})"
        ) from e
    if assignment.shape != (n_classes,):
        raise SegmentError(
            f"--assignment={path} maps {assignment.size} clusters, but the checkpoint has "
            f"{n_classes} classes: it belongs to another model"
        )
    return assignment


class Segmenter:
    """Holds the loaded model; `labels(images, count)` maps uint8 (B, res, res, 3) to the ids
    (count, res, res) of the first `count` images (the rest is padding)."""

    def __init__(self, checkpoint_dir: str, *, probe: str, use_crf: bool, res: int):
        try:
            config, params = checkpoint.load_export(checkpoint_dir)
        except (FileNotFoundError, ValueError) as e:
            raise SegmentError(f"checkpoint {checkpoint_dir}: {e}") from e
        patch = variants.patch_size(config.model.variant)
        if res % patch or res <= 0:
            raise SegmentError(
                f"--res={res} must be a positive multiple of the patch size {patch} "
                f"of {config.model.variant}"
            )
        if probe not in ("cluster", "linear"):
            raise SegmentError(f"--probe={probe!r}; use 'cluster' or 'linear'")
        self.config, self.params = config, params
        self.probe, self.use_crf = probe, use_crf
        self.n_classes = int(config.data.n_classes)
        self.pool = None
        self.spec = model_lib.ModelSpec.from_config(config)

    def labels(self, images: np.ndarray, count: int) -> np.ndarray:
        out = model_lib.predict(self.params, images, self.spec, True)
        key = "cluster_log_probs" if self.probe == "cluster" else "linear_logits"
        scores = np.asarray(out[key])[:count]
        if not self.use_crf:
            return scores.argmax(-1).astype(np.int32)
        if self.pool is None:
            self.pool = crf.make_crf_pool()
        return crf.dense_crf_batch(images[:count], scores, self.pool)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def output_names(rels: list[Path]) -> dict[Path, Path]:
    """Output name (under labels/, color/, overlay/) of each input: <stem>.png, or
    <name>.png (suffix kept, e.g. a.jpg.png) for inputs that share a stem, so none overwrites
    another. Raises SegmentError if two inputs would still share one."""
    stems: dict[Path, list[Path]] = {}
    for rel in rels:
        stems.setdefault(rel.with_suffix(".png"), []).append(rel)
    names = {}
    for name, group in stems.items():
        for rel in group:
            names[rel] = name if len(group) == 1 else rel.with_name(rel.name + ".png")
    claimed: dict[Path, list[Path]] = {}
    for rel, name in names.items():
        claimed.setdefault(name, []).append(rel)
    clashes = {str(n): [str(r) for r in rs] for n, rs in claimed.items() if len(rs) > 1}
    if clashes:
        raise SegmentError(f"inputs would overwrite each other's outputs: {clashes}; rename them")
    return names


def check_out_dir(images_dir: str, out_dir: str) -> None:
    """--out inside --images is refused: the next run would segment its own outputs."""
    if Path(os.path.realpath(out_dir)).is_relative_to(os.path.realpath(images_dir)):
        raise SegmentError(
            f"--out={out_dir} lies inside --images={images_dir}: the outputs would be read as "
            "inputs next time; choose a folder outside it"
        )


def write_outputs(
    out: Path, rel: Path, image: np.ndarray, ids: np.ndarray, colours, name: Path | None = None
) -> None:
    """Writes labels/, color/ and overlay/ pictures of one image (name: its output name)."""
    name = name or rel.with_suffix(".png")
    colour = palette.colorize(ids, colours)
    files.save_image_atomic(out / "labels" / name, ids.astype(np.uint8))
    files.save_image_atomic(out / "color" / name, colour)
    files.save_image_atomic(out / "overlay" / name, make_overlay(image, colour))


def segment_folder(
    checkpoint_dir: str,
    images_dir: str,
    out_dir: str,
    *,
    res: int = 320,
    batch_size: int = 8,
    probe: str = "cluster",
    assignment: str | None = None,
    use_crf: bool = False,
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Segments every image under images_dir; returns (number written, error messages)."""
    from tqdm import tqdm

    if batch_size <= 0:
        raise SegmentError(f"--batch_size={batch_size} must be positive")
    check_out_dir(images_dir, out_dir)
    rels = find_images(images_dir)
    names = output_names(rels)
    model = Segmenter(checkpoint_dir, probe=probe, use_crf=use_crf, res=res)
    mapping = None
    if assignment:
        if probe != "cluster":
            raise SegmentError("--assignment applies to --probe=cluster only")
        mapping = load_assignment(assignment, model.n_classes)
    elif probe == "cluster":
        print(
            "note: colouring clusters by id; pass --assignment=<evaluate results.json> to colour "
            "them by their matched class",
            file=sys.stderr,
        )
    colours = palette.palette_for(model.config.data.name, model.n_classes)
    out = Path(out_dir)
    errors: list[str] = []
    written = 0
    bar = tqdm(total=len(rels), desc="segment", unit="img", disable=not progress)
    try:
        for start in range(0, len(rels), batch_size):
            chunk, originals = [], []
            for rel in rels[start : start + batch_size]:
                try:
                    originals.append(read_rgb(Path(images_dir) / rel))
                    chunk.append(rel)
                except SegmentError as e:
                    errors.append(str(e))
                    bar.update(1)
            if not chunk:
                continue
            batch = np.zeros((batch_size, res, res, 3), np.uint8)  # fixed shape: one compile
            for i, image in enumerate(originals):
                batch[i] = resize_rgb(image, res)
            ids = model.labels(batch, len(chunk))
            for rel, image, label in zip(chunk, originals, ids, strict=True):
                if mapping is not None:
                    label = mapping[label]
                full = resize_labels(label, image.shape[:2])
                write_outputs(out, rel, image, full, colours, names[rel])
                written += 1
                bar.update(1)
    finally:
        bar.close()
        model.close()
    return written, errors


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("checkpoint", None, "An export directory.", flag_values=fv)
    flags.DEFINE_string("images", None, "Folder of images (recursive).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_integer("res", 320, "Model input side (px).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", flag_values=fv)
    flags.DEFINE_enum(
        "probe", "cluster", ["cluster", "linear"], "Which probe labels pixels.", flag_values=fv
    )
    flags.DEFINE_string(
        "assignment", None, "evaluate's results.json (colours clusters by class).", flag_values=fv
    )
    flags.DEFINE_bool("crf", False, "Refine with the dense CRF.", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "images", "out"], flag_values=fv)


def run(fv: flags.FlagValues = FLAGS) -> int:
    """Segments as the flags say; returns the exit status (2: bad input, 1: unreadable images)."""
    try:
        written, errors = segment_folder(
            fv.checkpoint,
            fv.images,
            fv.out,
            res=fv.res,
            batch_size=fv.batch_size,
            probe=fv.probe,
            assignment=fv.assignment,
            use_crf=fv.crf,
        )
    except SegmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} segmentations under {fv.out} (labels/, color/, overlay/)")
    if errors:
        print(f"{len(errors)} image(s) could not be read:", file=sys.stderr)
        for message in errors:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sys.exit(run())


if __name__ == "__main__":
    define_flags()
    commands.run_main(main)
