"""Picture summaries written during training: image | depth | cluster prediction | label (the
label column only when the batch has labels)."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from depthg_jax.data import palette
from depthg_jax.evaluation.reports import make_grid
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import files


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """Depth (H, W) in [0, 255], 0 = nearest, as a grey RGB image (near = bright)."""
    grey = (255 - np.clip(depth, 0, 255)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def write_image_summary(
    workdir: str,
    step: int,
    params: dict,
    config: ml_collections.ConfigDict,
    loader,
    val_result: dict | None,
    max_images: int = 4,
) -> str | None:
    """Writes `<workdir>/images/step_<step>.png` from the first evaluation batch (process 0).

    Cluster ids are mapped to classes with the latest validation's Hungarian assignment when
    it has one (label-free runs have none: clusters keep their ids' colours).
    """
    if jax.process_index() != 0:
        return None
    batch = next(iter(loader))
    valid = np.asarray(batch["valid"], bool)
    images = np.asarray(batch["image"])[valid][:max_images]
    if len(images) == 0:
        return None
    out = model_lib.predict(params, images, model_lib.ModelSpec.from_config(config), False)
    clusters = np.asarray(jax.device_get(out["cluster_log_probs"])).argmax(-1)
    if val_result is not None and "assignment" in val_result.get("cluster", {}):
        clusters = np.asarray(val_result["cluster"]["assignment"])[clusters]
    colours = palette.palette_for(config.data.name, config.data.n_classes)
    depth = np.asarray(batch["depth"])[valid][: len(images)]
    labels = np.asarray(batch["label"])[valid][: len(images)]
    has_labels = bool((labels >= 0).any())
    rows = [
        [images[i], colorize_depth(depth[i]), palette.colorize(clusters[i], colours)]
        + ([palette.colorize(labels[i], colours)] if has_labels else [])
        for i in range(len(images))
    ]
    directory = os.path.join(workdir, "images")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step:06d}.png")
    files.save_image_atomic(path, make_grid(rows))
    return path
