"""Reports of evaluation and validation results: tables, JSON, the confusion picture, and the
label-free reports (cluster usage, held-out losses, picture sheets) of unlabelled data.

Pure formatting and file writing: the numbers come from the evaluator and the trainer.
"""

from __future__ import annotations

import json
import os

import numpy as np

from depthg_jax.evaluation import pictures
from depthg_jax.runtime import files

PROBES = ("cluster", "linear")


def format_table(results: dict) -> str:
    """The paper-style table: probe x (accuracy, mIoU), without and with CRF, in %."""
    has_crf = "cluster_crf" in results
    header = f"{'':10s}{'no CRF':>16s}" + (f"{'CRF':>16s}" if has_crf else "")
    sub = f"{'probe':10s}{'Acc':>8s}{'mIoU':>8s}" + (f"{'Acc':>8s}{'mIoU':>8s}" if has_crf else "")
    lines = [header, sub]
    for probe in PROBES:
        r = results[probe]
        row = f"{probe:10s}{100 * r['accuracy']:8.1f}{100 * r['miou']:8.1f}"
        if has_crf:
            c = results[f"{probe}_crf"]
            row += f"{100 * c['accuracy']:8.1f}{100 * c['miou']:8.1f}"
        lines.append(row)
    no_crf_time = results["time_s"] - results["crf_time_s"]
    timing = f"wall time {no_crf_time:.1f} s without CRF"
    if has_crf:
        timing += f", {results['time_s']:.1f} s with CRF ({results['crf_time_s']:.1f} s in CRF)"
    lines.append(f"{results['num_images']} images; {timing}")
    return "\n".join(lines)


def format_class_table(results: dict, class_names: list[str]) -> str:
    """Per-class IoU (%) of every scored key, one row per class."""
    keys = [k for k in PROBES + tuple(f"{p}_crf" for p in PROBES) if k in results]
    width = max([len(n) for n in class_names] + [5])
    lines = [f"{'class':{width}s}" + "".join(f"{k:>13s}" for k in keys)]
    for i, name in enumerate(class_names):
        cells = "".join(f"{100 * results[k]['iou'][i]:13.1f}" for k in keys)
        lines.append(f"{name:{width}s}{cells}")
    lines.append(f"{'mean':{width}s}" + "".join(f"{100 * results[k]['miou']:13.1f}" for k in keys))
    return "\n".join(lines)


EVALUATION_REPORT = "evaluation report"  # results.json's "kind" (training writes a summary)


def labels_state(results: dict) -> str:
    """ "all", "some" or "none": how many of the scored images carried labels."""
    labelled = results.get("num_labelled_images", results["num_images"])
    return "all" if labelled == results["num_images"] else "some" if labelled else "none"


def to_json(results: dict, class_names: list[str]) -> dict:
    """A JSON-friendly copy: scores in %, per-class IoU by name (NaN -> null), counts as lists;
    "kind" says it is an evaluation report, "labels" how many images were scored."""

    def clean(x):
        return None if x is None or not np.isfinite(x) else round(float(x) * 100, 4)

    out = {"kind": EVALUATION_REPORT, "labels": labels_state(results)}
    out["num_images"] = results["num_images"]
    out["num_labelled_images"] = results.get("num_labelled_images", results["num_images"])
    out["time_s"], out["crf_time_s"] = results["time_s"], results["crf_time_s"]
    if results.get("checkpoint"):
        out["checkpoint"] = results["checkpoint"]
    if "usage" in results:
        out["usage"] = {k: usage_summary(v) for k, v in results["usage"].items()}
    for key, value in results.items():
        if isinstance(value, dict) and "accuracy" in value:
            out[key] = {
                "accuracy": clean(value["accuracy"]),
                "miou": clean(value["miou"]),
                "iou": {n: clean(v) for n, v in zip(class_names, value["iou"], strict=True)},
                "assignment": [int(a) for a in value["assignment"]],
                "confusion": results["confusion"][key].tolist(),
            }
    return out


CONFUSION_TITLES = {
    "cluster": "cluster probe (clusters matched to classes)",
    "cluster_crf": "cluster probe + CRF (clusters matched to classes)",
    "linear": "linear probe",
}


def render_confusion(
    histogram: np.ndarray, class_names: list[str], cell: int = 28, title: str | None = None
) -> np.ndarray:
    """The matched confusion as an RGB picture: rows true class, columns predicted class, each
    row normalised by its true-class pixel count (white 0% to dark blue 100%, the share in each
    cell), class names on both axes with the axis titles, and the colour scale at the right."""
    from PIL import Image, ImageDraw

    n = len(class_names)
    counts = np.asarray(histogram, np.float64).T[:n, :n]  # rows: true class
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    grid = pictures.apply_colour_map(frac, pictures.BLUES).repeat(cell, 0).repeat(cell, 1)
    name_size, axis_size = 11, 12
    name_w = max(pictures.text_size(name, name_size)[0] for name in class_names) + 8
    axis_h = pictures.text_size("Ag", axis_size)[1] + 8
    title_h = axis_h + 4 if title else 0
    bar_w, bar_gap, tick_w = 12, 14, pictures.text_size("100%", 10)[0] + 6
    left = axis_h + name_w
    top = title_h + axis_h + name_w
    side = n * cell
    width = left + side + bar_gap + bar_w + tick_w + axis_h + 6
    canvas = Image.new("RGB", (max(width, 8 + pictures.text_size(title or "")[0]), top + side + 8),
                       pictures.BACKGROUND)  # fmt: skip
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        pictures.draw_text(draw, (4, 4), title, axis_size + 1)
    # Axis titles: "predicted class" above the column names, "true class" left of the rows.
    pictures.draw_text(draw, (left + side // 2, title_h + 2), "predicted class", axis_size,
                       anchor="ma")  # fmt: skip
    label = pictures.rotated_text("true class", axis_size)
    canvas.paste(label, (2, top + max(0, (side - label.height) // 2)))
    for i, name in enumerate(class_names):
        pictures.draw_text(draw, (left - 4, top + i * cell + cell // 2), name, name_size,
                           anchor="rm")  # fmt: skip
        rotated = pictures.rotated_text(name, name_size)
        x = left + i * cell + (cell - rotated.width) // 2
        canvas.paste(rotated, (x, top - 4 - rotated.height))
    if cell >= 22:  # the share in each cell, in %
        for r in range(n):
            for c in range(n):
                value = 100 * frac[r, c]
                if value < 0.5:
                    continue
                fill = (255, 255, 255) if frac[r, c] > 0.5 else (30, 30, 30)
                xy = (left + c * cell + cell // 2, top + r * cell + cell // 2)
                pictures.draw_text(draw, xy, f"{value:.0f}", 9, fill=fill, anchor="mm")
    for i in range(n + 1):  # cell borders
        p = i * cell
        draw.line([(left + p, top), (left + p, top + side)], fill=(160, 160, 160))
        draw.line([(left, top + p), (left + side, top + p)], fill=(160, 160, 160))
    # The colour scale: 0% at the bottom, 100% at the top, named at its right.
    bar_x = left + side + bar_gap
    bar = pictures.colour_bar(side, bar_w, pictures.BLUES, vertical=True)
    canvas.paste(Image.fromarray(bar), (bar_x, top))
    draw.rectangle([bar_x, top, bar_x + bar_w - 1, top + side - 1], outline=(120, 120, 120))
    for frac_tick, text in ((1.0, "100%"), (0.5, "50%"), (0.0, "0%")):
        y = top + round((1 - frac_tick) * (side - 1))
        draw.line([(bar_x + bar_w, y), (bar_x + bar_w + 3, y)], fill=(60, 60, 60))
        pictures.draw_text(draw, (bar_x + bar_w + 5, y), text, 10, anchor="lm")
    scale = pictures.rotated_text("share of the true class's pixels", 10)
    if scale.height <= side:
        canvas.paste(scale, (bar_x + bar_w + tick_w, top + (side - scale.height) // 2))
    return np.asarray(canvas)


def write_report(results: dict, class_names: list[str], out_dir: str) -> dict:
    """Writes results.json, per_class_iou.txt and confusion_<key>.png; returns the paths."""
    paths = {
        "results": os.path.join(out_dir, "results.json"),
        "per_class": os.path.join(out_dir, "per_class_iou.txt"),
    }

    files.write_text_atomic(paths["results"], json.dumps(to_json(results, class_names), indent=2))
    table = format_table(results) + "\n\n" + format_class_table(results, class_names) + "\n"
    files.write_text_atomic(paths["per_class"], table)
    for key in ("cluster_crf", "cluster", "linear"):
        if key in results:
            path = os.path.join(out_dir, f"confusion_{key}.png")
            picture = render_confusion(
                results[key]["histogram"], class_names, title=CONFUSION_TITLES[key]
            )
            files.save_image_atomic(path, picture)
            paths[f"confusion_{key}"] = path
    return paths


def val_summary(result: dict) -> dict:
    """Flat "val/<probe>_<metric>" scalars of an evaluation result (probes it has)."""
    return {
        f"val/{probe}_{metric}": float(result[probe][metric])
        for probe in ("cluster", "linear")
        if probe in result
        for metric in ("accuracy", "miou")
    }


def format_val(step: int, result: dict) -> str:
    if "cluster" not in result:
        return format_monitor(step, result)
    c, lin = result["cluster"], result["linear"]
    return (
        f"[step {step}] val cluster acc {100 * c['accuracy']:.1f} mIoU {100 * c['miou']:.1f} | "
        f"linear acc {100 * lin['accuracy']:.1f} mIoU {100 * lin['miou']:.1f}"
    )


def format_baselines(results: dict) -> str:
    rows = [
        ("trained head, cluster probe", results["trained"]),
        ("untrained head, cluster probe", results["untrained_head"]),
        ("untrained head, k-means", results["kmeans_untrained_head"]),
        ("backbone features, k-means", results["kmeans_backbone"]),
    ]
    lines = ["Unsupervised segmentation of the validation split (accuracy / mIoU, %):"]
    for name, r in rows:
        lines.append(
            f"  {name:<31s} {100 * r['val/cluster_accuracy']:5.1f} / "
            f"{100 * r['val/cluster_miou']:5.1f}"
        )
    return "\n".join(lines)


def describe_checkpoint(path: str, selection: dict | None) -> str:
    """One line saying which training checkpoint an export holds (evaluate prints it)."""
    if not selection:
        return f"checkpoint {path} (no selection record: not written by training)"
    what = selection.get("checkpoint", "?")
    line = f"checkpoint {path}: the {what} one, step {selection.get('step')}"
    score = selection.get("score")
    if score is not None:
        line += f", {selection.get('metric')} {100 * float(score):.1f}"
    if what == "best":
        line += f"; selected on {selection.get('selected_on')}"
    return line


# --- Label-free reports -------------------------------------------------------------------------


def usage_summary(pixels) -> dict:
    """How a head uses its ids, from the pixels given each: "pixels", "fraction", "entropy"
    (nats), "entropy_normalised" (entropy / log n: 1 when every id is used equally), "dead"
    (ids given no pixel) and "dead_ids", "largest" (the most used id's fraction)."""
    pixels = np.asarray(pixels, np.int64)
    total = max(int(pixels.sum()), 1)
    frac = pixels / total
    used = frac[frac > 0]
    entropy = float(-(used * np.log(used)).sum())
    n = len(pixels)
    return {
        "pixels": pixels.tolist(),
        "fraction": [round(float(f), 6) for f in frac],
        "entropy": round(entropy, 6),
        "entropy_normalised": round(entropy / np.log(n), 6) if n > 1 else 1.0,
        "dead": int((pixels == 0).sum()),
        "dead_ids": np.flatnonzero(pixels == 0).tolist(),
        "largest": round(float(frac.max()), 6),
    }


HELDOUT_TERMS = ("loss", "loss_intra", "loss_inter", "loss_neg", "loss_depth", "loss_cluster")


def monitor_summary(result: dict) -> dict:
    """Flat scalars of label-free monitoring: the cluster probe's usage ("monitor/...") and the
    held-out losses ("heldout/..."), for metrics.jsonl and TensorBoard."""
    usage = usage_summary(result["usage"]["cluster"])
    out = {
        "monitor/cluster_entropy": usage["entropy"],
        "monitor/cluster_entropy_normalised": usage["entropy_normalised"],
        "monitor/dead_clusters": float(usage["dead"]),
        "monitor/largest_cluster": usage["largest"],
    }
    out.update({f"heldout/{k}": float(v) for k, v in result.get("heldout", {}).items()})
    return out


def usage_histograms(result: dict) -> dict:
    """{"monitor/cluster_usage": pixels per cluster id} (a histogram over ids)."""
    return {"monitor/cluster_usage": np.asarray(result["usage"]["cluster"])}


def format_monitor(step: int, result: dict) -> str:
    usage = usage_summary(result["usage"]["cluster"])
    n = len(usage["pixels"])
    line = (
        f"[step {step}] label-free: clusters used {n - usage['dead']}/{n}, entropy "
        f"{usage['entropy_normalised']:.2f} of the maximum, largest {100 * usage['largest']:.0f}%"
    )
    held = result.get("heldout")
    if held:
        terms = ", ".join(f"{k.removeprefix('loss_')} {held[k]:.4f}" for k in HELDOUT_TERMS[1:])
        line += f" | held-out loss {held['loss']:.4f} ({terms})"
    return line


def format_usage(usage: dict, names: list[str]) -> str:
    """The usage of each id as a table (pixels, %), then one summary line."""
    summary = usage_summary(usage)
    width = max([len(n) for n in names] + [7])
    lines = [f"{'cluster':{width}s}{'pixels':>12s}{'%':>8s}"]
    for name, pixels, frac in zip(names, summary["pixels"], summary["fraction"], strict=True):
        lines.append(f"{name:{width}s}{pixels:12d}{100 * frac:8.1f}")
    n = len(names)
    lines.append(
        f"{n - summary['dead']} of {n} clusters used, entropy {summary['entropy']:.3f} nats "
        f"({summary['entropy_normalised']:.2f} of the maximum), largest "
        f"{100 * summary['largest']:.1f}%"
    )
    return "\n".join(lines)


def make_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles equally sized RGB uint8 images (rows of columns) with a white border."""
    h, w = rows[0][0].shape[:2]
    n_rows, n_cols = len(rows), len(rows[0])
    grid = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile.shape[:2] != (h, w):
                raise ValueError(f"grid tile {r},{c} has shape {tile.shape[:2]}, expected {(h, w)}")
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = tile
    return grid


def make_sheet(pairs: list[tuple[np.ndarray, np.ndarray]], per_row: int = 4) -> np.ndarray:
    """Pairs (image, its colour map) of one size, `per_row` pairs to a row (white fill)."""
    rows = []
    for start in range(0, len(pairs), per_row):
        row = [tile for pair in pairs[start : start + per_row] for tile in pair]
        blank = np.full_like(pairs[0][0], 255)
        rows.append(row + [blank] * (2 * per_row - len(row)))
    if len(pairs) < per_row:
        rows = [row[: 2 * len(pairs)] for row in rows]
    return make_grid(rows)


def render_usage(usage, colours: np.ndarray, names: list[str], bar_w: int = 14) -> np.ndarray:
    """A bar chart of the fraction of pixels given each id, bars in the ids' colours."""
    from PIL import Image, ImageDraw

    frac = np.asarray(usage_summary(usage)["fraction"])
    n, height, top, bottom = len(frac), 160, 20, 16
    width = max(40 + n * bar_w, 220)
    canvas = Image.new("RGB", (width, height + top + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    peak = max(float(frac.max()), 1e-9)
    draw.text((4, 4), f"pixels per cluster (max {100 * peak:.1f}%)", fill=(0, 0, 0))
    for i, f in enumerate(frac):
        x = 36 + i * bar_w
        h = int(round(height * f / peak))
        colour = tuple(int(c) for c in colours[i])
        draw.rectangle([x, top + height - h, x + bar_w - 3, top + height], fill=colour)
        if n <= 40 or i % 5 == 0:
            draw.text((x, top + height + 2), str(i), fill=(0, 0, 0))
    return np.asarray(canvas)


def write_label_free_report(
    results: dict, names: list[str], colours: np.ndarray, sheet: np.ndarray | None, out_dir: str
) -> dict:
    """results.json (an evaluation report without scores: usage per probe), cluster_usage.png
    and sheet.png (images and their cluster maps); returns the paths."""
    record = {
        "kind": EVALUATION_REPORT,
        "labels": "none",
        "scores": "none: the evaluation split has no labelled pixel",
        "num_images": results["num_images"],
        "num_labelled_images": 0,
        "time_s": results["time_s"],
        "names": names,
        "usage": {k: usage_summary(v) for k, v in results["usage"].items()},
    }
    if results.get("checkpoint"):
        record["checkpoint"] = results["checkpoint"]
    paths = {
        "results": os.path.join(out_dir, "results.json"),
        "usage": os.path.join(out_dir, "cluster_usage.png"),
    }
    files.write_text_atomic(paths["results"], json.dumps(record, indent=2))
    main = "cluster_crf" if "cluster_crf" in results["usage"] else "cluster"
    files.save_image_atomic(paths["usage"], render_usage(results["usage"][main], colours, names))
    if sheet is not None:
        paths["sheet"] = os.path.join(out_dir, "sheet.png")
        files.save_image_atomic(paths["sheet"], sheet)
    return paths
