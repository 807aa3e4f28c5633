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

import dataclasses
import json
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
flags.DEFINE_bool("json", False, "Print the plan's numbers as one JSON object.")
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
    result = make_plan(FLAGS.config, chip_name, count, FLAGS.utilisation, FLAGS.auto_mesh,
                       FLAGS.compile)  # fmt: skip
    print(json.dumps(result) if FLAGS.json else format_plan(result), flush=True)
    if not result["fits"]:
        raise MemoryError(
            f"the compiled step does not fit: {result['compiled_total_bytes'] / 2**30:.2f} GiB "
            f"> {result['usable_bytes'] / 2**30:.2f} GiB usable per device"
        )


def make_plan(config, chip_name: str, count: int, utilisation: float, auto_mesh: bool,
              compile_: bool = True) -> dict:  # fmt: skip
    """The plan's numbers; raises MemoryError (with the numbers and a mesh that fits) or
    ValueError (a mesh that cannot run the batch) before any compile.

    auto_mesh: plan the smallest mesh.model whose estimate fits; when its compiled step does
    not fit, the next one that does (each tried with one compile)."""
    from depthg_jax.training import planning

    result = _plan_at(config, chip_name, count, utilisation, auto_mesh, compile_, None)
    if not auto_mesh or result["fits"]:
        return result
    budget = result["usable_bytes"]
    host_chips = result["host_chips"]
    for model, _ in planning.fitting_meshes(config, count, host_chips, budget, result["members"]):
        if model > result["model"]:
            result = _plan_at(config, chip_name, count, utilisation, False, compile_, model)
            if result["fits"]:
                break
    return result


def _plan_at(config, chip_name, count, utilisation, auto_mesh, compile_, model) -> dict:
    from depthg_jax.training import planning, sweep

    chip = planning.CHIPS[chip_name]
    where = f"{chip_name}-{count}"
    host_chips = chip.chips_per_host(count)
    budget = int(chip.hbm_bytes * planning.USABLE_FRACTION)
    table = sweep.member_table(config) if sweep.is_sweep(config) else None
    members = len(table) if table else 0
    model = int(config.mesh.model) if model is None else model
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
    result = {
        "variant": config.model.variant,
        "param_dtype": str(config.model.get("backbone_param_dtype", "float32")),
        "compute_dtype": str(config.model.dtype),
        "batch": int(config.train.batch_size),
        "members": members,
        "chips": where,
        "chip": chip.name,
        "hbm_bytes": chip.hbm_bytes,
        "peak_flops": chip.peak_bf16_flops,
        "hosts": max(count // host_chips, 1),
        "host_chips": host_chips,
        "data": count // model,
        "model": model,
        "usable_bytes": budget,
        "estimate": dataclasses.asdict(est) | {"total_bytes": est.total_bytes},
        "estimate_text": est.describe(),
        "fits": True,
    }
    if not compile_:
        return result

    import jax

    from depthg_jax.runtime import sharding

    if jax.device_count() != count:
        raise RuntimeError(
            f"the planner needs {count} simulated devices but JAX started with "
            f"{jax.device_count()}: run it as its own process (python -m depthg_jax.plan)"
        )
    compiled = compile_step(config, sharding.make_mesh(model=model), table)
    step_s = compiled.flops / (chip.peak_bf16_flops * utilisation)
    rate = config.train.batch_size / step_s / result["hosts"]
    result.update(
        compiled=dataclasses.asdict(compiled),
        compiled_total_bytes=compiled.total_bytes,
        fits=compiled.total_bytes <= budget,
        utilisation=utilisation,
        step_seconds=step_s,
        run_seconds=step_s * int(config.train.num_steps),
        num_steps=int(config.train.num_steps),
        host_pairs_per_second=rate,
        host_cpu_cores=rate * planning.CPU_SECONDS_PER_PAIR,
    )
    return result


def format_plan(p: dict) -> str:
    """The plan as the command prints it."""
    from depthg_jax.training import planning

    gib = planning.GIB
    lines = [
        f"Plan: {p['variant']} ({p['param_dtype']} backbone parameters, {p['compute_dtype']} "
        f"compute), train.batch_size={p['batch']}"
        + (f", {p['members']} sweep members" if p["members"] else ""),
        f"slice: {p['chips']}: {p['chip']}, {p['hbm_bytes'] / gib:.1f} GiB HBM, "
        f"{p['peak_flops'] / 1e12:.0f} TFLOP/s peak bf16 per chip; {p['hosts']} host(s) of "
        f"{p['host_chips']} chips",
        f"mesh: data {p['data']} x model {p['model']} (--config.mesh.model={p['model']})",
        f"per device, from shapes: {p['estimate_text']}; {p['usable_bytes'] / gib:.2f} GiB "
        f"usable ({planning.USABLE_FRACTION:.0%} of HBM)",
    ]
    whole = p["estimate"]["replicated_params"]
    if whole:
        lines.append(f"  left whole on every device (axis not divisible by {p['model']}): "
                     + ", ".join(whole))  # fmt: skip
    if "compiled" not in p:
        return "\n".join(lines)
    c = p["compiled"]
    lines += [
        f"per device, compiled (XLA:CPU, {p['data'] * p['model']} simulated devices): arguments "
        f"{c['argument_bytes'] / gib:.2f} GiB (backbone {c['backbone_bytes'] / gib:.2f}), "
        f"temporaries {c['temp_bytes'] / gib:.2f} GiB, outputs not aliased "
        f"{(c['output_bytes'] - c['alias_bytes']) / gib:.2f} GiB: total "
        f"{p['compiled_total_bytes'] / gib:.2f} GiB"
        + ("" if p["fits"] else "  ** over the usable HBM **"),
        f"FLOPs per step per device: {c['flops'] / 1e12:.3f} TFLOP (XLA cost analysis); "
        f"predicted step {p['step_seconds'] * 1e3:.1f} ms at {p['utilisation']:.0%} of peak; "
        f"{p['num_steps']} steps: {format_duration(p['run_seconds'])}",
        f"input per host: {p['host_pairs_per_second']:.0f} training pairs/s; at "
        f"{planning.CPU_SECONDS_PER_PAIR * 1e3:.1f} ms CPU per pair (bench/RESULTS.md, 224 px "
        f"PNG) that is {p['host_cpu_cores']:.1f} CPU cores",
    ]
    return "\n".join(lines)


def abstract_step_inputs(config, mesh, table: list | None = None):
    """(program, args, static kwargs) of the configured step for abstract inputs on `mesh`:
    the backbone split by the rules, state and hyperparameters replicated, the batch on
    'data'. `table`: a sweep's members (the population step)."""
    import jax
    import jax.numpy as jnp

    from depthg_jax.method import objective as objective_lib
    from depthg_jax.models import model as model_lib
    from depthg_jax.models import partitioning
    from depthg_jax.runtime import sharding
    from depthg_jax.training import planning, population
    from depthg_jax.training import step as step_lib

    spec = model_lib.ModelSpec.from_config(config)
    dtype = str(config.model.get("backbone_param_dtype", "float32"))
    shapes = planning.backbone_shapes(spec.variant)
    backbone = partitioning.abstract_backbone(shapes, mesh, dtype)
    replicated = sharding.replicated(mesh)
    hp = objective_lib.hparams(config)
    if table:
        objective = population.shared_objective(config, table)
        program = population.make_population_step("jit", spec, objective, mesh)
        hp = population.member_hparams(table)
        make_state = lambda: step_lib.create_population_state(  # noqa: E731
            spec, objective_lib.hparams(config), jax.random.key(0), len(table)
        )
    else:
        objective = objective_lib.Objective.from_config(config)
        program = step_lib.make_train_step("jit", spec, objective, mesh)
        make_state = lambda: step_lib.create_train_state(spec, hp, jax.random.key(0))  # noqa: E731

    def on(tree, sharding_):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree
        )

    state = on(jax.eval_shape(make_state), replicated)
    key = on(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    hp = on(jax.eval_shape(lambda: hp), replicated)
    b, r = config.train.batch_size, config.data.train_res
    batched = sharding.batch_sharding(mesh)
    fields = {"image": ((b, r, r, 3), jnp.uint8), "depth": ((b, r, r), jnp.float32),
              "label": ((b, r, r), jnp.int32)}  # fmt: skip
    batch = {}
    for name, (shape, dt) in fields.items():
        batch[name] = jax.ShapeDtypeStruct(shape, dt, sharding=batched)
        batch[f"{name}_pos"] = jax.ShapeDtypeStruct(shape, dt, sharding=batched)
    num_side = objective.samples_at(0)
    return program, (state, backbone, batch, key, hp), {"num_side": num_side}


def compile_step(config, mesh, table: list | None = None):
    """Lowers and compiles the configured step for abstract inputs on `mesh` (no allocation);
    XLA's analyses of it (planning.Compiled)."""
    from depthg_jax.training import planning

    program, args, kwargs = abstract_step_inputs(config, mesh, table)
    compiled = program.lower(*args, **kwargs).compile()
    return planning.analyse(compiled, args)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    commands.run_main(main)
