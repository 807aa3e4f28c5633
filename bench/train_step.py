"""Times the full DepthG train step, ours (JAX) next to a PyTorch statement of the release.

    python bench/train_step.py --variant=S/8 --batch=8 --res=224 --steps=3 [--threads=2]
        [--only=jax|torch] [--profile]

Both run in one process on the same random host batch (uint8 images, depth in [0, 255],
labels with -1 = ignore): backbone on anchor and positive, head, FPS, STEGO + depth terms,
probes, one gradient, the optimiser update. Each framework is warmed up (compiled) once;
then the timed steps alternate ours / torch so that both see the same machine load, each
step ending with `jax.block_until_ready` (torch returns after its synchronous update).
Prints the per-step medians, the ratio torch / ours and, as the last line,
`step_s=<median seconds of ours>` (with --only=torch: `torch_step_s=<...>`).

--threads=N pins the process to N CPUs (so XLA's thread pool has N threads), sets
torch.set_num_threads(N), and for N=1 also turns off XLA's multi-threaded Eigen.
--profile also times the pieces separately: backbone forward, FPS, and the rest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)  # `configs`, `depthg_jax` and the tests' helpers (support.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="S/8", help="backbone variant: S/8, B/8, ...")
    p.add_argument("--batch", type=int, default=8, help="global batch (anchors)")
    p.add_argument("--res", type=int, default=224, help="training crop size")
    p.add_argument("--steps", type=int, default=3, help="timed steps per framework")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all available)")
    p.add_argument("--only", choices=("jax", "torch"), default=None)
    p.add_argument("--profile", action="store_true", help="also time backbone / FPS alone")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def limit_threads(threads: int) -> int:
    """Pins the process to `threads` CPUs before JAX starts; returns the count in use."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads:
        if threads > len(cpus):
            raise ValueError(f"--threads={threads} exceeds the {len(cpus)} available CPUs")
        os.sched_setaffinity(0, cpus[:threads])
        if threads == 1:
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return len(os.sched_getaffinity(0))


def make_host_batch(batch: int, res: int, n_classes: int, seed: int) -> dict:
    from support import random_host_batch

    return random_host_batch(batch, res, n_classes, seed)


def make_config(variant: str, batch: int, res: int):
    from configs import coco

    config = coco.get_config(variant)
    config.model.allow_random_backbone = True
    config.train.batch_size = batch
    config.data.train_res = res
    return config


class JaxStep:
    """Our jitted data-parallel step on all local devices (one CPU device here)."""

    def __init__(self, config, host_batch: dict):
        import jax
        from support import make_program, setup

        from depthg_jax.runtime import sharding

        self.jax = jax
        self.config = config
        self.num_side = config.loss.feature_samples
        mesh = sharding.make_mesh()
        self.spec, self.backbone, self.state, self.k_step, self.hp = setup(config, mesh)
        self.step_fn = make_program(config, mesh)
        self.batch = sharding.host_to_global(host_batch, mesh)

    def step(self) -> float:
        self.state, metrics = self.step_fn(
            self.state, self.backbone, self.batch, self.k_step, self.hp, num_side=self.num_side
        )
        self.jax.block_until_ready((self.state, metrics))
        return float(metrics["loss"])

    def piece_fns(self) -> dict:
        """Jitted pieces of the step, each a no-argument callable that blocks."""
        import functools

        import jax.numpy as jnp

        from depthg_jax.method import sampling
        from depthg_jax.method.image_ops import normalize_images
        from depthg_jax.runtime import xla

        jax, cfg, batch = self.jax, self.config, self.batch
        images = jnp.concatenate([batch["image"], batch["image_pos"]])
        depths = jnp.concatenate([batch["depth"], batch["depth_pos"]])

        @xla.jit
        def backbone(params, images):
            return self.spec.backbone.apply({"params": params}, normalize_images(images))

        grid = cfg.data.train_res // int(cfg.model.variant.split("/")[1])
        fps = xla.jit(
            functools.partial(
                sampling.depth_fps_coords,
                feature_hw=(grid, grid),
                num_side=self.num_side,
                mode=cfg.objective,
                fov=cfg.loss.fov,
                far=cfg.loss.far,
            )
        )
        return {
            "backbone (anchor+positive)": lambda: jax.block_until_ready(
                backbone(self.backbone, images)
            ),
            "FPS (anchor+positive)": lambda: jax.block_until_ready(fps(depths)),
        }


class TorchStep:
    """The PyTorch statement of the released step (bench/torch_reference_step.py)."""

    def __init__(self, config, host_batch: dict):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import torch_reference_step as ref

        self.ref = ref
        self.num_side = config.loss.feature_samples
        self.runner = ref.TorchReferenceStep(
            variant=config.model.variant,
            dim=config.model.dim,
            n_classes=config.data.n_classes,
            num_side=self.num_side,
            # Timing compares one fixed step: no schedule may change S between steps.
            loss=dict(decay_every_steps=0, fps_sample_decay_every_steps=0),
        )
        self.host_batch = host_batch

    def step(self) -> float:
        return self.runner.step(self.host_batch)

    def piece_fns(self) -> dict:
        import torch

        t = self.runner.to_tensors(self.host_batch)
        net = self.runner.net

        def backbone():
            with torch.no_grad():
                net.model(t["img"])
                net.model(t["img_pos"])

        def fps():
            grid = t["img"].shape[-1] // net.model.patch_embed.patch_size
            shape = torch.zeros(1, 1, grid, grid)
            self.ref.fps_coords(shape, t["depth"], self.num_side)
            self.ref.fps_coords(shape, t["depth_pos"], self.num_side)

        return {"backbone (anchor+positive)": backbone, "FPS (anchor+positive)": fps}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = limit_threads(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    import jax

    config = make_config(args.variant, args.batch, args.res)
    host_batch = make_host_batch(args.batch, args.res, config.data.n_classes, args.seed)
    print(
        f"train step: {args.variant}, batch {args.batch} (+{args.batch} positives), "
        f"{args.res} px, S={config.loss.feature_samples}, objective={config.objective}, "
        f"sampling={config.loss.sampling}; {threads} CPU thread(s) "
        f"(torch.get_num_threads()={torch.get_num_threads()}, affinity "
        f"{sorted(os.sched_getaffinity(0))}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); "
        f"jax {jax.__version__} on {jax.devices()}, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    runners = {}
    if args.only in (None, "jax"):
        runners["jax"] = JaxStep(config, host_batch)
    if args.only in (None, "torch"):
        runners["torch"] = TorchStep(config, host_batch)

    for name, runner in runners.items():
        start = time.perf_counter()
        loss = runner.step()
        seconds = time.perf_counter() - start
        print(f"{name}: warm-up step (compile for jax) {seconds:.2f} s, loss {loss:.4f}")
        if not np.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss}")

    times = {name: [] for name in runners}
    for i in range(args.steps):
        for name, runner in runners.items():
            wall, cpu = timed(runner.step)
            times[name].append((wall, cpu))
            print(
                f"{name}: step {i + 1}/{args.steps} {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True
            )

    if args.profile:
        for name, runner in runners.items():
            pieces = runner.piece_fns()
            for piece, fn in pieces.items():
                fn()  # compile / warm
                wall, cpu = median_pair([timed(fn) for _ in range(max(args.steps, 1))])
                print(f"{name}: {piece}: median {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True)

    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    medians = {name: median_pair(t) for name, t in times.items()}
    for name, (wall, cpu) in medians.items():
        print(
            f"{name}: median {wall:.3f} s/step wall ({args.batch / wall:.2f} anchor images/s), "
            f"{cpu:.3f} s CPU/step, over {args.steps} steps"
        )
    if len(medians) == 2:
        wall = medians["torch"][0] / medians["jax"][0]
        cpu = medians["torch"][1] / medians["jax"][1]
        print(f"ratio torch/jax = {wall:.2f}x wall, {cpu:.2f}x CPU time")
    if "jax" in medians:
        print(f"step_s={medians['jax'][0]:.4f}")
    else:
        print(f"torch_step_s={medians['torch'][0]:.4f}")


if __name__ == "__main__":
    main()
