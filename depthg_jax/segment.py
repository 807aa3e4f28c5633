"""Segment images and videos with an exported model and write pictures of the result.

python -m depthg_jax.segment --checkpoint=DIR --images=PATH --out=DIR [--res=0]
    [--batch_size=8] [--probe=cluster|linear] [--assignment=results.json] [--names=FILE]
    [--crf] [--smooth=0.0] [--unverified]

--images is one image or video file, a folder (walked recursively) or a quoted glob
("photos/**/*.jpg"). Images are any of `data.images.IMAGE_EXTENSIONS`; videos any of
`data.video.VIDEO_EXTENSIONS` (decoded with PyAV). Every input goes through
`depthg_jax.inference.Segmenter` (the Python API): EXIF orientation applied (labels match what a
viewer shows; a video's display rotation likewise), resized to res x res, segmented in batches
(flip-averaged code, as in evaluation), optionally refined by the dense CRF, and the label map
resized back (nearest) to the input's own size. Under --out, mirroring the input folders:
  labels/<name>.png   class (or cluster) id per pixel, 8-bit grey
  color/<name>.png    the ids coloured with the dataset's colour map (a fixed palette otherwise)
  overlay/<name>.png  the image and the colour mask blended over it, side by side (a legend of
                      the names below when --names or --assignment names the ids)
and for a video <name>/ (its stem): overlay.mp4 (the blend, H.264 at the source frame rate,
every frame) and labels/<frame, 6 digits>.png. --smooth=a in [0, 1) smooths a video's
probabilities across frames (p_t = a * p_(t-1) + (1 - a) * q_t) before the argmax: less flicker.
<name> is the input's stem, or its whole name (a.jpg.png) when two inputs share a stem.
--out inside the folder (or the glob's folder) of --images is refused.
Files are written to a temporary name and renamed, so none is ever half-written. Unreadable
images are reported and skipped (exit status 1); a video that cannot be decoded is an error
before any work starts (exit status 2).

Cluster ids are not classes: --assignment=<evaluate's <export>/eval/results.json> (or a labelled
training run's <workdir>/results.json) colours clusters by their Hungarian-matched class;
--names=FILE (one name per line, in id order) names the ids in the overlay legend.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from depthg_jax import commands, inference
from depthg_jax.data import images as images_lib
from depthg_jax.data import palette, video
from depthg_jax.runtime import checkpoint, files

OVERLAY_ALPHA = 0.5
LEGEND_CELL = (150, 18)  # width, height of one legend entry (px)
SegmentError = inference.InputError
GLOB_CHARS = "*?["


# --- Inputs ------------------------------------------------------------------------------------


def find_inputs(spec: str) -> tuple[Path, list[Path]]:
    """(base folder, inputs relative to it) of a file, a folder (recursive) or a glob.

    Inputs are images and videos, sorted; hidden files and folders and depth maps are skipped.
    """
    path = Path(spec)
    if path.is_file():
        return path.parent, [Path(path.name)]
    if path.is_dir():
        found = [path / rel for rel in _walk(path)]
        base = path
    elif any(c in spec for c in GLOB_CHARS):
        base = _glob_base(spec)
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        found = [p for p in found if _is_input(p.name)]
    else:
        raise SegmentError(f"--images={spec} is not a file, a folder or a glob that exists")
    rels = sorted(p.relative_to(base) for p in found)
    if not rels:
        kinds = "/".join(images_lib.IMAGE_EXTENSIONS + video.VIDEO_EXTENSIONS)
        raise SegmentError(f"no images or videos ({kinds}) found under {spec}")
    return base, rels


def _is_input(name: str) -> bool:
    if name.startswith(".") or images_lib.is_depth_map(name):
        return False
    suffix = Path(name).suffix.lower()
    return suffix in images_lib.IMAGE_EXTENSIONS or suffix in video.VIDEO_EXTENSIONS


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [(Path(dirpath) / n).relative_to(root) for n in filenames if _is_input(n)]
    return found


def _glob_base(spec: str) -> Path:
    """The folder a glob starts from: its leading components without wildcards."""
    parts = []
    for part in Path(spec).parts:
        if any(c in part for c in GLOB_CHARS):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def output_names(rels: list[Path], suffix: str = ".png") -> dict[Path, Path]:
    """Output name of each input: <stem><suffix>, or <name><suffix> (a.jpg.png) for inputs that
    share a stem, so none overwrites another. Raises SegmentError if two would still share one."""
    stems: dict[Path, list[Path]] = {}
    for rel in rels:
        stems.setdefault(rel.with_suffix(suffix), []).append(rel)
    names = {}
    for name, group in stems.items():
        for rel in group:
            names[rel] = name if len(group) == 1 else rel.with_name(rel.name + suffix)
    claimed: dict[Path, list[Path]] = {}
    for rel, name in names.items():
        claimed.setdefault(name, []).append(rel)
    clashes = {str(n): [str(r) for r in rs] for n, rs in claimed.items() if len(rs) > 1}
    if clashes:
        raise SegmentError(f"inputs would overwrite each other's outputs: {clashes}; rename them")
    return names


def check_out_dir(images_dir: str | Path, out_dir: str) -> None:
    """--out inside the inputs' folder is refused: the next run would segment its own outputs."""
    if Path(os.path.realpath(out_dir)).is_relative_to(os.path.realpath(images_dir)):
        raise SegmentError(
            f"--out={out_dir} lies inside --images={images_dir}: the outputs would be read as "
            "inputs next time; choose a folder outside it"
        )


# --- Pictures ----------------------------------------------------------------------------------


def blend(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    mixed = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colour
    return np.round(mixed).astype(np.uint8)


def make_overlay(image: np.ndarray, colour: np.ndarray, legend=None) -> np.ndarray:
    """[image | colour mask blended over the image], side by side, the legend (if any) below."""
    overlay = np.concatenate([image, blend(image, colour)], axis=1)
    return overlay if legend is None else stack_legend(overlay, legend)


def render_legend(names: list[str], colours: np.ndarray, width: int) -> np.ndarray:
    """A white strip `width` px wide: a colour swatch and the name of each id, in rows."""
    from PIL import Image, ImageDraw

    cell_w, cell_h = LEGEND_CELL
    per_row = max(1, width // cell_w)
    rows = -(-len(names) // per_row)
    canvas = Image.new("RGB", (width, rows * cell_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        x, y = (i % per_row) * cell_w + 4, (i // per_row) * cell_h + 4
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in colours[i]))
        draw.text((x + 17, y + 1), f"{i} {name}", fill=(0, 0, 0))
    return np.asarray(canvas)


def stack_legend(picture: np.ndarray, legend: tuple[list[str], np.ndarray]) -> np.ndarray:
    names, colours = legend
    return np.concatenate([picture, render_legend(names, colours, picture.shape[1])], axis=0)


def write_outputs(out: Path, image: np.ndarray, ids: np.ndarray, colours, name: Path, legend=None):
    """Writes labels/, color/ and overlay/ pictures of one image under its output name."""
    colour = palette.colorize(ids, colours)
    files.save_image_atomic(out / "labels" / name, ids.astype(np.uint8))
    files.save_image_atomic(out / "color" / name, colour)
    files.save_image_atomic(out / "overlay" / name, make_overlay(image, colour, legend))


# --- Running -----------------------------------------------------------------------------------


class Job:
    """What a segment run writes, and how it colours and names ids."""

    def __init__(self, seg: inference.Segmenter, out: Path, mapping, names, colours):
        self.seg, self.out, self.mapping, self.colours = seg, out, mapping, colours
        self.legend = None if names is None else (names, colours)

    def ids(self, labels: np.ndarray) -> np.ndarray:
        return labels if self.mapping is None else self.mapping[labels]

    def images(self, base: Path, rels: list[Path], names: dict, bar) -> tuple[int, list[str]]:
        errors: list[str] = []
        written = 0
        size = self.seg.batch_size
        for start in range(0, len(rels), size):
            chunk, originals = [], []
            for rel in rels[start : start + size]:
                try:
                    originals.append(inference.read_image(base / rel))
                    chunk.append(rel)
                except SegmentError as e:
                    errors.append(str(e))
                    bar.update(1)
            for rel, result in zip(chunk, self.seg.predict(originals), strict=True):
                write_outputs(
                    self.out, result.image, self.ids(result.labels), self.colours, names[rel],
                    self.legend,
                )  # fmt: skip
                written += 1
                bar.update(1)
        return written, errors

    def video(self, path: Path, name: Path, info: video.VideoInfo, smoothing: float) -> int:
        """Segments every frame; writes <name>/overlay.mp4 and <name>/labels/*.png."""
        folder = self.out / name
        writer = video.VideoWriter(folder / "overlay.mp4", info.rate)
        frames = 0
        try:
            for result in self.seg.predict_stream(video.read_frames(path), smoothing=smoothing):
                ids = self.ids(result.labels)
                mask = folder / "labels" / f"{frames:06d}.png"
                files.save_image_atomic(mask, ids.astype(np.uint8))
                picture = blend(result.image, palette.colorize(ids, self.colours))
                writer.write(picture if self.legend is None else stack_legend(picture, self.legend))
                frames += 1
        except BaseException:
            writer.abandon()
            raise
        writer.close()
        return frames


def segment_folder(
    checkpoint_dir: str,
    images: str,
    out_dir: str,
    *,
    res: int | None = None,
    batch_size: int = 8,
    probe: str = "cluster",
    assignment: str | None = None,
    names_file: str | None = None,
    use_crf: bool = False,
    smoothing: float = 0.0,
    unverified: bool = False,
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Segments every input named by `images`; returns (inputs written, error messages)."""
    from tqdm import tqdm

    if not 0.0 <= smoothing < 1.0:
        raise SegmentError(f"--smooth={smoothing} must be in [0, 1)")
    base, rels = find_inputs(images)
    if not Path(images).is_file():
        check_out_dir(base, out_dir)
    stills = [r for r in rels if not video.is_video(r)]
    clips = [r for r in rels if video.is_video(r)]
    infos = {}
    for rel in clips:  # every video is decoded once before any work
        try:
            infos[rel] = video.probe(base / rel)
        except video.VideoError as e:
            raise SegmentError(str(e)) from e
    still_names = output_names(stills)
    clip_names = output_names(clips, suffix="")
    seg = inference.Segmenter.load(
        checkpoint_dir, probe=probe, crf=use_crf, res=res, batch_size=batch_size,
        unverified=unverified,
    )  # fmt: skip
    n = seg.n_classes
    mapping, names = None, None
    if assignment:
        if probe != "cluster":
            raise SegmentError("--assignment applies to --probe=cluster only")
        selection = checkpoint.load_selection(checkpoint_dir) or {}
        mapping = inference.load_assignment(assignment, n, step=selection.get("step"))
        names = seg.class_names  # the ids are classes now
    elif probe == "cluster":
        print(
            "note: colouring clusters by id; pass --assignment=<evaluate's results.json> to "
            "colour them by their matched class",
            file=sys.stderr,
        )
    if names_file:
        names = inference.read_names(names_file, n)
    job = Job(seg, Path(out_dir), mapping, names, palette.palette_for(seg.config.data.name, n))
    bar = tqdm(total=len(stills), desc="segment", unit="img", disable=not progress or not stills)
    try:
        written, errors = job.images(base, stills, still_names, bar)
        for rel in clips:
            frames = job.video(base / rel, clip_names[rel], infos[rel], smoothing)
            print(f"{rel}: {frames} frames at {float(infos[rel].rate):g} fps -> "
                  f"{Path(out_dir) / clip_names[rel]}/")  # fmt: skip
            written += 1
    finally:
        bar.close()
        seg.close()
    return written, errors


FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("checkpoint", None, "An export directory.", flag_values=fv)
    flags.DEFINE_string(
        "images", None, "An image or video file, a folder (recursive) or a quoted glob.",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_integer(
        "res", 0, "Model input side (px; 0: the export's data.eval_res).", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 8, "Images (or frames) per forward pass.", flag_values=fv)
    flags.DEFINE_enum(
        "probe", "cluster", ["cluster", "linear"], "Which probe labels pixels.", flag_values=fv
    )
    flags.DEFINE_string(
        "assignment", None,
        "evaluate's <export>/eval/results.json, or a labelled training run's results.json: "
        "colours clusters by their matched class.",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "names", None, "A text file naming the ids, one per line (overlay legend).", flag_values=fv
    )
    flags.DEFINE_bool("crf", False, "Refine with the dense CRF.", flag_values=fv)
    flags.DEFINE_float(
        "smooth", 0.0, "Video: moving-average weight of the previous frames' probabilities, "
        "in [0, 1) (0: off).", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_bool(
        "unverified", False, "Load an export that has no MANIFEST.json.", flag_values=fv
    )
    flags.mark_flags_as_required(["checkpoint", "images", "out"], flag_values=fv)


def run(fv: flags.FlagValues = FLAGS) -> int:
    """Segments as the flags say; returns the exit status (2: bad input, 1: unreadable images)."""
    try:
        written, errors = segment_folder(
            fv.checkpoint,
            fv.images,
            fv.out,
            res=fv.res or None,
            batch_size=fv.batch_size,
            probe=fv.probe,
            assignment=fv.assignment,
            names_file=fv.names,
            use_crf=fv.crf,
            smoothing=fv.smooth,
            unverified=fv.unverified,
        )
    except SegmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} segmentations under {fv.out}")
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
