"""What a run shows besides its scalars: picture grids (image | depth | prediction | label, with
column titles, the depth colour scale from near to far and the class colours named underneath)
written to `<workdir>/images/`, and for TensorBoard the resolved config as text, the
hyperparameters of the run or of each sweep member (HParams dashboard), and at each
validation the picture grid and the confusion pictures. Label-free runs get grids without
the label column and clusters in their ids' colours."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from depthg_jax import config as config_lib
from depthg_jax.data import palette
from depthg_jax.evaluation import pictures, reports
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import files

# Depth maps hold 0 = nearest .. 255 = farthest; near is drawn bright (viridis yellow).
DEPTH_ENDS = ("near", "far")
MIN_TILE = 112  # tiles narrower than this are enlarged (nearest) so their titles fit


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """Depth (H, W) in [0, 255], 0 = nearest, as RGB: viridis, near yellow, far dark purple."""
    near_to_far = np.clip(np.asarray(depth, np.float64), 0, 255) / 255.0
    return pictures.apply_colour_map(1.0 - near_to_far)


def titled_grid(
    rows: list[list[np.ndarray]],
    titles: list[str],
    *,
    depth_column: int | None = None,
    classes: tuple[list[str], np.ndarray] | None = None,
    pad: int = 2,
) -> np.ndarray:
    """make_grid with a title above each column, a near-to-far colour scale under the depth
    column's title, and the class colours named underneath (classes: (names, colours))."""
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    scale = -(-MIN_TILE // w) if w < MIN_TILE else 1
    if scale > 1:
        rows = [[tile.repeat(scale, 0).repeat(scale, 1) for tile in row] for row in rows]
        h, w = h * scale, w * scale
    body = reports.make_grid(rows, pad)
    title_size = 13
    title_h = pictures.text_size("Ag", title_size)[1] + 8
    legend_h = 16 if depth_column is not None else 0
    header = Image.new("RGB", (body.shape[1], title_h + legend_h), pictures.BACKGROUND)
    draw = ImageDraw.Draw(header)
    for c, title in enumerate(titles):
        x = pad + c * (w + pad)
        pictures.draw_text(draw, (x + w // 2, 4), title, title_size, anchor="ma")
        if c == depth_column:
            near, far = DEPTH_ENDS
            near_w = pictures.text_size(near, 10)[0] + 4
            bar_len = max(w - near_w - pictures.text_size(far, 10)[0] - 4, 8)
            y = title_h + legend_h // 2
            pictures.draw_text(draw, (x, y), near, 10, anchor="lm")
            bar = pictures.colour_bar(bar_len, 8, pictures.VIRIDIS, reverse=True)
            header.paste(Image.fromarray(bar), (x + near_w, y - 4))
            pictures.draw_text(draw, (x + near_w + bar_len + 4, y), far, 10, anchor="lm")
    parts = [np.asarray(header), body]
    if classes is not None:
        names, colours = classes
        parts.append(pictures.class_legend(names, colours, body.shape[1]))
    return np.concatenate(parts, axis=0)


def write_image_summary(
    workdir: str | None,
    step: int,
    params: dict,
    config: ml_collections.ConfigDict,
    loader,
    val_result: dict | None,
    max_images: int = 4,
) -> np.ndarray | None:
    """The grid of the first evaluation batch, image | depth | prediction | label (the label
    column only when the batch has labelled pixels), written to
    `<workdir>/images/step_<step>.png` unless workdir is None; returned on process 0 (None on
    the others and without valid images).

    Cluster ids are mapped to classes with the latest validation's Hungarian assignment when
    it has one, so prediction and label colours agree (the title says which); label-free runs
    have none: clusters keep their ids' colours.
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
    prediction = "prediction (cluster ids)"
    if val_result is not None and "assignment" in val_result.get("cluster", {}):
        clusters = np.asarray(val_result["cluster"]["assignment"])[clusters]
        prediction = "prediction (matched)"
    names = palette.class_names(config.data.name, config.data.n_classes)
    colours = palette.palette_for(config.data.name, config.data.n_classes)
    depth = np.asarray(batch["depth"])[valid][: len(images)]
    labels = batch.get("label")
    if labels is not None:
        labels = np.asarray(labels)[valid][: len(images)]
        if not ((labels >= 0) & (labels < config.data.n_classes)).any():
            labels = None  # no labelled pixel: no label column
    titles = ["image", "depth", prediction] + (["label"] if labels is not None else [])
    rows = []
    for i in range(len(images)):
        row = [images[i], colorize_depth(depth[i]), palette.colorize(clusters[i], colours)]
        if labels is not None:
            row.append(palette.colorize(labels[i], colours))
        rows.append(row)
    grid = titled_grid(rows, titles, depth_column=1, classes=(names, colours))
    if workdir is not None:
        directory = os.path.join(workdir, "images")
        os.makedirs(directory, exist_ok=True)
        files.save_image_atomic(os.path.join(directory, f"step_{step:06d}.png"), grid)
    return grid


# --------------------------------------------------------------------------------------
# TensorBoard: the config, the hyperparameters, the pictures of each validation
# --------------------------------------------------------------------------------------

# The metrics the HParams dashboard shows beside each run's (or member's) hyperparameters.
HPARAM_METRICS = (
    "val/cluster_miou", "val/cluster_accuracy", "val/linear_miou", "val/linear_accuracy", "loss",
)  # fmt: skip
# ... and beside a label-free run's (train.validate="none": monitoring without labels).
LABEL_FREE_METRICS = (
    "monitor/cluster_entropy_normalised", "monitor/dead_clusters", "monitor/largest_cluster",
    "loss",
)  # fmt: skip
# Fields that tell runs apart besides the per-member ones (config.MEMBER_FIELDS).
RUN_FIELDS = (
    "objective", "model.variant", "model.dim", "data.name", "data.n_classes", "train.batch_size",
    "train.num_steps", "seed",
)  # fmt: skip


def run_hparams(config: ml_collections.ConfigDict, settings: dict | None = None) -> dict:
    """{field: value} of RUN_FIELDS and every per-member field (a member's `settings` win)."""
    values = {name: config_lib.get_field(config, name) for name in RUN_FIELDS}
    for name in config_lib.MEMBER_FIELDS:
        values[name] = (settings or {}).get(name, config_lib.get_field(config, name))
    return values


def log_run_start(
    writer, config: ml_collections.ConfigDict, step: int, members=None, labelled: bool = True
) -> None:
    """The resolved config as text and the hyperparameters: one HParams session for a single
    run, one per member (members: the sweep table, [{"name", "settings"}]), shown beside the
    validation scores (or, `labelled` False, the label-free monitoring scalars)."""
    text = "\n".join("    " + line for line in config.to_json(indent=2).splitlines())
    writer.write_text("config", text, step)
    if members is None:
        sessions = {None: run_hparams(config)}
    else:
        sessions = {m["name"]: run_hparams(config, m["settings"]) for m in members}
    writer.write_hparams(sessions, HPARAM_METRICS if labelled else LABEL_FREE_METRICS)


def log_validation(
    writer, step: int, result, config: ml_collections.ConfigDict, grid: np.ndarray | None = None
) -> None:
    """At a validation: the picture grid (if given) and each probe's confusion picture; for a
    sweep (result: one per member, in the writer's member order) in each member's run."""
    if not writer.active:
        return
    names = palette.class_names(config_lib.eval_data(config).name, config.data.n_classes)
    if grid is not None:
        writer.write_image("pictures", grid, step)
    if isinstance(result, dict):
        pairs = [(None, result)]
    else:
        pairs = list(zip(writer.members, result, strict=True))
    for member, one in pairs:
        for probe in ("cluster", "linear"):
            if "histogram" in one.get(probe, {}):  # scored on labels
                picture = reports.render_confusion(
                    one[probe]["histogram"], names, title=reports.CONFUSION_TITLES[probe]
                )
                writer.write_image(f"confusion/{probe}", picture, step, member=member)
