"""The train/eval transform (docs/data.md) shared by the pipeline and the KNN command.

Resize the shorter side to R with nearest-neighbour sampling (pixel centres, as PIL's
NEAREST; the longer side becomes int(R * long / short) as torchvision's Resize), then centre
crop R x R (top = round((h' - R) / 2)). Image, depth and label are sampled at the same
pixels, so they stay aligned. Only the R x R output pixels are gathered. Source indices are
computed exactly; PIL's 16.16 fixed point differs (rounds down) only when an output pixel
centre falls exactly on a source pixel edge.
"""

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def compute_resize_crop_indices(h: int, w: int, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns of the res x res output of resize-shorter-side + centre crop."""
    if h <= w:
        new_h, new_w = res, int(res * w / h)
    else:
        new_h, new_w = int(res * h / w), res
    top = int(round((new_h - res) / 2.0))
    left = int(round((new_w - res) / 2.0))
    # Pixel-centre nearest, in exact integer arithmetic: floor((2i + 1) * h / (2 * new_h)).
    rows = ((2 * (top + np.arange(res)) + 1) * h) // (2 * new_h)
    cols = ((2 * (left + np.arange(res)) + 1) * w) // (2 * new_w)
    return np.minimum(rows, h - 1), np.minimum(cols, w - 1)


def resize_center_crop(example: dict, res: int) -> dict:
    """Applies the train/eval transform to an example's image, depth and label (same pixels)."""
    h, w = example["image"].shape[:2]
    rows, cols = compute_resize_crop_indices(h, w, res)
    return {
        "image": _gather(example["image"], rows, cols),
        "depth": _gather(example["depth"], rows, cols).astype(np.float32, copy=False),
        "label": _gather(example["label"], rows, cols).astype(np.int32, copy=False),
    }


def _gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x[rows][:, cols], as plain slices when the indices are consecutive (no resize)."""
    if rows[-1] - rows[0] == len(rows) - 1:
        x = x[rows[0] : rows[-1] + 1]
    else:
        x = np.take(x, rows, axis=0)
    if cols[-1] - cols[0] == len(cols) - 1:
        return x[:, cols[0] : cols[-1] + 1]
    return np.take(x, cols, axis=1)


def normalize_images(images):
    """uint8 (...,3) RGB -> float32 ImageNet-normalised (what the DINO backbone expects).

    Plain array arithmetic, so it serves NumPy batches on the host and traced jax arrays
    inside jitted steps alike (torchvision ToTensor + Normalize).
    """
    return (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
