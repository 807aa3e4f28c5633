"""Backbone forward throughput: jitted DinoViT vs timm, side by side in one run.

  PYTHONPATH=. /work/timmenv/bin/python bench/backbone.py --variants=S/8,B/8 --batch=4
  PYTHONPATH=. /work/main/.venv/bin/python bench/backbone.py \
      --variants=S/16,v2-S/14,v2reg-S/14,v3-S/16 --batch=2

DINOv2/DINOv3 variants (built by `vit.build_backbone`) have no timm reference here; for every
variant the line also gives the forward's matmul FLOPs (counted from the shapes) and GFLOP/s,
and, after the first (v1) variant, the ratio of each variant's GFLOP/s to it: "per FLOP"
speed relative to our v1 forward.

(the timm venv also has jax/flax; with the project venv, which has no timm, only our
figures are printed). Both models hold the same random weights; the timings alternate
ours/timm on each repeat so that machine load affects both alike. Ours is compiled as the
product compiles it (`depthg_jax.runtime.xla.jit`) and, alternating with it, by a plain `jax.jit`
with XLA's default options. Reports the median seconds per batch, images/s, the ratio
ours/timm in images/s and ours against the plain `jax.jit`.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.models.convert import convert_state_dict
from depthg_jax.models.variants import get_variant, mlp_hidden
from depthg_jax.models.vit import build_backbone
from depthg_jax.runtime import xla

try:
    import timm
    import torch
except ImportError:  # timm needs torchvision; the project venv does not have it
    timm = torch = None

TIMM_NAMES = {
    "S/8": "vit_small_patch8_224.dino",
    "B/8": "vit_base_patch8_224.dino",
    "S/16": "vit_small_patch16_224.dino",
    "B/16": "vit_base_patch16_224.dino",
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_flops(variant: str, size: int) -> float:
    """Multiply-add FLOPs (x2) of one image's forward: patch conv, qkv, attention, proj, MLP."""
    spec = get_variant(variant)
    n = (size // spec.patch) ** 2
    t = n + 1 + spec.registers
    c, h = spec.dim, mlp_hidden(variant)
    mlp = (3 if spec.swiglu else 2) * t * c * h
    block = 3 * t * c * c + 2 * t * t * c + t * c * c + mlp
    return 2.0 * (n * c * 3 * spec.patch**2 + spec.depth * block)


def bench_variant(variant: str, batch: int, size: int, repeats: int, dtype) -> float:
    """Prints one line; returns our GFLOP/s."""
    spec = get_variant(variant)
    size = size // spec.patch * spec.patch  # e.g. 224 -> 224 for /14 and /16, 320 -> 308 for /14
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    if timm is not None and variant in TIMM_NAMES:
        torch.manual_seed(0)
        ref = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=0).eval()
        params = convert_state_dict({k: v.numpy() for k, v in ref.state_dict().items()}, variant)
        x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    else:
        params = build_backbone(variant).init(jax.random.key(0), images[:1])["params"]

    # On device once, as the product holds them: host NumPy params would be copied per call.
    params = jax.device_put(params)

    def apply(p, x):
        return build_backbone(variant, dtype).apply({"params": p}, x)

    forward = xla.jit(apply)  # what the product runs (depthg_jax/runtime/xla.py's options)
    forward_xla_defaults = jax.jit(apply)
    x = jnp.asarray(images)
    compile_s = timed(lambda: forward(params, x).block_until_ready())
    forward_xla_defaults(params, x).block_until_ready()
    ours, defaults, theirs = [], [], []
    for _ in range(repeats):
        ours.append(timed(lambda: forward(params, x).block_until_ready()))
        defaults.append(timed(lambda: forward_xla_defaults(params, x).block_until_ready()))
        if timm is not None and variant in TIMM_NAMES:
            with torch.inference_mode():
                if not theirs:
                    ref.forward_features(x_torch)  # warm-up
                theirs.append(timed(lambda: ref.forward_features(x_torch)))
    ours_s = statistics.median(ours)
    defaults_s = statistics.median(defaults)
    gflops = forward_flops(variant, size) * batch / 1e9
    line = (
        f"{variant} {size}px batch {batch} ({spec.depth} blocks, dim {spec.dim}, "
        f"{gflops / batch:.2f} GFLOP/img, {gflops / ours_s:.1f} GFLOP/s), "
        f"{jnp.dtype(dtype).name}: ours {ours_s:.3f} s/batch = {batch / ours_s:.2f} img/s "
        f"(first call incl. compile {compile_s:.1f} s); plain jax.jit (XLA's default options) "
        f"{defaults_s:.3f} s/batch, ours {defaults_s / ours_s:.2f}x"
    )
    if theirs:
        theirs_s = statistics.median(theirs)
        line += (
            f"; timm {theirs_s:.3f} s/batch = {batch / theirs_s:.2f} img/s; "
            f"ours/timm throughput ratio {theirs_s / ours_s:.2f}"
        )
    print(line, flush=True)
    return gflops / ours_s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="S/8,B/8")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    threads = torch.get_num_threads() if torch is not None else "n/a"
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"timm {timm.__version__ if timm else 'absent'}, torch threads {threads}, "
        f"os.cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rates = {}
    for variant in args.variants.split(","):
        rates[variant] = bench_variant(
            variant, args.batch, args.size, args.repeats, jnp.dtype(args.dtype)
        )
    first = next(iter(rates))
    for variant, rate in rates.items():
        if variant != first:
            print(f"{variant} per-FLOP speed / {first}'s: {rate / rates[first]:.2f}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
