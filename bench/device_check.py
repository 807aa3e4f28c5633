"""The accelerator check: one command, at most ~8 minutes on one GPU, a markdown block out.

    python bench/device_check.py [--out=FILE] [--budget_s=450] [--steps=5]
    python bench/device_check.py --smoke        # CPU, tiny variants, seconds (CI)

Measures, on the first local device, with random weights and one random host batch:

1. train-step images/s of the single run for S/8 and B/8 at batch 32 (224 px, COCO settings),
   in float32 and bfloat16 (backbone dtype), with each program's compile time and peak
   memory (XLA's memory analysis of the compiled program; the device's own peak where it
   reports one);
2. the backbone's model FLOP utilisation: XLA's FLOP count of the forward on anchors and
   positives / its median time / the device's peak FLOP/s (a table by device kind, or
   --peak_tflops); the attention implementation the backbone runs is printed under the
   header (cuDNN flash attention for bfloat16 on CUDA, XLA's dot_product_attention else);
3. the share of the step spent in FPS: the jitted depth-guided FPS of the step, timed alone,
   over the step's time (and, with --trace_dir, a jax.profiler trace of one step);
4. the sweep cost: the population step (depthg_jax.training.population) for P = 1, 8, 32, S/8;
5. evaluation images/s: the protocol's jitted step (flip on, no CRF) at 320 px, S/8;
6. side by side, the PyTorch statement of the released step (bench/torch_reference_step.py)
   on the same device (CUDA when torch sees one; its FPS is the release's host loop);
7. depth maps (bench/depth_gen.py's device_section): the Depth Anything V2 Small forward in
   JAX (float32, bfloat16) and in transformers on the same device, images/s, and the depth
   command end to end (COCO-sized JPEGs in, 8-bit PNGs out) with each backend, with how far
   apart their PNGs are.

Sections run in that order; once --budget_s is spent the rest are listed as skipped, so the
command stays within its time. --smoke swaps in the tiny mu/8 variant at 64 px, batch 8,
bfloat16 only, P = 1, 2, one timed step, so the whole path runs on a CPU in CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "tests"), os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)  # configs, depthg_jax, the tests' helpers, the other benches

# Dense peak FLOP/s per device kind (vendor data sheets; SXM parts): (float32, bfloat16).
# float32 is the non-tensor-core rate: XLA's "default" precision may use TF32 and exceed it.
PEAK_TFLOPS = {
    "H200": (67.0, 989.0),
    "H100": (67.0, 989.0),
    "A100": (19.5, 312.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny variants on the CPU (CI)")
    p.add_argument("--out", default="", help="also write the markdown block to this file")
    p.add_argument("--budget_s", type=float, default=450.0, help="stop starting sections after")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the peak table")
    p.add_argument("--trace_dir", default="", help="write a jax.profiler trace of one step")
    return p.parse_args(argv)


def plan(smoke: bool) -> dict:
    if smoke:
        return dict(variants=("mu/8",), batch=8, res=64, eval_res=64,
                    members=(1, 2), dtypes=("bfloat16",))  # fmt: skip
    return dict(variants=("S/8", "B/8"), batch=32, res=224, eval_res=320,
                members=(1, 8, 32), dtypes=("float32", "bfloat16"))  # fmt: skip


def make_config(variant: str, batch: int, res: int, dtype: str):
    from sweep import make_config as sweep_config

    config = sweep_config(variant, batch, res, 1, dtype)
    config.sweep.grid = ""
    return config


def median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


class SingleStep:
    """The single run's jitted step (training.step.make_train_step), compiled ahead of time."""

    def __init__(self, config, host_batch):
        import jax
        from support import make_program, setup
        from sweep import peak_bytes

        from depthg_jax.runtime import sharding

        self.jax = jax
        mesh = sharding.make_mesh(jax.devices()[:1])
        self.spec, self.backbone, self.state, self.k_step, self.hp = setup(config, mesh)
        self.batch = sharding.host_to_global(host_batch, mesh)
        self.num_side = config.loss.feature_samples
        step = make_program(config, mesh)
        start = time.perf_counter()
        self.compiled = step.lower(
            self.state, self.backbone, self.batch, self.k_step, self.hp, num_side=self.num_side
        ).compile()
        self.compile_s = time.perf_counter() - start
        self.peak = peak_bytes(self.compiled)

    def __call__(self):
        self.state, out = self.compiled(self.state, self.backbone, self.batch, self.k_step, self.hp)
        self.jax.block_until_ready((self.state, out))
        return out


def backbone_mfu(config, runner, steps, peak_tflops):
    """(flops, seconds, utilisation or None) of the backbone forward on anchors + positives."""
    import jax
    import jax.numpy as jnp

    from depthg_jax.method.image_ops import normalize_images
    from depthg_jax.runtime import xla

    spec = runner.spec
    images = jnp.concatenate([runner.batch["image"], runner.batch["image_pos"]])

    @xla.jit
    def forward(params, images):
        with spec.precision():
            return spec.backbone.apply({"params": params}, normalize_images(images))

    compiled = forward.lower(runner.backbone, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    jax.block_until_ready(compiled(runner.backbone, images))
    seconds = median_time(lambda: jax.block_until_ready(compiled(runner.backbone, images)), steps)
    util = flops / seconds / (peak_tflops * 1e12) if peak_tflops and flops else None
    return flops, seconds, util


def fps_seconds(config, runner, steps):
    import functools

    import jax
    import jax.numpy as jnp

    from depthg_jax.method import sampling
    from depthg_jax.models import variants
    from depthg_jax.runtime import xla

    grid = config.data.train_res // variants.patch_size(config.model.variant)
    depths = jnp.concatenate([runner.batch["depth"], runner.batch["depth_pos"]])
    fps = xla.jit(
        functools.partial(
            sampling.depth_fps_coords,
            feature_hw=(grid, grid),
            num_side=config.loss.feature_samples,
            mode=config.objective,
            fov=config.loss.fov,
            far=config.loss.far,
        )
    )
    jax.block_until_ready(fps(depths))
    return median_time(lambda: jax.block_until_ready(fps(depths)), steps)


def eval_rate(config, runner, eval_res, steps):
    """(images/s, compile s) of the protocol's jitted eval step (flip, no CRF)."""
    import jax
    import numpy as np

    from depthg_jax.evaluation import evaluator
    from depthg_jax.models import model as model_lib
    from depthg_jax.runtime import sharding

    mesh = sharding.make_mesh(jax.devices()[:1])
    b = config.train.batch_size
    rng = np.random.default_rng(0)
    batch = sharding.host_to_global(
        {
            "image": rng.integers(0, 256, (b, eval_res, eval_res, 3), dtype=np.uint8),
            "label": rng.integers(-1, config.data.n_classes, (b, eval_res, eval_res)).astype(
                np.int32
            ),
            "valid": np.ones((b,), bool),
        },
        mesh,
    )
    spec = model_lib.ModelSpec.from_config(config)
    step = evaluator.Evaluator(evaluator.head_predictor(spec, flip=True), spec.n_classes, mesh).step
    params = sharding.replicate(
        model_lib.full_params(jax.device_get(runner.backbone), jax.device_get(runner.state.params)),
        mesh,
    )
    start = time.perf_counter()
    compiled = step.lower(params, batch["image"], batch["label"], batch["valid"]).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, batch["image"], batch["label"], batch["valid"]))
    seconds = median_time(
        lambda: jax.block_until_ready(
            compiled(params, batch["image"], batch["label"], batch["valid"])
        ),
        steps,
    )
    return b / seconds, compile_s


def torch_rate(config, host_batch, steps):
    """(images/s, device name) of the PyTorch statement of the released step."""
    import numpy as np
    import torch
    import torch_reference_step as ref

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    host_fps = ref.fps_coords

    def fps_on_host(feats, depth, num_side):  # the release's NumPy FPS loop, on the host
        return host_fps(feats.cpu(), depth.cpu(), num_side).to(device)

    runner = ref.TorchReferenceStep(
        variant=config.model.variant,
        dim=config.model.dim,
        n_classes=config.data.n_classes,
        num_side=config.loss.feature_samples,
        loss=dict(decay_every_steps=0, fps_sample_decay_every_steps=0),
    )
    if device.type != "cpu":
        ref.fps_coords = fps_on_host
        for module in (runner.net, runner.cluster_probe, runner.linear_probe):
            module.to(device)
        runner.mean, runner.std = runner.mean.to(device), runner.std.to(device)
        to_tensors = runner.to_tensors
        runner.to_tensors = lambda batch: {k: v.to(device) for k, v in to_tensors(batch).items()}

    def step():
        loss = runner.step(host_batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    try:
        loss = step()
        if not np.isfinite(loss):
            raise FloatingPointError(f"torch: non-finite loss {loss}")
        seconds = median_time(step, steps)
    finally:
        ref.fps_coords = host_fps
    return config.train.batch_size / seconds, str(device)


def attention_line(p: dict) -> str:
    """Which attention the backbone runs here, per variant and dtype (attention="auto")."""
    import jax.numpy as jnp

    from depthg_jax.models import vit

    chosen = [
        f"{v} {dt}: {vit.build_backbone(v, jnp.dtype(dt)).resolved_attention()}"
        for v in p["variants"]
        for dt in p["dtypes"]
    ]
    return f"Backbone attention (auto, platform {vit.backend_platform()}): {', '.join(chosen)}."


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    import jax
    from sweep import PopulationBench
    from sweep import make_config as sweep_config
    from train_step import make_host_batch

    p = plan(args.smoke)
    steps = 1 if args.smoke else args.steps
    dev = jax.devices()[0]
    kind = dev.device_kind
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    lines = [
        f"### Device check ({'smoke, CPU' if args.smoke else kind})",
        "",
        f"Command: `python bench/device_check.py{' --smoke' if args.smoke else ''}`; "
        f"jax {jax.__version__}, {dev.platform} {kind}, {jax.device_count()} device(s); "
        f"batch {p['batch']}, {p['res']} px, random weights, one random batch, "
        f"median of {steps} step(s).",
        attention_line(p),
        "",
    ]
    skipped = []

    def budget_left(what):
        if time.perf_counter() - t0 > args.budget_s:
            skipped.append(what)
            return False
        return True

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    host_batch = make_host_batch(p["batch"], p["res"], 27, 0)
    lines += [
        "| variant | dtype | step (s) | images/s | compile (s) | peak (MiB, XLA) "
        "| backbone GFLOP | backbone MFU | FPS share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    first = None
    for variant in p["variants"]:
        for dtype in p["dtypes"]:
            if not budget_left(f"train step {variant} {dtype}"):
                continue
            config = make_config(variant, p["batch"], p["res"], dtype)
            runner = SingleStep(config, host_batch)
            runner()
            seconds = median_time(runner, steps)
            if args.trace_dir and first is None:
                with jax.profiler.trace(args.trace_dir):
                    runner()
            first = first or (config, runner)
            peak_flops = args.peak_tflops or (peaks[dtype == "bfloat16"] if peaks else 0.0)
            flops, bb_s, util = backbone_mfu(config, runner, steps, peak_flops)
            fps_s = fps_seconds(config, runner, steps)
            lines.append(
                f"| {variant} | {dtype} | {seconds:.4f} | {p['batch'] / seconds:.1f} | "
                f"{runner.compile_s:.1f} | {mib(runner.peak)} | {flops / 1e9:.1f} | "
                f"{'n/a' if util is None else f'{100 * util:.1f}%'} | "
                f"{100 * fps_s / seconds:.1f}% |"
            )
            log(lines[-1])
    lines += ["", "| sweep (first variant, float32) P | step (s) | vs P=1 | compile (s) "
              "| peak (MiB, XLA) |", "|---|---|---|---|---|"]  # fmt: skip
    base = None
    for members in p["members"]:
        if not budget_left(f"sweep P={members}"):
            continue
        try:
            bench = PopulationBench(
                sweep_config(p["variants"][0], p["batch"], p["res"], members), host_batch
            )
            bench.step()
            seconds = median_time(bench.step, steps)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at large P: report it
            lines.append(f"| {members} | failed: {type(e).__name__}: {str(e)[:120]} | | | |")
            log(lines[-1])
            continue
        base = base or seconds
        lines.append(
            f"| {members} | {seconds:.4f} | {seconds / base:.2f}x | {bench.compile_s:.1f} | "
            f"{mib(bench.peak)} |"
        )
        log(lines[-1])
    lines.append("")
    if first is not None and budget_left("evaluation"):
        rate, compile_s = eval_rate(first[0], first[1], p["eval_res"], steps)
        lines.append(
            f"Evaluation ({first[0].model.variant}, {first[0].model.dtype}, {p['eval_res']} px, "
            f"flip, no CRF): {rate:.1f} images/s, compile {compile_s:.1f} s."
        )
        log(lines[-1])
    if first is not None and budget_left("torch reference step"):
        try:
            rate, where = torch_rate(first[0], host_batch, steps)
            lines.append(
                f"PyTorch statement of the released step ({first[0].model.variant}, float32, "
                f"bench/torch_reference_step.py, FPS on the host as released) on {where}: "
                f"{rate:.1f} images/s."
            )
        except Exception as e:  # noqa: BLE001 - report, do not lose the other figures
            traceback.print_exc()
            lines.append(f"PyTorch reference step failed: {type(e).__name__}: {e}")
        log(lines[-1])
    if budget_left("depth maps"):
        from depth_gen import device_section

        lines.append("")
        try:
            lines += device_section(args.smoke, steps, log)
        except Exception as e:  # noqa: BLE001 - report, do not lose the other figures
            traceback.print_exc()
            lines.append(f"Depth maps failed: {type(e).__name__}: {e}")
        log(lines[-1])
    lines.append(f"Device peak memory in use (whole run): {mib(device_peak_bytes())} MiB.")
    if skipped:
        lines.append(f"Skipped (time budget {args.budget_s:.0f} s): {', '.join(skipped)}.")
    lines.append(f"Total {time.perf_counter() - t0:.0f} s.")
    block = "\n".join(lines)
    print(block, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(block + "\n")
    return lines


if __name__ == "__main__":
    main()
