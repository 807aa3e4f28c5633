"""Reports of evaluation and validation results: tables, JSON, the confusion picture.

Pure formatting and file writing: the numbers come from `depthg_jax.evaluate`.
"""

from __future__ import annotations

import json
import os

import numpy as np

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


def to_json(results: dict, class_names: list[str]) -> dict:
    """A JSON-friendly copy: scores in %, per-class IoU by name (NaN -> null), counts as lists."""

    def clean(x):
        return None if x is None or not np.isfinite(x) else round(float(x) * 100, 4)

    out = {"num_images": results["num_images"], "time_s": results["time_s"]}
    out["crf_time_s"] = results["crf_time_s"]
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


def render_confusion(histogram: np.ndarray, class_names: list[str], cell: int = 28) -> np.ndarray:
    """The matched confusion as an RGB picture: rows true class, columns predicted class, each
    row normalised by its true-class pixel count, white (0) to dark blue (1); names on the left
    and (rotated) on top."""
    from PIL import Image, ImageDraw, ImageFont

    counts = np.asarray(histogram, np.float64).T  # rows: true class
    counts = counts[: len(class_names), : len(class_names)]
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    white, blue = np.array([247, 251, 255.0]), np.array([8, 48, 107.0])
    colours = (white + frac[..., None] * (blue - white)).astype(np.uint8)
    grid = colours.repeat(cell, 0).repeat(cell, 1)
    font = ImageFont.load_default()
    margin = 8 + 7 * max(len(n) for n in class_names)
    n = len(class_names)
    size = margin + n * cell + 4
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (margin, margin))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(class_names):
        draw.text((4, margin + i * cell + 3), name, fill=(0, 0, 0), font=font)
        label = Image.new("RGB", (margin, cell), (255, 255, 255))
        ImageDraw.Draw(label).text((4, 3), name, fill=(0, 0, 0), font=font)
        canvas.paste(label.rotate(90, expand=True), (margin + i * cell, 0))
    for i in range(n + 1):  # cell borders
        p = margin + i * cell
        draw.line([(p, margin), (p, margin + n * cell)], fill=(128, 128, 128))
        draw.line([(margin, p), (margin + n * cell, p)], fill=(128, 128, 128))
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
            files.save_image_atomic(path, render_confusion(results[key]["histogram"], class_names))
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

