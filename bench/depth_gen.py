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
for _path in (REPO, os.path.join(REPO, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)  # depthg_jax, and the tests' model configs

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from depth_anything_test import small_config, tiny_config  # noqa: E402
from PIL import Image  # noqa: E402

from depthg_jax.data import depth as depth_cmd  # noqa: E402


def save_small(path: Path, tiny: bool = False) -> None:
    """Depth Anything V2 Small's published architecture, random weights, and its processor
    (`tiny`: a 2-block width-32 encoder, the "v2-mu/14" ViT, at 56 px, for smoke tests)."""
    config = tiny_config(layers=(1, 2), depth=2, factors=(2, 1)) if tiny else small_config()
    size = 56 if tiny else 518
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
        model(torch.randn(1, 3, size, size * 4 // 3 // 14 * 14))
        pre = captured[0]
        model.head.conv3.bias.add_(-pre.min() + 0.5 * (pre.max() - pre.min()))
    hook.remove()
    model.save_pretrained(path)
    transformers.DPTImageProcessorPil(
        size={"height": size, "width": size},
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


def device_section(smoke: bool, steps: int, log=print) -> list[str]:
    """bench/device_check.py's depth section (markdown lines) on the first local device.

    Depth Anything V2 Small shape, random weights (`smoke`: the tiny model on the CPU): the
    JAX forward alone (uint8 batch at the 640x480 image's preprocessed 518x686, float32 at full
    precision and bfloat16), transformers' forward on the same device (CUDA when torch sees
    one), then the command end to end (`generate_depth`, JPEGs in, PNGs out) with each
    backend on the same images, and how far apart their PNGs are.
    """
    import jax

    from depthg_jax.models import depth_anything as da

    batch, n_images = (2, 4) if smoke else (16, 64)
    tmp = Path(tempfile.mkdtemp(prefix="depth_device_"))
    try:
        save_small(tmp / "model", tiny=smoke)
        write_images(tmp / "images", n_images, 640, 480)
        jm = depth_cmd.load_jax_model(str(tmp / "model"))
        pre = jm.preprocess
        h, w = da.preprocessed_size(480, 640, pre["size"], pre["multiple"], True)
        batch = depth_cmd.JaxPredictor(jm, batch, "float32", False).batch  # x local devices
        images = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
        name = "tiny Depth Anything (v2-mu/14)" if smoke else "Depth Anything V2 Small shape"
        lines = [
            f"Depth maps ({name}, random weights, {h}x{w} input, batch {batch}, "
            f"median of {steps}):",
            "",
            "| path | dtype | images/s | compile (s) |",
            "|---|---|---|---|",
        ]
        for dtype in ("float32", "bfloat16"):
            predictor = depth_cmd.JaxPredictor(jm, batch, dtype, False)
            x = jax.device_put(images, predictor.batch_sharding)
            t0 = time.perf_counter()
            jax.block_until_ready(predictor.forward(predictor.params, x))
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                jax.block_until_ready(predictor.forward(predictor.params, x))
                times.append(time.perf_counter() - t0)
            rate = batch / statistics.median(times)
            lines.append(f"| JAX forward | {dtype} | {rate:.1f} | {compile_s:.1f} |")
            log(lines[-1])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dm = depth_cmd.load_depth_model(str(tmp / "model"), device)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(dm.device) / 255

        def torch_forward():
            with torch.inference_mode():
                out = dm.model(pixel_values=pixels).predicted_depth
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        torch_forward()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            torch_forward()
            times.append(time.perf_counter() - t0)
        lines.append(
            f"| transformers forward ({device}) | float32 | "
            f"{batch / statistics.median(times):.1f} | n/a |"
        )
        log(lines[-1])
        lines += ["", "| command end to end | images/s |", "|---|---|"]
        models = {"jax, float32": jm, "jax, bfloat16": jm, f"torch ({device})": dm}
        for label, model in models.items():
            dtype = "bfloat16" if "bfloat16" in label else "float32"
            kwargs = dict(batch_size=batch, progress=False, dtype=dtype)
            depth_cmd.generate_depth(tmp / "images", tmp / f"warm_{label}", model, **kwargs)
            t0 = time.perf_counter()
            summary = depth_cmd.generate_depth(tmp / "images", tmp / label, model, **kwargs)
            rate = n_images / (time.perf_counter() - t0)
            assert summary.written == n_images and not summary.failed, summary
            lines.append(f"| {label} | {rate:.1f} |")
            log(lines[-1])
        worst, same = compare(tmp / "jax, float32", tmp / f"torch ({device})")
        lines.append(
            f"PNGs, JAX float32 vs PyTorch on {device}: at most {worst} grey level(s) apart, "
            f"{100 * same:.3f}% of pixels identical ({n_images} COCO-sized images)."
        )
        worst, same = compare(tmp / "jax, bfloat16", tmp / f"torch ({device})")
        lines.append(
            f"PNGs, JAX bfloat16 vs PyTorch on {device}: at most {worst} grey level(s) apart, "
            f"{100 * same:.3f}% of pixels identical."
        )
        return lines
    finally:
        shutil.rmtree(tmp)


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
    predictor = depth_cmd.JaxPredictor(models["jax"], args.batch, "float32", False)
    shape = (predictor.batch, *predictor.preprocessed_size(height, width), 3)
    t0 = time.perf_counter()
    predictor.forward.lower(
        predictor.params, jax.ShapeDtypeStruct(shape, np.uint8, sharding=predictor.batch_sharding)
    ).compile()
    print(f"jax: compiling the forward for {shape} took {time.perf_counter() - t0:.1f} s")
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
