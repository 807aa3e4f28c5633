"""Datasets: image / depth / label triples read from the user's local files.

Every dataset is a list of `Record`s (id, image path, depth stem, label path) wrapped in an
`ExampleSource`, a random-access source (``len`` and ``[i]``) that grain reads directly.
Why grain random-access sources and not TFDS builders: the files already sit on local disk
in their published layouts, so a source only lists paths and decodes on demand; there is no
preparation step, no second copy of 20 GB of COCO, no TensorFlow, and grain's index-based
sampling gives exact per-host sharding and checkpointable iterator state for free.

Example dict (from every dataset)::

    {"id": str, "image": uint8 (H,W,3), "depth": float32 (H,W), "label": int32 (H,W)}

label is a class id in [0, n_classes) or -1 (ignore; all -1 when the dataset has no labels).
Raw label values that the dataset's mapping does not know, and mapped ids >= n_classes, are
set to -1, counted, and reported with a logged warning naming the image and the count.

Depth files and their normalisation
-----------------------------------
Depth for an example lives at ``<depth stem>`` + one of these suffixes (first found wins):

* ``_zoedepth.png``    8-bit PNG, 0 = nearest: used as is (a 16-bit PNG under this name is
  treated like ``_zoedepth_16.png``).
* ``_zoedepth_16.png`` 16-bit PNG, 0 = nearest: multiplied by 255/65535.
* ``_depth.npy``       float array, 0 = nearest: per-image min-max normalised, times 255
  (a constant map gives zeros).

The result is always float32 in [0, 255], 0 = nearest, the same size as the image (another
size is an error naming both sizes). A missing depth file is an error naming the image and
the expected paths. Where each dataset expects its depth (``<split dir>`` as in its images):

* ``directory``/``synthetic``: ``<root>/depth/<split>/<id>_zoedepth.png``
* ``cocostuff27``:  ``<root>/depth/{train2017,val2017}/<image id>_zoedepth.png``
* ``cityscapes27``: ``<root>/depth/<split>/<city>/<name>_leftImg8bit_zoedepth.png``
* ``potsdam3``:     ``<root>/depth/<id>_zoedepth.png`` (ids from the split lists)

The rule behind all of them: the image's path relative to the dataset's image folder
(``images``, ``leftImg8bit``, ``imgs``), extension dropped, under ``<root>/depth/``. That is what
``python -m depthg_jax.data.depth --images=<root>/<image folder> --out=<root>/depth`` writes.

Dataset layouts (``root`` is the folder given as ``data.root``)
-------------------------------------------------------------------
* ``directory``: ``images/<split>/<id>.{jpg,jpeg,png}`` (ids may contain sub-folders),
  optional ``labels/<split>/<id>.png`` (uint8 class ids, 255 = ignore).
* ``cocostuff27``: ``images/{train2017,val2017}/<id>.jpg``, ``annotations/<same>/<id>.png``
  (182 fine ids, 255 = ignore; mapped to 27 coarse classes as STEGO does). Image ids come
  from IIC's curated lists, as the release uses them: ``Coco164kFull_Stuff_Coarse.txt`` for
  train2017 (97,702 ids), ``Coco164kFull_Stuff_Coarse_7.txt`` for val2017 (2,175), shipped in
  the package (``depthg_jax/data/assets``); ``<root>/curated/<split dir>/<list>`` replaces one.
* ``cityscapes27``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; labelIds 7..33 -> 0..26, others ignore.
* ``potsdam3`` (STEGO's preprocessed Potsdam): ``imgs/<id>.mat`` (key ``img``, H,W,4 with
  RGB first), ``gt/<id>.mat`` (key ``gt``, 6 fine classes, 255 = ignore) and split lists
  ``labelled_train.txt`` (train), ``unlabelled_train.txt``, ``labelled_test.txt`` (val),
  ``all.txt``. Fine -> coarse: roads+cars 0, buildings+clutter 1, trees+vegetation 2.
* ``synthetic``: ``directory`` on a root written by `depthg_jax.data.synthetic`.

Ids stay inside the root
------------------------
An id, whether read from a list file (COCO's curated lists, Potsdam's split lists) or found on
disk, must be a relative path without ``..`` parts; the image and label file it names, with
symlinks resolved, must lie inside its layout folder (``images/<split>``, ``imgs``,
``annotations/<split dir>``...) resolved the same way. So a symlinked folder (``images`` ->
``/big/disk/coco/images``) works, while an id or a per-file symlink that leads outside is an
error naming the list, the id and the root, before anything is read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np

from depthg_jax.data import assets, images

DEPTH_SUFFIXES = tuple(images.DEPTH_SUFFIXES.values())
IGNORE = -1
_UNEXPECTED = -2  # Marks raw label values a dataset's mapping does not know.
COCO_SPLIT_DIRS = {"train": "train2017", "val": "val2017"}
# IIC's curated lists as the release uses them (docs/release.md#coco-stuff-lists): it trains
# on the Coarse train list and evaluates on the _7 val list.
COCO_CURATED_LISTS = {
    "train2017": "Coco164kFull_Stuff_Coarse.txt",
    "val2017": "Coco164kFull_Stuff_Coarse_7.txt",
}
COCO_CURATED_SIZES = {"train2017": 97702, "val2017": 2175}
POTSDAM_SPLIT_FILES = {
    "train": ["labelled_train.txt"],
    "unlabelled_train": ["unlabelled_train.txt"],
    "val": ["labelled_test.txt"],
    "train+val": ["labelled_train.txt", "labelled_test.txt"],
    "all": ["all.txt"],
}
DATASET_NAMES = ("cocostuff27", "cityscapes27", "potsdam3", "directory", "synthetic")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    """Where one example's files are. label is None when the dataset has no labels."""

    id: str
    image: str
    depth_stem: str
    label: str | None = None


# --- Readers ---------------------------------------------------------------------------------


def read_label_png(path) -> np.ndarray:
    """Reads a label PNG as its raw integer values (H,W); `images.ImageReadError` naming it."""
    with images.open_image(path, "label") as im:
        return np.asarray(im)


def read_potsdam_label(path: str) -> np.ndarray:
    """Reads a STEGO Potsdam .mat ground truth (key 'gt') as raw integer values (H,W)."""
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(path)["gt"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"Cannot read Potsdam label {path}: {e}") from e


def find_depth_file(depth_stem: str) -> str | None:
    """Returns the first existing depth file for a stem (see module docstring), or None."""
    for suffix in DEPTH_SUFFIXES:
        if os.path.exists(depth_stem + suffix):
            return depth_stem + suffix
    return None


def decode_depth(raw: np.ndarray, path: str) -> np.ndarray:
    """Maps a raw depth array to float32 [0,255], 0 = nearest, by the file's kind."""
    if path.endswith(".npy"):
        d = raw.astype(np.float64)
        if not np.all(np.isfinite(d)):
            raise ValueError(
                f"Depth file {path} holds {int(np.sum(~np.isfinite(d)))} NaN/inf values of "
                f"{d.size}; regenerate it (python -m depthg_jax.data.depth)"
            )
        lo, hi = float(d.min()), float(d.max())
        if hi <= lo:
            return np.zeros(d.shape, np.float32)
        return ((d - lo) / (hi - lo) * 255.0).astype(np.float32)
    if raw.dtype == np.uint8:
        return raw.astype(np.float32)
    if raw.dtype in (np.uint16, np.int32, np.uint32) or np.issubdtype(raw.dtype, np.integer):
        return (raw.astype(np.float64) * (255.0 / 65535.0)).astype(np.float32)
    raise ValueError(f"Depth file {path} has unsupported dtype {raw.dtype}")


def read_depth(depth_stem: str, image_id: str = "") -> np.ndarray:
    """Reads and normalises an example's depth map (float32 (H,W) in [0,255], 0 = nearest)."""
    path = find_depth_file(depth_stem)
    if path is None:
        expected = ", ".join(depth_stem + s for s in DEPTH_SUFFIXES)
        raise FileNotFoundError(
            f"No depth map for image {image_id!r}: expected one of {expected}. "
            "Generate depth with `python -m depthg_jax.data.depth`."
        )
    if path.endswith(".npy"):
        try:
            raw = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"Cannot read depth {path}: {e}") from e
    else:
        with images.open_image(path, "depth") as im:
            raw = np.asarray(im)
    if raw.ndim == 3:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise ValueError(f"Depth {path} has shape {raw.shape}, expected (H,W)")
    return decode_depth(raw, path)


def release_potsdam_depth(depth: np.ndarray) -> np.ndarray:
    """The released Potsdam loader's depth: [0, 255] -> {0, 1} (docs/release.md#potsdam-depth).

    It scales the 8-bit map to [0, 1] (to_tensor) and then casts it to an integer (its label
    transform), so only pixels that were exactly 255 stay 1.
    """
    return np.floor(np.asarray(depth, np.float32) / 255.0).astype(np.float32)


# --- Label mappings --------------------------------------------------------------------------


def make_label_lut(mapping: dict[int, int], ignore_values: Sequence[int] = (255,)) -> np.ndarray:
    """A 256-entry lookup table raw -> class id; ignore_values -> -1, anything else unexpected."""
    lut = np.full(256, _UNEXPECTED, np.int32)
    for raw, cls in mapping.items():
        lut[raw] = cls
    for raw in ignore_values:
        lut[raw] = IGNORE
    return lut


def identity_lut(n_classes: int) -> np.ndarray:
    """Lookup table for labels that are class ids already (255 = ignore)."""
    return make_label_lut({i: i for i in range(min(n_classes, 255))})


def coco_lut() -> np.ndarray:
    """COCO-Stuff 182 fine ids -> 27 coarse classes (STEGO's mapping), 255 -> ignore."""
    fine_to_coarse = assets.dataset_info("cocostuff27")["fine_to_coarse"]
    return make_label_lut(dict(enumerate(fine_to_coarse)))


def cityscapes_lut() -> np.ndarray:
    """Cityscapes labelIds 7..33 -> 0..26; every other id (void classes) -> ignore."""
    lut = np.full(256, IGNORE, np.int32)
    lut[7:34] = np.arange(27)
    return lut


def potsdam_lut() -> np.ndarray:
    """Potsdam 6 fine classes -> 3 coarse (STEGO): {0,4} -> 0, {1,5} -> 1, {2,3} -> 2."""
    fine_to_coarse = assets.dataset_info("potsdam3")["fine_to_coarse"]
    return make_label_lut(dict(enumerate(fine_to_coarse)))


def map_labels(raw: np.ndarray, lut: np.ndarray, n_classes: int) -> tuple[np.ndarray, int]:
    """Maps raw label values to class ids; returns (labels int32 with -1 = ignore, #bad pixels).

    Bad pixels: raw values outside the lookup table's known values, or mapped ids >= n_classes.
    """
    mapped, bad = _lookup(raw, lut, n_classes)
    return np.where(bad, IGNORE, mapped).astype(np.int32), int(bad.sum())


def _lookup(raw: np.ndarray, lut: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mapped values, mask of bad pixels) of raw label values under a lookup table."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        mapped = lut[raw]
    elif raw.size and (raw.min() < 0 or raw.max() > 255):
        inside = (raw >= 0) & (raw <= 255)
        mapped = np.where(inside, lut[np.clip(raw, 0, 255)], _UNEXPECTED)
    else:
        mapped = lut[raw.astype(np.intp)]
    return mapped, (mapped == _UNEXPECTED) | (mapped >= n_classes)


def check_labels(source, n_classes: int | None = None, *, threads: int = 8, shown: int = 3) -> dict:
    """Reads every label file of a split once, before any work; returns what it found.

    `source`: an `ExampleSource` or a prepared `records.RecordSource`. n_classes defaults to
    the source's (and may not exceed it). Raises ValueError naming up to `shown` files (with
    id, bad pixel count and values) when any holds values the dataset's mapping does not know
    or ids >= n_classes; a file that cannot be read raises its reader's error.
    Returns ``total`` (examples), ``labelled`` (with a label file; prepared records store
    unlabelled examples as all-ignore labels, so all of theirs count), ``all_ignore`` (label
    files with no pixel of a class) and ``all_ignore_files`` (the first `shown` of them),
    ``usable`` (labelled minus all_ignore) and ``class_pixels`` (pixels per class id).
    """
    from concurrent.futures import ThreadPoolExecutor

    n_classes = int(n_classes or source.n_classes)
    if n_classes > source.n_classes:  # its lookup table already marks ids >= its own count
        raise ValueError(
            f"check_labels: n_classes={n_classes} is more than the {source.n_classes} the source "
            f"{source.name} was made with; make the source with {n_classes}"
        )
    counts = np.zeros(n_classes, np.int64)

    def scan(index: int):
        where, raw = source.read_raw_label(index)
        if raw is None:
            return None
        mapped, bad = _lookup(raw, source.label_lut, n_classes)
        valid = mapped[~bad & (mapped >= 0)]
        n_bad = int(bad.sum())
        values = np.unique(np.asarray(raw)[bad])[:5].tolist() if n_bad else []
        return where, n_bad, values, np.bincount(valid.ravel(), minlength=n_classes)

    ids, labelled, all_ignore, bad_files = source.ids, 0, [], []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for index, found in enumerate(pool.map(scan, range(len(source)))):
            if found is None:
                continue
            where, n_bad, values, class_pixels = found
            labelled += 1
            counts += class_pixels
            if n_bad:
                bad_files.append(f"{where} (id {ids[index]!r}): {n_bad} pixels of {values}")
            elif not class_pixels.any():
                all_ignore.append(where)
    if bad_files:
        raise ValueError(
            f"{len(bad_files)} of {labelled} label files of {source.name} hold values outside "
            f"the {n_classes} classes: {'; '.join(bad_files[:shown])}"
            f"{'; ...' if len(bad_files) > shown else ''}; fix those files or data.n_classes"
        )
    return {
        "total": len(source),
        "labelled": labelled,
        "all_ignore": len(all_ignore),
        "all_ignore_files": all_ignore[:shown],
        "usable": labelled - len(all_ignore),
        "class_pixels": counts.tolist(),
    }


# --- The source ------------------------------------------------------------------------------


class ExampleSource:
    """Random-access source of example dicts (grain's RandomAccessDataSource protocol)."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        n_classes: int,
        label_lut: np.ndarray,
        name: str,
        read_image_fn: Callable[[str], np.ndarray] = images.read_image,
        read_label_fn: Callable[[str], np.ndarray] = read_label_png,
        release_depth_cast: bool = False,
    ):
        if not records:
            raise ValueError(f"Dataset {name!r} has no examples")
        self.records = list(records)
        self.n_classes = n_classes
        self.label_lut = label_lut
        self.name = name
        self.read_image_fn = read_image_fn
        self.read_label_fn = read_label_fn
        self.release_depth_cast = release_depth_cast

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ExampleSource({self.name!r}, {len(self)} examples)"

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def read_raw_label(self, index: int) -> tuple[str, np.ndarray | None]:
        """(label file, its raw values (H,W)) of an example; (image, None) when it has none."""
        rec = self.records[index]
        if rec.label is None:
            return rec.image, None
        raw = self.read_label_fn(rec.label)
        return rec.label, raw[..., 0] if raw.ndim == 3 else raw

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = self.read_image_fn(rec.image)
        h, w = image.shape[:2]
        depth = read_depth(rec.depth_stem, rec.id)
        if depth.shape != (h, w):
            raise ValueError(
                f"Depth of {rec.id!r} ({find_depth_file(rec.depth_stem)}) is "
                f"{depth.shape[0]}x{depth.shape[1]} (HxW) but the image {rec.image} is {h}x{w}"
            )
        _, raw = self.read_raw_label(index)
        if raw is None:
            label = np.full((h, w), IGNORE, np.int32)
        else:
            if raw.shape != (h, w):
                raise ValueError(
                    f"Label {rec.label} is {raw.shape[0]}x{raw.shape[1]} (HxW) but the image "
                    f"{rec.image} is {h}x{w}"
                )
            label, n_bad = map_labels(raw, self.label_lut, self.n_classes)
            if n_bad:
                log.warning(
                    "%s: %d label pixels of %s are outside the %d classes; set to ignore (-1)",
                    self.name,
                    n_bad,
                    rec.label,
                    self.n_classes,
                )
        if self.release_depth_cast:
            depth = release_potsdam_depth(depth)
        return {"id": rec.id, "image": image, "depth": depth, "label": label}


# --- Listing each dataset's records ----------------------------------------------------------


def check_id(image_id: str, where: str, root: str) -> str:
    """An id as a plain relative path: refuses absolute ones, ``..`` parts and empty ones."""
    parts = image_id.split("/")
    if not image_id or "\0" in image_id or os.path.isabs(image_id) or ".." in parts:
        raise ValueError(
            f"{where}: id {image_id!r} is not a relative path inside the root {root} (no "
            "absolute paths or '..'); fix that entry"
        )
    return image_id


class _Folder:
    """A layout folder of a dataset; `path` joins an id to it and keeps the result inside."""

    def __init__(self, root: str, *parts: str):
        self.root = root
        self.path_ = os.path.join(root, *parts)
        self.real = os.path.realpath(self.path_)

    def path(self, image_id: str, suffix: str, where: str) -> str:
        """<folder>/<id><suffix>; an error naming `where`, the id and the root if the file,
        symlinks resolved, lies outside the folder (itself resolved)."""
        path = os.path.join(self.path_, check_id(image_id, where, self.root) + suffix)
        if "/" in image_id or os.path.islink(path):  # else it is a plain name in the folder
            real = os.path.realpath(path)
            if not (real == self.real or real.startswith(self.real + os.sep)):
                raise ValueError(
                    f"{where}: id {image_id!r} leads to {real}, outside {self.path_} of the root "
                    f"{self.root}; a dataset's files must lie inside its root: fix the entry or "
                    "replace the link by the file"
                )
        return path


def list_directory_records(root: str, split: str) -> list[Record]:
    """Records of a `directory` dataset: every image under images/<split>/, sorted by id."""
    image_dir = os.path.join(root, "images", split)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"No image folder {image_dir} (directory dataset, split {split!r})")
    label_dir = os.path.join(root, "labels", split)
    has_labels = os.path.isdir(label_dir)
    image_folder, label_folder = _Folder(root, "images", split), _Folder(root, "labels", split)
    found: dict[str, str] = {}
    for dirpath, _, files in os.walk(image_dir):
        for fn in files:
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in images.IMAGE_EXTENSIONS or images.is_depth_map(fn):
                continue
            rel = os.path.relpath(os.path.join(dirpath, stem), image_dir).replace(os.sep, "/")
            if rel in found:
                raise ValueError(f"Two images share id {rel!r}: {found[rel]} and {fn}")
            found[rel] = image_folder.path(rel, ext, image_dir)
    if not found:
        raise ValueError(f"Empty split: no .jpg/.jpeg/.png images under {image_dir}")
    records = []
    for image_id in sorted(found):
        label = None
        if has_labels:
            label = label_folder.path(image_id, ".png", label_dir)
            if not os.path.exists(label):
                raise FileNotFoundError(f"Image {found[image_id]} has no label file {label}")
        depth_stem = os.path.join(root, "depth", split, image_id)
        records.append(Record(image_id, found[image_id], depth_stem, label))
    return records


def _read_id_list(paths: Sequence[str]) -> list[str]:
    for p in paths:
        if os.path.exists(p):
            with open(p) as f:
                return [line.strip() for line in f if line.strip()]
    raise FileNotFoundError(f"No image list found; looked for {', '.join(paths)}")


def coco_curated_ids(root: str, split_dir: str) -> tuple[list[str], str]:
    """(ids, where they came from) of the curated list for a COCO split folder.

    `<root>/curated/<split dir>/<list>` replaces the shipped list when present (STEGO's
    download has the same files); a length other than the published split's is a warning.
    """
    name = COCO_CURATED_LISTS.get(split_dir)
    if name is None:
        raise ValueError(
            f"cocostuff27 has curated lists for {sorted(COCO_CURATED_LISTS)}, not {split_dir!r}"
        )
    local = os.path.join(root, "curated", split_dir, name)
    if os.path.exists(local):
        ids, where = _read_id_list([local]), local
    else:
        ids = assets.read_lines("cocostuff27", "curated", split_dir, name)
        where = f"depthg_jax/data/assets/cocostuff27/curated/{split_dir}/{name}"
    if not ids:
        raise ValueError(f"Empty split: the curated list {where} has no ids")
    expected = COCO_CURATED_SIZES[split_dir]
    if len(ids) != expected:
        # A subset is legitimate (debugging, ablations) but not the published protocol.
        log.warning(
            "cocostuff27 %s: %s has %d ids, the published split has %d; results are not "
            "comparable to the published numbers",
            split_dir,
            where,
            len(ids),
            expected,
        )
    return ids, where


def list_coco_records(root: str, split: str) -> list[Record]:
    """Records of COCO-Stuff-27 over IIC's curated list for the split ("train"/"val").

    Every listed image must be on disk: a missing one is an error naming the list and image.
    """
    split_dir = COCO_SPLIT_DIRS.get(split, split)
    ids, where = coco_curated_ids(root, split_dir)
    image_dir = os.path.join(root, "images", split_dir)
    image_folder = _Folder(root, "images", split_dir)
    label_folder = _Folder(root, "annotations", split_dir)
    image_paths = [image_folder.path(i, ".jpg", where) for i in ids]
    labels = [label_folder.path(i, ".png", where) for i in ids]
    on_disk = set(os.listdir(image_dir)) if os.path.isdir(image_dir) else set()
    missing = [i for i in ids if i + ".jpg" not in on_disk]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) of the curated list {where} are not on disk, e.g. "
            f"{os.path.join(image_dir, missing[0] + '.jpg')}"
        )
    return [
        Record(i, image, os.path.join(root, "depth", split_dir, i), label)
        for i, image, label in zip(ids, image_paths, labels, strict=True)
    ]


def list_cityscapes_records(root: str, split: str) -> list[Record]:
    """Records of Cityscapes (fine annotations), ids '<city>/<name>', sorted."""
    image_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"No Cityscapes image folder {image_dir}")
    image_folder, label_folder = _Folder(root, "leftImg8bit", split), _Folder(root, "gtFine", split)
    records = []
    for city in sorted(os.listdir(image_dir)):
        city_dir = os.path.join(image_dir, city)
        if not os.path.isdir(city_dir):
            continue
        for fn in sorted(os.listdir(city_dir)):
            if not fn.endswith("_leftImg8bit.png"):
                continue
            name = fn[: -len("_leftImg8bit.png")]
            image = image_folder.path(f"{city}/{name}", "_leftImg8bit.png", image_dir)
            label = label_folder.path(f"{city}/{name}", "_gtFine_labelIds.png", image_dir)
            if not os.path.exists(label):
                raise FileNotFoundError(f"Image {image} has no label {label}")
            depth_stem = os.path.join(root, "depth", split, city, fn[: -len(".png")])
            records.append(Record(f"{city}/{name}", image, depth_stem, label))
    if not records:
        raise ValueError(f"Empty split: no *_leftImg8bit.png under {image_dir}")
    return records


def list_potsdam_records(root: str, split: str) -> list[Record]:
    """Records of STEGO's Potsdam over the split's list files; unlabelled ids have no label."""
    if split not in POTSDAM_SPLIT_FILES:
        raise ValueError(f"Unknown Potsdam split {split!r}; one of {sorted(POTSDAM_SPLIT_FILES)}")
    image_folder, label_folder = _Folder(root, "imgs"), _Folder(root, "gt")
    records = []
    for fn in POTSDAM_SPLIT_FILES[split]:
        where = os.path.join(root, fn)
        for i in _read_id_list([where]):
            image = image_folder.path(i, ".mat", where)
            label = label_folder.path(i, ".mat", where)
            depth_stem = os.path.join(root, "depth", i)
            records.append(Record(i, image, depth_stem, label if os.path.exists(label) else None))
    if not records:
        raise ValueError(f"Empty split: Potsdam split {split!r} lists no ids")
    return records


def list_records(name: str, root: str, split: str) -> list[Record]:
    """Records of a named dataset's split (see the module docstring for each layout)."""
    if name in ("directory", "synthetic"):
        return list_directory_records(root, split)
    if name == "cocostuff27":
        return list_coco_records(root, split)
    if name == "cityscapes27":
        return list_cityscapes_records(root, split)
    if name == "potsdam3":
        return list_potsdam_records(root, split)
    raise ValueError(f"Unknown dataset {name!r}; one of {DATASET_NAMES}")


def make_source(
    name: str, root: str, split: str, n_classes: int, *, release_depth_cast: bool = False
) -> ExampleSource:
    """The random-access example source of a dataset split.

    release_depth_cast: depth as the released Potsdam loader sees it (`release_potsdam_depth`);
    set by the config for potsdam3 under objective="reference".
    """
    if not root:
        raise ValueError(f"Dataset {name!r} needs data.root (the dataset folder)")
    records = list_records(name, root, split)
    readers: dict = {}
    if name == "cocostuff27":
        lut = coco_lut()
    elif name == "cityscapes27":
        lut = cityscapes_lut()
    elif name == "potsdam3":
        lut = potsdam_lut()
        readers = {"read_label_fn": read_potsdam_label}
    else:
        lut = identity_lut(n_classes)
    return ExampleSource(
        records,
        n_classes=n_classes,
        label_lut=lut,
        name=f"{name}:{split}",
        release_depth_cast=release_depth_cast,
        **readers,
    )
