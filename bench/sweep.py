"""Cost of sweep mode: the population step's time and memory for several P, side by side.

    python bench/sweep.py [--variant=S/8] [--batch=8] [--res=224] [--members=1,2,4,8,16]
        [--steps=3] [--threads=0]

One process, one random host batch, the COCO ViT-S/8 config (random backbone): for every P
the population step (depthg_jax.training.population, P members with different depth weights) is
compiled first; then the timed steps go round-robin over the P values so that all see the
same machine load. Prints per P the median step time, its ratio to P = 1, the compile time
and the compiled program's peak memory (XLA's memory analysis: arguments + outputs + temps,
less donated aliases), and as the last line `p8_over_p1=<ratio>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "tests"), os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)  # configs, depthg_jax, the tests' helpers, the other benches


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="S/8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--members", default="1,2,4,8,16", help="comma-separated P values")
    p.add_argument("--steps", type=int, default=3, help="timed steps per P")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all available)")
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def make_config(variant: str, batch: int, res: int, num_members: int, dtype="float32"):
    from configs import coco
    from depthg_jax import config as base
    from depthg_jax.models import variants

    # COCO's settings for S/B variants; the base config for the tiny ones (--smoke, tests).
    config = coco.get_config(variant) if variant[:2] in ("S/", "B/") else base.get_config()
    config.model.variant = variant
    side = res // variants.patch_size(variant)
    config.loss.feature_samples = min(config.loss.feature_samples, side)
    config.model.allow_random_backbone = True
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.data.train_res = res
    weights = ",".join(f"{0.05 * (i + 1):.4g}" for i in range(num_members))
    config.sweep.grid = f"loss.depth_weight={weights}"
    return config


def peak_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports one
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


class PopulationBench:
    """A compiled population step of P members on one host batch (all local devices)."""

    def __init__(self, config, host_batch: dict):
        import jax
        from support import setup_population

        from depthg_jax.runtime import sharding
        from depthg_jax.training import sweep

        self.jax = jax
        table = sweep.member_table(config)
        self.num_members = len(table)
        self.num_side = config.loss.feature_samples
        mesh = sharding.make_mesh()
        _, self.backbone, self.state, self.k_step, self.hp, step = setup_population(
            config, table, mesh
        )
        self.batch = sharding.host_to_global(host_batch, mesh)
        start = time.perf_counter()
        self.compiled = step.lower(
            self.state, self.backbone, self.batch, self.k_step, self.hp, num_side=self.num_side
        ).compile()
        self.compile_s = time.perf_counter() - start
        self.peak = peak_bytes(self.compiled)

    def step(self) -> float:
        self.state, out = self.compiled(self.state, self.backbone, self.batch, self.k_step, self.hp)
        self.jax.block_until_ready((self.state, out))
        return float(out["loss"][0])


def main(argv=None) -> None:
    args = parse_args(argv)
    from train_step import limit_threads, make_host_batch

    threads = limit_threads(args.threads)
    import jax
    import numpy as np

    sizes = [int(p) for p in args.members.split(",")]
    if 1 not in sizes or 8 not in sizes:
        raise ValueError(f"--members={args.members} must include 1 and 8 (the reported ratio)")
    config = make_config(args.variant, args.batch, args.res, 1, args.dtype)
    host_batch = make_host_batch(args.batch, args.res, config.data.n_classes, 0)
    print(
        f"sweep step: {args.variant}, batch {args.batch} (+{args.batch} positives), {args.res} "
        f"px, S={config.loss.feature_samples}, {args.dtype}, P in {sizes}; {threads} CPU "
        f"thread(s); jax {jax.__version__} on {jax.devices()}; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    benches = {}
    for p in sizes:
        bench = PopulationBench(
            make_config(args.variant, args.batch, args.res, p, args.dtype), host_batch
        )
        loss = bench.step()  # warm
        if not np.isfinite(loss):
            raise FloatingPointError(f"P={p}: non-finite loss {loss}")
        print(f"P={p}: compiled in {bench.compile_s:.1f} s", flush=True)
        benches[p] = bench
    times = {p: [] for p in sizes}
    for i in range(args.steps):
        for p, bench in benches.items():
            start = time.perf_counter()
            bench.step()
            times[p].append(time.perf_counter() - start)
        print(f"round {i + 1}/{args.steps}: " + ", ".join(
            f"P={p} {times[p][-1]:.3f} s" for p in sizes), flush=True)  # fmt: skip
    medians = {p: statistics.median(t) for p, t in times.items()}
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| P | step (s, median) | vs P=1 | images/s | compile (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for p in sizes:
        peak = benches[p].peak
        peak_s = f"{peak / 2**20:.0f}" if peak is not None else "n/a"
        print(
            f"| {p} | {medians[p]:.3f} | {medians[p] / medians[1]:.2f}x | "
            f"{args.batch / medians[p]:.2f} | {benches[p].compile_s:.1f} | {peak_s} |"
        )
    print(f"p8_over_p1={medians[8] / medians[1]:.3f}")


if __name__ == "__main__":
    main()
