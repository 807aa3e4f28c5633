"""Batched on-device farthest point sampling vs fpsample and the NumPy loop (docs/method.md).

For B depth maps at a feature grid size, times, side by side in one run:
  jax      `farthest_point_sample_batch` over the whole batch (one call), compiled as the
           product compiles it (`depthg_jax.runtime.xla.jit`),
  fpsample `fpsample.fps_sampling(points, n, start_idx=0)` per map in a Python loop,
  numpy    the plain NumPy loop of docs/method.md per map (what the release runs on the host),
and `depth_fps_coords` end to end (pool 8x, lift, FPS, coordinates) for the 28x28 case,
and the loop's per-iteration floor (16-point clouds, where the data costs almost nothing).
All three must return identical indices (checked). Rounds interleave the three; medians of
--repeats rounds (wall clock) and means (process CPU time).

Usage: python bench/fps.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the tests' helpers (support.py)

import fpsample  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from support import numpy_fps  # noqa: E402

from depthg_jax.method import sampling  # noqa: E402
from depthg_jax.runtime import xla  # noqa: E402


def smooth_depth(rng: np.random.Generator, batch: int, side: int) -> np.ndarray:
    """Plausible depth maps 0..255: a tilted plane plus blobs (no exact FPS ties)."""
    r, c = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    maps = []
    for _ in range(batch):
        d = rng.uniform(0.2, 0.8) * r + rng.uniform(-0.3, 0.3) * c
        for _ in range(4):
            cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            d += rng.uniform(-0.5, 0.5) * np.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * s * s))
        d += rng.uniform(0, 1e-3, d.shape)
        d = (d - d.min()) / (d.max() - d.min())
        maps.append(d * 255)
    return np.stack(maps).astype(np.float32)


def time_once(fn, cpu: list | None = None) -> float:
    """Wall seconds of fn(); its process CPU seconds (all threads) appended to `cpu`."""
    c = time.process_time()
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
    if cpu is not None:
        cpu.append(time.process_time() - c)
    return wall


def bench_case(side: int, num_side: int, batch: int, repeats: int, numpy_repeats: int) -> dict:
    rng = np.random.default_rng(side)
    depth = smooth_depth(rng, batch, side)
    lift = jax.jit(jax.vmap(lambda d: sampling.lift_depth(d, 90.0, 5.0, "reference")))
    points = lift(jnp.asarray(depth)).block_until_ready()
    points_np = np.asarray(points)
    n = num_side * num_side

    fps = xla.jit(lambda p: sampling.farthest_point_sample_batch(p, n))
    compile_s = time_once(lambda: fps(points).block_until_ready())
    run_jax = lambda: fps(points).block_until_ready()
    run_fpsample = lambda: [fpsample.fps_sampling(p, n, start_idx=0) for p in points_np]
    run_numpy = lambda: [numpy_fps(p, n) for p in points_np]
    got = np.asarray(run_jax())
    same_fpsample = sum(bool((g == r).all()) for g, r in zip(got, run_fpsample(), strict=True))
    same_numpy = sum(bool((g == r).all()) for g, r in zip(got, run_numpy(), strict=True))

    # Interleaved rounds, so a change in machine load hits all three alike.
    times = {"jax": [], "fpsample": [], "numpy": []}
    cpu = {"jax": [], "fpsample": [], "numpy": []}
    for r in range(repeats):
        times["jax"].append(time_once(run_jax, cpu["jax"]))
        times["fpsample"].append(time_once(run_fpsample, cpu["fpsample"]))
        if r < numpy_repeats:
            times["numpy"].append(time_once(run_numpy, cpu["numpy"]))
    ms = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    # CPU time as the mean over rounds: a per-call median of a few-ms CPU clock reading
    # misses work still being accounted to XLA's worker threads (it read 0.8 ms for a
    # 2.7 ms wall call).
    ms.update({f"{k}_cpu": float(np.mean(v)) * 1e3 for k, v in cpu.items()})
    return dict(
        case=f"{batch} maps {side}x{side} -> {n}",
        **ms,
        compile_s=compile_s,
        same=f"{same_numpy}/{batch} NumPy, {same_fpsample}/{batch} fpsample",
    )


def bench_end_to_end(batch: int, repeats: int) -> float:
    depth = jnp.asarray(smooth_depth(np.random.default_rng(0), batch, 224))
    fn = xla.jit(lambda d: sampling.depth_fps_coords(d, (28, 28), 11, "reference"))
    fn(depth).block_until_ready()
    runs = [time_once(lambda: fn(depth).block_until_ready()) for _ in range(repeats)]
    return float(np.median(runs)) * 1e3


def bench_loop_floor(batch: int, repeats: int) -> float:
    """Microseconds per FPS loop iteration on B clouds of 16 points, where the data costs
    almost nothing: (time for 16 samples - time for 2) / 14 iterations, so the per-call
    overhead cancels. A floor under any batched FPS loop of this form."""
    points = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 16, 3)), jnp.float32)
    calls = {n: xla.jit(lambda p, n=n: sampling.farthest_point_sample_batch(p, n)) for n in (2, 16)}
    for fn in calls.values():
        fn(points).block_until_ready()
    per_call = {2: [], 16: []}
    for _ in range(repeats):
        for n, fn in calls.items():
            t = time.perf_counter()
            for _ in range(200):
                fn(points).block_until_ready()
            per_call[n].append((time.perf_counter() - t) / 200)
    return (float(np.median(per_call[16])) - float(np.median(per_call[2]))) * 1e6 / 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    now = datetime.datetime.now(datetime.UTC)
    print(
        f"# {now:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f} at start, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), fpsample {fpsample.__version__}"
    )
    rows = [
        bench_case(28, 11, args.batch, args.repeats, numpy_repeats=3),
        bench_case(112, 32, args.batch, max(3, args.repeats // 2), numpy_repeats=1),
    ]
    print(
        "| case | jax batched (ms) | fpsample loop (ms) | NumPy loop (ms) | jax vs fpsample "
        "| jax vs NumPy | compile (s) | identical indices |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['jax']:.2f} | {r['fpsample']:.2f} | {r['numpy']:.1f} | "
            f"{r['fpsample'] / r['jax']:.1f}x | {r['numpy'] / r['jax']:.0f}x | "
            f"{r['compile_s']:.2f} | {r['same']} |"
        )
    print("\nProcess CPU time (all threads, mean over rounds), same runs:\n")
    print("| case | jax (ms) | fpsample (ms) | NumPy (ms) | jax vs fpsample | jax vs NumPy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['jax_cpu']:.2f} | {r['fpsample_cpu']:.2f} | "
            f"{r['numpy_cpu']:.1f} | {r['fpsample_cpu'] / r['jax_cpu']:.1f}x | "
            f"{r['numpy_cpu'] / r['jax_cpu']:.0f}x |"
        )
    floor_us = bench_loop_floor(args.batch, args.repeats)
    small = rows[0]
    print(
        f"\nLoop floor: {floor_us:.2f} us per iteration for {args.batch} clouds of 16 points "
        f"(call overhead excluded). At 28x28 the loop runs 120 iterations, "
        f"so the floor alone is {120 * floor_us / 1e3:.2f} ms, against "
        f"{small['numpy'] / 200:.2f} ms for 200x the NumPy loop."
    )
    e2e = bench_end_to_end(args.batch, args.repeats)
    print(
        f"\ndepth_fps_coords end to end (pool 224->28, lift, FPS, coords), {args.batch} maps "
        f"-> 121 samples: {e2e:.2f} ms; load average {os.getloadavg()[0]:.1f} at end"
    )


if __name__ == "__main__":
    main()
