"""Throughput of `python -m depthg_jax.data.depth` (images per second, whole command path).

Builds the Depth Anything V2 Small architecture (Dinov2-S/14 backbone, DPT head) with
random weights, so no download is needed: compute is the same as the real checkpoint's.
Images are COCO-sized (640x480 JPEG); the processor is Depth Anything's (518, keep aspect,
multiple of 14), so each image runs at 518x686. Also times a tiny model to show what the
read / preprocess / resize / write pipeline costs on its own. Each configuration writes into
a fresh output folder; batch sizes are timed side by side in one run. Process CPU time is
printed beside wall time because a shared machine's load inflates wall time.

    python bench/depth_gen.py [--images 8] [--device auto]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from depthg_jax.data import depth as depth_cmd


def save_model(path: Path, small: bool) -> None:
    if small:  # Depth Anything V2 Small's published architecture.
        backbone = transformers.Dinov2Config(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            patch_size=14,
            image_size=518,
            out_indices=[3, 6, 9, 12],
            reshape_hidden_states=False,
        )
        config = transformers.DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=384,
            neck_hidden_sizes=[48, 96, 192, 384],
            fusion_hidden_size=64,
            head_hidden_size=32,
        )
        size = 518
    else:
        backbone = transformers.Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=14,
            image_size=28,
            out_indices=[1, 2],
            reshape_hidden_states=False,
        )
        config = transformers.DepthAnythingConfig(
            backbone_config=backbone,
            reassemble_hidden_size=32,
            reassemble_factors=[2, 1],
            neck_hidden_sizes=[16, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
        )
        size = 56
    torch.manual_seed(0)
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(path)
    transformers.DPTImageProcessor(
        size={"height": size, "width": size},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="depth_bench_"))
    try:
        run(tmp, args)
    finally:
        shutil.rmtree(tmp)


def run(tmp: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    for i in range(args.images):
        img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        (tmp / "images" / "train2017").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp / "images" / "train2017" / f"{i:012d}.jpg", quality=90)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, {args.images} images 640x480"
    )
    for name, small in (("tiny", False), ("da-v2-small", True)):
        model_dir = tmp / f"model_{name}"
        save_model(model_dir, small)
        dm = depth_cmd.load_depth_model(str(model_dir), args.device)
        # Warm-up on a throwaway output folder (first forward allocates).
        depth_cmd.generate_depth(
            tmp / "images", tmp / f"warm_{name}", dm, batch_size=1, progress=False
        )
        for batch in (1, 4):
            out = tmp / f"out_{name}_b{batch}"
            t0, c0 = time.perf_counter(), time.process_time()
            s = depth_cmd.generate_depth(tmp / "images", out, dm, batch_size=batch, progress=False)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert s.written == args.images and not s.failed
            print(
                f"{name:12s} batch {batch}: {args.images / dt:7.2f} img/s "
                f"({dt / args.images * 1000:7.1f} ms/img wall, "
                f"{cpu / args.images * 1000:7.1f} ms/img process CPU) on {dm.device}"
            )


if __name__ == "__main__":
    main()
