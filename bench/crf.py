"""Dense CRF wall time at the evaluation size: serial vs a process pool, side by side.

python bench/crf.py [--images=16] [--res=320] [--classes=27] [--workers=N]
Inputs: rendered synthetic scenes (depthg_jax.data.synthetic) and class scores from upsampled
low-resolution noise plus per-pixel noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `depthg_jax` from this checkout

from depthg_jax.evaluation import crf  # noqa: E402


def make_inputs(n: int, res: int, classes: int, seed: int = 0):
    """Rendered synthetic street scenes (flat regions, texture, noise) and blocky class scores
    (like upsampled 40x40 probe outputs) with per-pixel noise."""
    from depthg_jax.data import synthetic

    rng = np.random.default_rng(seed)
    images = np.stack([synthetic.render_scene(rng, res)[0] for _ in range(n)])
    grid = res // 8
    low = rng.normal(0, 2, (n, grid, grid, classes)).astype(np.float32)
    logits = low.repeat(8, axis=1).repeat(8, axis=2)
    logits += rng.normal(0, 0.5, logits.shape).astype(np.float32)
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
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())

    start, cpu = time.perf_counter(), time.process_time()
    serial = crf.dense_crf_batch(images, log_probs)
    t_serial, cpu_serial = time.perf_counter() - start, time.process_time() - cpu

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
    print(
        f"serial: {t_serial:.2f} s ({1e3 * t_serial / n:.0f} ms/image; CPU time "
        f"{1e3 * cpu_serial / n:.0f} ms/image); load average before: {load}"
    )
    print(
        f"pool({args.workers}): {t_pool:.2f} s ({1e3 * t_pool / n:.0f} ms/image), "
        f"speed-up {t_serial / t_pool:.2f}x; pool start-up {t_start:.2f} s"
    )


if __name__ == "__main__":
    main()
