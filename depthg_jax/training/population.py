"""Sweep mode: a population of DepthG heads trained in one jitted step (depthg_jax.training.sweep).

The population's state is a `step.TrainState` whose params and optimiser state carry a
leading member axis P (the step count is shared). One step runs the frozen backbone once on
the global batch, then `vmap`s the loss, its gradient and the Adam update over the members'
trainable state and per-member hyperparameters (`objective.hparams`, one column per member).
Everything the members do not own is computed once and shared: the backbone's features, the
FPS coordinates, the random coordinates, the negative permutations and every dropout mask
(all drawn from the step's key fold_in(root, step), as a single run draws them). So member i
trains exactly as a single run with member i's settings, and comparisons are paired.

Validation scores every member on the same evaluation batches with one backbone forward per
batch (the heads and probes then run member by member). `train_and_evaluate` is the sweep
trainer: one Orbax checkpoint holds the whole population, SIGTERM saves and exits as in a
single run, and the outputs are the final table, sweep.json, a TensorBoard run per member,
the best member's export and a picture of the metric per member against each swept value.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthg_jax import config as config_lib
from depthg_jax.evaluation import evaluator, reports
from depthg_jax.method import objective as objective_lib
from depthg_jax.runtime import checkpoint, distributed, files, sharding
from depthg_jax.runtime.metric_writer import MetricWriter
from depthg_jax.training import exports, loop, summaries, sweep
from depthg_jax.training import step as step_lib
from depthg_jax.training import workdir as workdir_lib

# --------------------------------------------------------------------------------------
# Hyperparameters and the objective
# --------------------------------------------------------------------------------------


def member_hparams(table: list[dict]) -> dict:
    """{name: (P,) float32} of objective.hparams' names (+ "fps" when loss.sampling is mixed)."""
    hp = {
        name: jnp.asarray([m["settings"][field] for m in table], jnp.float32)
        for name, field in config_lib.HPARAM_FIELDS.items()
    }
    if sweep.mixes_sampling(table):
        hp["fps"] = jnp.asarray(
            [m["settings"][sweep.SAMPLING_FIELD] == "fps" for m in table], jnp.float32
        )
    return hp


def shared_objective(config: ml_collections.ConfigDict, table: list[dict]):
    """The objective every member's step reads: the members' common loss.sampling, or
    MIXED (hp["fps"] picks per member)."""
    samplings = {m["settings"][sweep.SAMPLING_FIELD] for m in table}
    sampling = samplings.pop() if len(samplings) == 1 else objective_lib.MIXED
    return objective_lib.Objective.from_config(config, sampling=sampling)


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


def population_train_step(
    state: step_lib.TrainState,
    backbone_params: dict,
    batch: dict,
    root_key: jax.Array,
    hp: dict,
    *,
    spec,
    objective: objective_lib.Objective,
    num_side: int,
) -> tuple[step_lib.TrainState, dict]:
    """One optimiser update of every member on one global batch; metrics gain axis P."""
    key = jax.random.fold_in(root_key, state.step)
    feats, feats_pos = objective_lib.pair_features(spec, backbone_params, batch)

    def member(params, opt_state, member_hp):
        one = step_lib.TrainState(step=state.step, params=params, opt_state=opt_state)
        new, out = step_lib.update_from_features(
            one, feats, feats_pos, batch, key, member_hp,
            spec=spec, objective=objective, num_side=num_side,
        )  # fmt: skip
        del out["num_samples"]  # shared by all members: one scalar below
        return new.params, new.opt_state, out

    params, opt_state, out = jax.vmap(member)(state.params, state.opt_state, hp)
    out["num_samples"] = jnp.asarray(num_side, jnp.int32)
    return step_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state), out


def make_population_step(parallelism: str, spec, objective, mesh):
    """The jitted population step (state donated, outputs replicated; one compile per S)."""
    if parallelism != "jit":
        raise ValueError(f'sweep mode runs with train.parallelism="jit", not {parallelism!r}')
    return step_lib.jit_program(population_train_step, spec, objective, mesh)


# --------------------------------------------------------------------------------------
# The sweep trainer
# --------------------------------------------------------------------------------------


@workdir_lib.exclusive
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the population config.sweep names, validates, reports, exports the best member.

    The run is set up, looped and guarded exactly as a single run (`loop.start_run`,
    `loop.run_loop`); only the state, the step, the predict function and the reports differ.
    """
    workdir = os.path.abspath(workdir)
    config = config_lib.resolve(config, workdir)
    table = sweep.member_table(config)
    memory = sweep.check_memory(config, len(table))  # before anything is compiled
    names = [m["name"] for m in table]
    print(
        f"Sweep: {len(table)} members, estimated {memory['estimate_bytes'] / 2**30:.2f} GiB "
        f"of {memory['budget_bytes'] / 2**30:.1f}; members in {workdir}/{sweep.TABLE_FILE}",
        flush=True,
    )
    base_hp = objective_lib.hparams(config)
    run = loop.start_run(
        config,
        workdir,
        init_state=lambda spec, key: step_lib.create_population_state(
            spec, base_hp, key, len(table)
        ),
        predict=lambda spec: evaluator.population_predictor(spec),
    )
    if jax.process_index() == 0:
        sweep.write_table(table, workdir)
    objective = shared_objective(config, table)
    program = make_population_step(config.train.parallelism, run.spec, objective, run.mesh)
    step_fn = step_lib.BoundStep(
        program,
        run.backbone_params,
        run.k_step,
        sharding.replicate(member_hparams(table), run.mesh),
        objective,
    )
    writer = MetricWriter(workdir, members=names)
    summaries.log_run_start(writer, config, int(jax.device_get(run.state.step)), members=table)
    outcome = loop.run_loop(run, step_fn, writer, _reporting(config, names))
    if "preempted_at" in outcome:
        writer.close()
        return {"preempted_at": outcome["preempted_at"]}
    state, final = loop.finish_training(run, outcome)
    final_step = int(jax.device_get(state.step))
    if outcome["last_val_step"] != final_step:  # a validation the loop did not log
        summaries.log_validation(writer, final_step, final, config)
    rows = member_rows(table, final, config.train.best_metric)
    best = max(range(len(rows)), key=lambda i: (rows[i][config.train.best_metric], -i))
    selection = {
        "checkpoint": "final",
        "step": final_step,
        "metric": config.train.best_metric,
        "score": rows[best][config.train.best_metric],
        "selected_on": checkpoint.BEST_SELECTED_ON,
    }
    for i, row in enumerate(rows):
        writer.write(final_step, {f"{names[i]}/{k}": v for k, v in row.items() if k != "member"})
    writer.close()
    fields = sweep.swept_fields(table)
    layout = exports.RunLayout(workdir=workdir, config=config, members=table)
    member_config, trainable, selection = exports.member_export(
        layout, jax.device_get(state.params), best, selection
    )
    text = format_table(rows, table, fields, selection)
    print(text, flush=True)
    results = {
        "step": final_step,
        "members": rows,
        "swept_fields": fields,
        "best": selection,
        "memory_estimate": memory,
    }
    if jax.process_index() == 0:
        files.write_text_atomic(
            os.path.join(workdir, exports.SWEEP_SUMMARY), json.dumps(results, indent=2)
        )
        files.write_text_atomic(os.path.join(workdir, "sweep_table.txt"), text + "\n")
        write_sweep_picture(
            os.path.join(workdir, "sweep.png"), rows, table, fields, config.train.best_metric
        )
        exports.write_export(
            os.path.join(workdir, "export"),
            member_config,
            run.backbone_params,
            trainable,
            selection,
            replace=True,
        )
    loop.write_results(workdir, results)
    distributed.sync("export")
    return results


def _reporting(config, names: list[str]) -> loop.Reporting:
    """Per-member scalars as "<member>/<metric>"; the checkpoint policy sees the best member's
    score under train.best_metric."""

    def log_scalars(fetched: dict) -> dict:
        scalars = {}
        for k, v in fetched.items():
            v = np.asarray(v)
            if v.ndim == 0:
                scalars[k] = v
                continue
            for i, name in enumerate(names):
                scalars[f"{name}/{k}"] = v[i]
        return scalars

    def member_scores(results: list) -> list[float]:
        return [reports.val_summary(r)[config.train.best_metric] for r in results]

    def val_scalars(results: list) -> dict:
        out = {}
        for name, result in zip(names, results, strict=True):
            out.update({f"{name}/{k}": v for k, v in reports.val_summary(result).items()})
        out[config.train.best_metric] = max(member_scores(results))  # the best member's
        return out

    def format_val(done: int, results: list) -> str:
        scores = member_scores(results)
        return f"[step {done}] {config.train.best_metric} per member: " + ", ".join(
            f"{n} {100 * s:.1f}" for n, s in zip(names, scores, strict=True)
        )

    return loop.Reporting(
        log_scalars=log_scalars, val_scalars=val_scalars, format_val=format_val,
        picture_grids=False,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def member_rows(table: list[dict], results: list, metric: str) -> list[dict]:
    rows = []
    for member, result in zip(table, results, strict=True):
        rows.append({"member": member["name"], **reports.val_summary(result)})
    return rows


def format_table(rows: list[dict], table: list[dict], fields: list[str], selection) -> str:
    """The final table: member, its swept values, cluster and linear acc / mIoU (%)."""
    cols = ["member"] + [f.split(".")[1] for f in fields]
    cols += ["cluster acc", "cluster mIoU", "linear acc", "linear mIoU"]
    body = []
    for row, member in zip(rows, table, strict=True):
        cells = [row["member"]] + [_fmt(member["settings"][f]) for f in fields]
        cells += [
            f"{100 * row[k]:.1f}"
            for k in ("val/cluster_accuracy", "val/cluster_miou", "val/linear_accuracy",
                      "val/linear_miou")
        ]  # fmt: skip
        body.append(cells)
    widths = [max(len(c), *(len(r[j]) for r in body)) for j, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    lines.append(
        f"best member: {selection['member']} by {selection['metric']} "
        f"{100 * selection['score']:.1f} at step {selection['step']}, selected on "
        f"{selection['selected_on']} (exported to export/)"
    )
    return "\n".join(lines)


def _fmt(value) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def write_sweep_picture(path, rows, table, fields, metric, panel=(300, 220)) -> None:
    """A PNG (PIL) with one panel per swept field: each member's metric (%, y) against its
    value of the field (x; categories for loss.sampling), points labelled by member."""
    from PIL import Image, ImageDraw

    fields = fields or ["member"]
    pw, ph = panel
    left, right, top, bottom = 44, 12, 22, 34
    img = Image.new("RGB", (pw * len(fields), ph), "white")
    draw = ImageDraw.Draw(img)
    scores = [100 * r[metric] for r in rows]
    y_lo, y_hi = min(scores), max(scores)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    for j, field in enumerate(fields):
        x0 = j * pw
        if field == "member":
            xs, ticks = list(range(len(rows))), None
        else:
            xs = [m["settings"][field] for m in table]
            ticks = sorted(set(xs)) if any(isinstance(x, str) for x in xs) else None
            if ticks:
                xs = [ticks.index(x) for x in xs]
        x_lo, x_hi = min(xs), max(xs)
        if x_hi - x_lo < 1e-12:
            x_lo, x_hi = x_lo - 0.5, x_hi + 0.5

        def to_px(x, y, x0=x0, x_lo=x_lo, x_hi=x_hi):
            px = x0 + left + (x - x_lo) / (x_hi - x_lo) * (pw - left - right - 20) + 10
            py = top + (y_hi - y) / (y_hi - y_lo) * (ph - top - bottom - 20) + 10
            return px, py

        draw.rectangle([x0 + left, top, x0 + pw - right, ph - bottom], outline=(90, 90, 90))
        draw.text((x0 + left, 4), f"{metric} (%) vs {field}", fill="black")
        draw.text((x0 + 2, top), f"{y_hi:.1f}", fill="black")
        draw.text((x0 + 2, ph - bottom - 10), f"{y_lo:.1f}", fill="black")
        if ticks:
            for t, name in enumerate(ticks):
                draw.text((to_px(t, y_lo)[0] - 3 * len(name), ph - bottom + 4), name, fill="black")
        else:
            draw.text((x0 + left, ph - bottom + 4), f"{x_lo:.4g}", fill="black")
            draw.text((x0 + pw - right - 40, ph - bottom + 4), f"{x_hi:.4g}", fill="black")
        for x, y, member in zip(xs, scores, table, strict=True):
            px, py = to_px(x, y)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(31, 119, 180))
            label_x = px + 4 if px < x0 + pw - 70 else px - 4 - 6 * len(member["name"])
            draw.text((label_x, py - 12), member["name"], fill=(60, 60, 60))
    files.save_image_atomic(path, np.asarray(img))
