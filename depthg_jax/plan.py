"""Plan a run on a slice: `python -m depthg_jax.plan --config=FILE --chips=v5e-64`.

Without touching an accelerator it says whether the configured training step fits the chips,
and how fast it should run:

1. From shapes alone (training/planning.py `estimate`): per-device memory of the backbone's
   parameters as the mesh splits them, the head, probes and Adam state, and the activations.
   A config that does not fit is refused here, before anything compiles, with the numbers and
   a mesh.model that fits (`--auto_mesh` plans that mesh instead).
2. It lowers and compiles the real step for abstract inputs on simulated CPU devices of the
   slice's mesh shape (XLA_FLAGS is set before JAX starts) and reports XLA's memory analysis
   (arguments, temporaries) and cost analysis (FLOPs per device per step).
3. Predicted step time: FLOPs per device / (the chip's peak bf16 FLOP/s x --utilisation);
   run time for train.num_steps; the input rate each host must sustain, and the CPU cores
   that takes at the measured cost per training pair (bench/RESULTS.md).

The compile is XLA:CPU's: its temporaries approximate, not equal, what a TPU or GPU compile
allocates (docs/pods.md#planner).
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from depthg_jax import commands

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("chips", None, "The slice: NAME-COUNT, e.g. v5e-64, v4-32, H100-8.")
flags.DEFINE_float(
    "utilisation", 0.4, "Share of the chip's peak bf16 FLOP/s the step is assumed to reach."
)
flags.DEFINE_bool("auto_mesh", False, "Plan the smallest mesh.model that fits (else refuse).")
flags.DEFINE_bool("compile", True, "Compile on simulated devices for XLA's analyses.")
flags.mark_flags_as_required(["config", "chips"])

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def simulate_devices(count: int) -> None:
    """Makes JAX start `count` CPU devices (before any JAX backend starts)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{DEVICE_FLAG}={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    from depthg_jax.training import planning

    chip_name, count = planning.parse_chips(FLAGS.chips)
    if not 0 < FLAGS.utilisation <= 1:
        raise ValueError(f"--utilisation={FLAGS.utilisation}; expected a share in (0, 1]")
    simulate_devices(count)
    print(plan(FLAGS.config, chip_name, count, FLAGS.utilisation, FLAGS.auto_mesh,
               FLAGS.compile))  # fmt: skip


def plan(config, chip_name: str, count: int, utilisation: float, auto_mesh: bool,
         compile_: bool = True) -> str:  # fmt: skip
    """The plan's text; raises MemoryError (with the numbers and a mesh that fits) or
    ValueError (a mesh that cannot run the batch) before any compile."""
    from depthg_jax.training import planning, sweep

    chip = planning.CHIPS[chip_name]
    where = f"{chip_name}-{count}"
    host_chips = chip.chips_per_host(count)
    budget = int(chip.hbm_bytes * planning.USABLE_FRACTION)
    table = sweep.member_table(config) if sweep.is_sweep(config) else None
    members = len(table) if table else 0
    model = int(config.mesh.model)
    fits = planning.fitting_meshes(config, count, host_chips, budget, members)
    if auto_mesh:
        if not fits:
            est = planning.estimate(config, max(count // model, 1), model, members)
            raise MemoryError(planning.refusal(config, est, budget, where, fits))
        model = fits[0][0]
    problem = planning.mesh_problem(config.train.batch_size, count, model, host_chips)
    if problem:
        raise ValueError(f"{where}: {problem} (hosts of {host_chips} chips)")
    est = planning.estimate(config, count // model, model, members)
    if est.total_bytes > budget:
        raise MemoryError(planning.refusal(config, est, budget, where, fits))

    lines = [
        f"Plan: {config.model.variant} ({config.model.get('backbone_param_dtype', 'float32')} "
        f"backbone parameters, {config.model.dtype} compute), train.batch_size="
        f"{config.train.batch_size}" + (f", {members} sweep members" if members else ""),
        f"slice: {where}: {chip.name}, {chip.hbm_bytes / planning.GIB:.1f} GiB HBM, "
        f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s peak bf16 per chip; {count // host_chips} "
        f"host(s) of {host_chips} chips",
        f"mesh: data {count // model} x model {model} (--config.mesh.model={model})",
        f"per device, from shapes: {est.describe()}; {budget / planning.GIB:.2f} GiB usable "
        f"({planning.USABLE_FRACTION:.0%} of HBM)",
    ]
    if est.replicated_params:
        lines.append(f"  left whole on every device (axis not divisible by {model}): "
                     + ", ".join(est.replicated_params))  # fmt: skip
    if not compile_:
        return "\n".join(lines)

    import jax

    from depthg_jax.runtime import sharding

    if jax.device_count() != count:
        raise RuntimeError(
            f"the planner needs {count} simulated devices but JAX started with "
            f"{jax.device_count()}: run it as its own process (python -m depthg_jax.plan)"
        )
    mesh = sharding.make_mesh(model=model)
    compiled = planning.compile_step(config, mesh, table)
    gib = planning.GIB
    lines.append(
        f"per device, compiled (XLA:CPU, {count} simulated devices): arguments "
        f"{compiled.argument_bytes / gib:.2f} GiB (backbone {compiled.backbone_bytes / gib:.2f}),"
        f" temporaries {compiled.temp_bytes / gib:.2f} GiB, outputs not aliased "
        f"{(compiled.output_bytes - compiled.alias_bytes) / gib:.2f} GiB: total "
        f"{compiled.total_bytes / gib:.2f} GiB"
        + ("" if compiled.total_bytes <= budget else "  ** over the usable HBM **")
    )
    step_s = compiled.flops / (chip.peak_bf16_flops * utilisation)
    steps = int(config.train.num_steps)
    lines.append(
        f"FLOPs per step per device: {compiled.flops / 1e12:.3f} TFLOP (XLA cost analysis); "
        f"predicted step {step_s * 1e3:.1f} ms at {utilisation:.0%} of peak; "
        f"{steps} steps: {format_duration(steps * step_s)}"
    )
    hosts = max(count // host_chips, 1)
    rate = config.train.batch_size / step_s / hosts
    cores = rate * planning.CPU_SECONDS_PER_PAIR
    lines.append(
        f"input per host: {rate:.0f} training pairs/s; at {planning.CPU_SECONDS_PER_PAIR * 1e3:.1f}"
        f" ms CPU per pair (bench/RESULTS.md, 224 px PNG) that is {cores:.1f} CPU cores"
    )
    if compiled.total_bytes > budget:
        raise MemoryError("\n".join(lines) + "\nthe compiled step does not fit: "
                          f"{compiled.total_bytes / gib:.2f} GiB > {budget / gib:.2f} GiB")
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    commands.run_main(main)
