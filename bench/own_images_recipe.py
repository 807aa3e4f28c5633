"""The README's "Your own images" recipe, step by step on generated photos, with each step's time.

    python bench/own_images_recipe.py --dir=/tmp/recipe [--train=64] [--val=8] [--steps=100]

Writes `--train` + `--val` generated photos (320 x 240 JPEGs of the synthetic scenes, no
labels, no depth) under <dir>/photos/images/{train,val}, and a tiny randomly initialised Depth
Anything model saved with transformers' save_pretrained (needs the `depth` extra; a real run
uses the downloaded Depth Anything V2 Small instead, the command's default). Then runs each
command of the recipe as a user would (a fresh process each), printing the command, its wall
time and the last lines of its output:

  depth -> five_crop -> knn -> main (configs/custom.py:mu/8) -> segment -> evaluate

The backbone is the random one-block "mu/8": the figures show what each step costs and that the
recipe runs end to end, not DepthG's quality (that needs DINO weights).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_photos(root: Path, train: int, val: int, seed: int = 0) -> None:
    """320 x 240 JPEG photos of generated scenes (the synthetic set's renderer, cropped)."""
    import numpy as np
    from PIL import Image

    from depthg_jax.data import synthetic

    for split, count in (("train", train), ("val", val)):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split == "val", i])
            image = synthetic.render_scene(rng, 320)[0][40:280]
            Image.fromarray(image).save(folder / f"photo_{i:04d}.jpg", quality=90)


def write_tiny_depth_model(path: Path) -> None:
    """A random Depth Anything (DINOv2 backbone of width 32) and its processor, saved locally."""
    import torch
    import transformers

    backbone = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        patch_size=14, image_size=28, out_indices=[1, 2], reshape_hidden_states=False,
    )  # fmt: skip
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=32, reassemble_factors=[2, 1],
        neck_hidden_sizes=[16, 32], fusion_hidden_size=16, head_hidden_size=8, patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(path)
    transformers.DPTImageProcessor(
        size={"height": 224, "width": 224}, keep_aspect_ratio=True, ensure_multiple_of=14,
        resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)  # fmt: skip


def run(title: str, args: list[str], cwd: Path) -> float:
    shown = " ".join(a if " " not in a else f"'{a}'" for a in args)
    print(f"\n### {title}\n$ {shown}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    text = (out.stdout + out.stderr).replace("\r", "\n")
    lines = [line for line in text.splitlines() if line.strip() and "%|" not in line]
    print("\n".join(lines if len(lines) <= 24 else lines[:6] + ["..."] + lines[-16:]))
    print(f"[{title}: {seconds:.1f} s, exit {out.returncode}]", flush=True)
    if out.returncode:
        raise SystemExit(f"{title} failed")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", required=True, help="working folder (emptied first)")
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    work = Path(args.dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_photos(work / "photos", args.train, args.val)
    write_tiny_depth_model(work / "tiny_depth_anything")
    py = sys.executable
    cfg = [f"--config={REPO / 'configs' / 'custom.py'}:mu/8"]
    data = ["--config.data.root=crops", "--config.data.eval_root=photos"]
    times = {
        "depth": run(
            "depth",
            [
                py,
                "-m",
                "depthg_jax.data.depth",
                "--images=photos/images",
                "--out=photos/depth",
                "--model=tiny_depth_anything",
                "--device=cpu",
            ],
            work,
        ),  # fmt: skip
        "five_crop": run(
            "five-crop",
            [
                py,
                "-m",
                "depthg_jax.data.five_crop",
                "--dataset=directory",
                "--root=photos",
                "--split=train",
                "--out=crops",
            ],
            work,
        ),  # fmt: skip
        "knn": run("KNN", [py, "-m", "depthg_jax.data.knn", *cfg, *data], work),
        "train": run(
            "train",
            [
                py,
                "-m",
                "depthg_jax.main",
                *cfg,
                *data,
                "--workdir=run",
                f"--config.train.num_steps={args.steps}",
            ],
            work,
        ),  # fmt: skip
        "segment": run(
            "segment",
            [
                py,
                "-m",
                "depthg_jax.segment",
                "--checkpoint=run/export",
                "--images=photos/images/val",
                "--out=masks",
            ],
            work,
        ),  # fmt: skip
        "evaluate": run(
            "evaluate", [py, "-m", "depthg_jax.evaluate", "--checkpoint=run/export"], work
        ),  # fmt: skip
    }
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
