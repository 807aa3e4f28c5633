"""Depth-map generation, the JAX path against the PyTorch path, side by side in one run.

    python bench/depth_gen.py [--images 8] [--batch 4] [--rounds 2] [--size 640x480]

Builds the Depth Anything V2 Small architecture (DINOv2-S/14 encoder, DPT neck and head,
random weights: compute does not depend on them) with transformers, saves it with
`save_pretrained` with Depth Anything's processor (518, keep the aspect ratio, multiple of 14,
bicubic), and runs `depthg_jax.data.depth.generate_depth` on the same COCO-sized JPEGs with
each backend: `backend="jax"` (flax model from the saved folder, jitted, on every local
device) and `backend="torch"` (transformers, CPU). Each backend is warmed up once on a
throwaway output folder (the JAX compile for the image shape, torch's first forward), then
the timed runs alternate between the backends for `--rounds` rounds, each into a fresh
folder, whole command path per image (read, preprocess, forward, bicubic upsampling to the
image size, 8-bit PNG written atomically). Process CPU time is printed beside wall time
because the machine is shared. Finally the two backends' PNGs are compared pixel by pixel.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from depthg_jax.data import depth as depth_cmd  # noqa: E402


def save_small(path: Path) -> None:
    """Depth Anything V2 Small's published architecture, random weights, and its processor."""
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
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    # At transformers' initialisation the prediction is nearly constant (a relative range of
    # ~3e-4), so 8-bit min-max maps would magnify rounding noise: perturb the neck and head,
    # then lift the last bias so the map lies above the final ReLU with a wide range.
    captured = []
    hook = model.head.conv3.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.05 * torch.randn_like(p))
        model(torch.randn(1, 3, 518, 686))
        pre = captured[0]
        model.head.conv3.bias.add_(-pre.min() + 0.5 * (pre.max() - pre.min()))
    hook.remove()
    model.save_pretrained(path)
    transformers.DPTImageProcessorPil(
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(path)


def write_images(root: Path, n: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        base = (np.sin(xx / (20 + i)) + np.cos(yy / 30.0)) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 25, (height, width, 3)), 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(root / "train2017" / f"{i:012d}.jpg", quality=90)


def timed(tmp: Path, model, name: str, batch: int, n: int) -> tuple[float, float]:
    out = tmp / name
    t0, c0 = time.perf_counter(), time.process_time()
    summary = depth_cmd.generate_depth(tmp / "images", out, model, batch_size=batch, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert summary.written == n and not summary.failed, summary
    return wall, cpu


def compare(a: Path, b: Path) -> tuple[int, float]:
    """(max grey-level difference, share of identical pixels) over every PNG under a and b."""
    worst, same, total = 0, 0, 0
    for path in sorted(a.rglob("*.png")):
        x = np.asarray(Image.open(path)).astype(int)
        y = np.asarray(Image.open(b / path.relative_to(a))).astype(int)
        worst = max(worst, int(np.abs(x - y).max()))
        same, total = same + int((x == y).sum()), total + x.size
    return worst, same / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="depth_bench_"))
    try:
        run(tmp, args, width, height)
    finally:
        shutil.rmtree(tmp)


def run(tmp: Path, args: argparse.Namespace, width: int, height: int) -> None:
    import jax

    write_images(tmp / "images", args.images, width, height)
    save_small(tmp / "model")
    print(
        f"jax {jax.__version__} ({jax.device_count()} {jax.devices()[0].platform} device(s)), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; {args.images} JPEGs {width}x{height}, batch {args.batch}, "
        f"os.cpu_count() {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    models = {
        "jax": depth_cmd.load_jax_model(str(tmp / "model")),
        "torch": depth_cmd.load_depth_model(str(tmp / "model"), "cpu"),
    }
    for name, model in models.items():  # warm-up: compile / first forward
        wall, _ = timed(tmp, model, f"warm_{name}", args.batch, args.images)
        print(f"{name} warm-up (compile / first forward included): {wall:.1f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            wall, cpu = timed(tmp, model, f"{name}_{r}", args.batch, args.images)
            rates[name].append(args.images / wall)
            print(
                f"round {r} {name:5s}: {args.images / wall:6.3f} img/s "
                f"({wall / args.images:6.2f} s/img wall, {cpu / args.images:6.2f} s/img "
                f"process CPU), load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    jax_rate, torch_rate = (statistics.median(rates[k]) for k in ("jax", "torch"))
    worst, same = compare(tmp / "jax_0", tmp / "torch_0")
    print(
        f"median img/s: jax {jax_rate:.3f}, torch {torch_rate:.3f}, jax/torch "
        f"{jax_rate / torch_rate:.2f}x; PNGs jax vs torch: max {worst} grey level(s) apart, "
        f"{100 * same:.3f}% of pixels identical",
        flush=True,
    )


if __name__ == "__main__":
    main()
