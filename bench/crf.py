"""Dense CRF wall time at the evaluation size: serial vs a process pool, side by side.

python bench/crf.py [--images=16] [--res=320] [--classes=27] [--workers=N]
Inputs are synthetic: a piecewise-flat image with texture and smooth class scores from
upsampled low-resolution noise (like upsampled probe output), plus per-pixel noise.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from depthg_jax import crf


def make_inputs(n: int, res: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    grid = res // 8
    low = rng.normal(0, 2, (n, grid, grid, classes)).astype(np.float32)
    logits = low.repeat(8, axis=1).repeat(8, axis=2)  # blocky, like upsampled 40x40 outputs
    logits += rng.normal(0, 0.5, logits.shape).astype(np.float32)
    regions = logits.argmax(-1)
    palette = rng.integers(0, 256, (classes, 3))
    images = palette[regions] + rng.normal(0, 8, regions.shape + (3,))
    images = np.clip(images, 0, 255).astype(np.uint8)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return images, log_probs.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--res", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    images, log_probs = make_inputs(args.images, args.res, args.classes)

    start = time.perf_counter()
    serial = crf.dense_crf_batch(images, log_probs)
    t_serial = time.perf_counter() - start

    start = time.perf_counter()
    pool = crf.make_crf_pool(args.workers)
    crf.dense_crf_batch(images[:1], log_probs[:1], pool)  # start the workers
    t_start = time.perf_counter() - start
    start = time.perf_counter()
    parallel = crf.dense_crf_batch(images, log_probs, pool)
    t_pool = time.perf_counter() - start
    pool.shutdown()
    assert np.array_equal(serial, parallel)

    n = args.images
    print(f"{n} images {args.res}x{args.res}, {args.classes} classes, {os.cpu_count()} cores")
    print(f"serial: {t_serial:.2f} s ({1e3 * t_serial / n:.0f} ms/image)")
    print(
        f"pool({args.workers}): {t_pool:.2f} s ({1e3 * t_pool / n:.0f} ms/image), "
        f"speed-up {t_serial / t_pool:.2f}x; pool start-up {t_start:.2f} s"
    )


if __name__ == "__main__":
    main()
