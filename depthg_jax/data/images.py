"""File naming and image reading for every dataset, command and the segmenter: one place.

- `IMAGE_EXTENSIONS`: what counts as an input image.
- `DEPTH_SUFFIXES`: how a depth map is named after its image (`<rel stem><suffix>`), by format.
- `find_images`: the images under a folder (never depth maps, hidden files or symlinked folders).
- `read_image`: uint8 RGB from any of them, including STEGO's Potsdam `.mat` files and 16-bit
  grayscale PNGs; a file that cannot be read is an `ImageReadError` naming it.
- `open_image`: PIL's open for every other PNG read in data/ (labels, depth maps), with the same
  errors.

An image over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 M pixels: a
14000 x 14000 PNG of a few hundred KB would decode to 588 MB) is an `ImageReadError` before
anything is decoded; a caller that trusts its files may raise that limit.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".mat")
# Depth map formats and their file-name suffixes; reading tries them in this order.
DEPTH_SUFFIXES = {"png8": "_zoedepth.png", "png16": "_zoedepth_16.png", "npy": "_depth.npy"}
_DEPTH_PNG_SUFFIXES = (DEPTH_SUFFIXES["png8"], DEPTH_SUFFIXES["png16"])
# PIL modes holding 16-bit samples: scaled to 8 bits (x 255/65535), not clipped to white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(ValueError):
    """An image, label or depth file that cannot be decoded; `path` names it (segment skips it)."""

    def __init__(self, path, reason: str, what: str = "image"):
        self.path = path
        super().__init__(f"Cannot read {what} {_describe(path)}: {reason}")


def _describe(path) -> str:
    if isinstance(path, str | os.PathLike):
        return os.fspath(path)
    return "from in-memory bytes"


@contextlib.contextmanager
def open_image(path, what: str = "image") -> Iterator[Image.Image]:
    """PIL's `Image.open`, decoded on entry; any failure is an `ImageReadError` naming the file.

    Refuses an image of more pixels than `PIL.Image.MAX_IMAGE_PIXELS` (PIL itself only refuses
    twice that, and warns between the two).
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            if limit and im.width * im.height > limit:
                raise ImageReadError(path, _bomb_reason(f"{im.width}x{im.height}", limit), what)
            im.load()  # Decode now: a truncated file fails here, not later.
            yield im
    except Image.DecompressionBombError as e:
        size = re.search(r"\((\d+) pixels\)", str(e))  # "Image size (N pixels) exceeds..."
        reason = _bomb_reason(size.group(1) if size else "its", limit)
        raise ImageReadError(path, reason, what) from e
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(path, str(e), what) from e


def _bomb_reason(size: str, limit: int | None) -> str:
    return (
        f"{size} pixels is over PIL's decompression-bomb limit of {limit} pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS); downscale the file, or raise that limit if you trust it"
    )


def is_depth_map(name: str) -> bool:
    """True for a depth PNG written beside images (never an input image)."""
    return name.lower().endswith(_DEPTH_PNG_SUFFIXES)


def depth_path(stem: str | os.PathLike, fmt: str = "png8") -> str:
    """The depth file of an image stem in a format ("png8", "png16", "npy")."""
    if fmt not in DEPTH_SUFFIXES:
        raise ValueError(f"depth format {fmt!r}; expected one of {sorted(DEPTH_SUFFIXES)}")
    return os.fspath(stem) + DEPTH_SUFFIXES[fmt]


def find_images(images_dir: str | os.PathLike) -> list[Path]:
    """Every image under `images_dir` as a path relative to it, sorted.

    Walks sub-folders (not symlinked ones); skips hidden files and folders and depth maps.
    """
    root = Path(images_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if is_depth_map(name):
                continue
            found.append((Path(dirpath) / name).relative_to(root))
    return sorted(found)


def read_image(path) -> np.ndarray:
    """Reads an image as uint8 RGB (H, W, 3), fully decoded, with no EXIF rotation.

    No EXIF transpose: depth and labels must align with the raw pixel array. 16-bit grayscale
    is scaled to 8 bits; 32-bit integer or float images are refused by name (their range is
    unknown). `.mat` files (STEGO's Potsdam) hold an (H, W, C) array under "img": the first 3
    channels, floats scaled by 255 and truncated as torchvision's to_pil_image does.
    Raises `ImageReadError` (a ValueError) naming the file on any failure, including an image
    over PIL's decompression-bomb limit.
    """
    if isinstance(path, str | os.PathLike):  # else a binary file object (prepared records)
        path = Path(path)
        if path.suffix.lower() == ".mat":
            return _read_mat_image(path)
    with open_image(path) as im:
        if im.mode in _SIXTEEN_BIT_MODES:
            grey = np.asarray(im).astype(np.uint32)
            grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        if im.mode in ("I", "F"):
            raise ImageReadError(
                path,
                f"PIL mode {im.mode!r} (32-bit samples) has no known 8-bit range; "
                "save it as 8-bit RGB",
            )
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def potsdam_to_uint8(img: np.ndarray) -> np.ndarray:
    """As STEGO's `to_pil_image`: uint8 kept, floats scaled by 255 and truncated (clipped here)."""
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(img.astype(np.float64) * 255.0, 0, 255).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8)


def _read_mat_image(path: Path) -> np.ndarray:
    from scipy.io import loadmat  # Only Potsdam needs it.

    try:
        arr = np.asarray(loadmat(path)["img"])
    except KeyError as e:
        raise ImageReadError(path, ".mat file has no 'img' array") from e
    except (OSError, ValueError) as e:
        raise ImageReadError(path, str(e)) from e
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ImageReadError(path, f"Potsdam image of shape {arr.shape}, expected (H,W,>=3)")
    return potsdam_to_uint8(arr[..., :3])
