"""The single-head driver: `train_and_evaluate(config, workdir)` trains DepthG as configured,
validates, reports and exports; it resumes from `workdir` when that holds the same run.

The set-up, loop and guards are the ones a population uses too (training/loop.py); the step
is training/step.py's; the exports go through training/exports.py.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from depthg_jax import config as config_lib
from depthg_jax.evaluation import baselines, evaluator, reports
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, distributed, sharding
from depthg_jax.runtime.metric_writer import MetricWriter
from depthg_jax.training import exports, loop, summaries, sweep
from depthg_jax.training import step as step_lib
from depthg_jax.training import workdir as workdir_lib


@workdir_lib.exclusive
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains DepthG as configured, evaluates, exports; resumes from `workdir` if it has a run."""
    workdir = os.path.abspath(workdir)
    config = config_lib.resolve(config, workdir)
    if sweep.is_sweep(config):
        raise ValueError(
            "config.sweep names a population: train it with depthg_jax.training.population."
            "train_and_evaluate (python -m depthg_jax.main does)"
        )
    hp = objective_lib.hparams(config)
    objective = objective_lib.Objective.from_config(config)
    if not loop.train_has_labels(config):
        print("The training split has no labels: the linear probe is skipped", flush=True)
        objective = dataclasses.replace(objective, linear_probe=False)
    run = loop.start_run(
        config,
        workdir,
        init_state=lambda spec, key: step_lib.create_train_state(spec, hp, key),
        predict=lambda spec: evaluator.head_predictor(spec, flip=False),
    )
    if run.finished is not None:
        print(f"{workdir} already finished: {loop.RESULTS_FILE} kept", flush=True)
        return run.finished
    writer = MetricWriter(workdir)
    start_step = int(jax.device_get(run.state.step))
    summaries.log_run_start(writer, config, start_step, labelled=run.plan.labelled)
    program = step_lib.make_train_step(config.train.parallelism, run.spec, objective, run.mesh)
    step_fn = step_lib.BoundStep(
        program, run.backbone_params, run.k_step, sharding.replicate(hp, run.mesh), objective
    )
    reporting = loop.Reporting() if run.plan.labelled else loop.LABEL_FREE_REPORTING
    outcome = loop.run_loop(run, step_fn, writer, reporting)
    if "preempted_at" in outcome:
        writer.close()
        return {"preempted_at": outcome["preempted_at"]}
    state, final = loop.finish_training(run, outcome)
    final_step = int(jax.device_get(state.step))
    if outcome["last_val_step"] != final_step:
        print(reporting.format_val(final_step, final), flush=True)
    results = {"step": final_step, "validation": run.plan.mode}
    results["trained"] = reporting.val_scalars(final)
    if "cluster" in final:  # scored (train.eval_batches may leave out every labelled image)
        # The final head's cluster -> class matching: `segment --assignment=W/results.json`.
        results["assignment"] = {
            "assignment": [int(a) for a in final["cluster"]["assignment"]],
            "step": final_step,
            "export": "export",
            "found_on": "the evaluation split's labels, no flip, no CRF (in-training validation)",
        }
    else:
        results["usage"] = reports.usage_summary(final["usage"]["cluster"])
    if config.train.report_baselines and run.plan.labelled:
        results.update(_baselines(run))
        print(reports.format_baselines(results), flush=True)
    elif config.train.report_baselines:
        print("train.report_baselines: skipped, the baselines are scored on labels", flush=True)
    grid = summaries.write_image_summary(
        workdir,
        final_step,
        model_lib.full_params(run.backbone_params, state.params),
        config,
        run.validate.loader(1),
        final,
    )
    if outcome["last_val_step"] != final_step:  # a validation the loop did not log
        summaries.log_validation(writer, final_step, final, config, grid)
    writer.write(final_step, results["trained"])
    if outcome["last_val_step"] != final_step:
        for name, counts in reporting.val_histograms(final).items():
            writer.write_histogram(final_step, name, counts)
    writer.close()
    results["best"] = _export(run, state, final)
    loop.write_results(workdir, results)
    distributed.sync("export")
    if jax.process_index() == 0:
        for name in ("export", "export_best"):
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                print(reports.describe_checkpoint(path, checkpoint.load_selection(path)))
    return results


def _baselines(run: loop.Run) -> dict:
    """The untrained head's probe and k-means baselines (the demo's reference points)."""
    config, spec = run.config, run.spec
    initial_params = sharding.replicate(run.initial_params, run.mesh)
    out = {"untrained_head": reports.val_summary(run.validate(initial_params, 0))}
    initial = model_lib.full_params(run.backbone_params, initial_params)
    for name, embed, params in (
        ("kmeans_untrained_head", baselines.code_embedding(spec), initial),
        ("kmeans_backbone", baselines.backbone_embedding(spec), run.backbone_params),
    ):
        result = baselines.evaluate_kmeans(
            embed, params, spec.n_classes, run.validate.loader(0), seed=config.seed, mesh=run.mesh
        )
        out[name] = reports.val_summary(result)
    return out


def _export(run: loop.Run, state, final) -> dict | None:
    """Writes export/ (the final head) and export_best/ (the best validated checkpoint, with
    its step and score; only when validating on labels); process 0 only. Returns the best
    checkpoint's selection record (None without one)."""
    config, workdir = run.config, run.workdir
    final_step = int(jax.device_get(state.step))
    best = checkpoint.best_selection(run.manager, config.train.best_metric)
    if jax.process_index() != 0:
        return best
    final_selection = {
        "checkpoint": "final",
        "step": final_step,
        "metric": config.train.best_metric,
        "score": reports.val_summary(final).get(config.train.best_metric),
        "validation": run.plan.mode,
    }
    exports.write_export(
        os.path.join(workdir, "export"),
        config,
        run.backbone_params,
        state.params,
        final_selection,
        replace=True,
    )
    if best is None and not run.plan.labelled:
        print(
            "export_best/ not written: the run validated without labels, and no label-free "
            "score tells a better segmentation from a worse one (export/ holds the final head)",
            flush=True,
        )
    if best is not None:
        layout = exports.RunLayout(workdir=workdir, config=config, members=None)
        trainable, _, _ = exports.restore_trainable(layout, step=best["step"], manager=run.manager)
        exports.write_export(
            os.path.join(workdir, "export_best"),
            config,
            run.backbone_params,
            trainable,
            best,
            replace=True,
        )
    return best
