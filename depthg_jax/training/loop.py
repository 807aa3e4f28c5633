"""A training run's set-up and loop, shared by a single head (`train`) and a population
(`population`): the guarded workdir, model and data, resume from the newest intact
checkpoint, the steps with finite checks, validation, checkpoints and clean stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from depthg_jax import config as config_lib
from depthg_jax.data import pipeline
from depthg_jax.evaluation import evaluator, reports
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, distributed, files, seeds, sharding
from depthg_jax.runtime.metric_writer import MetricWriter
from depthg_jax.runtime.preemption import Preemption
from depthg_jax.training import finite, setup_data, summaries
from depthg_jax.training import workdir as workdir_lib

RESULTS_FILE = "results.json"


def check_eval_split(config: ml_collections.ConfigDict) -> None:
    """Refuses at start an evaluation split that is missing, empty or has no labels."""
    data = config_lib.eval_data(config)
    try:
        source = pipeline.make_source(data, data.eval_split, role="eval")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"the evaluation split {data.eval_split!r} of {data.name} at "
            f"{data.root or data.data_dir} cannot be read: {e}"
        ) from e
    records = getattr(source, "records", None)
    if records is not None and not any(getattr(r, "label", None) for r in records):
        raise ValueError(
            f"the evaluation split {data.eval_split!r} of {data.name} at {data.root} has no "
            f"labels ({len(records)} images): validation needs labelled images"
        )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        files.write_text_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=2))


def write_results(workdir: str, results: dict) -> None:
    """<workdir>/results.json, the training summary (process 0, atomically)."""
    if jax.process_index() == 0:
        record = {"kind": "training summary", **results}
        files.write_text_atomic(
            os.path.join(workdir, RESULTS_FILE), json.dumps(record, indent=2, default=float)
        )



class Validator:
    """In-training validation on the evaluation split (no flip, no CRF), and its data.

    One evaluator, built once (its step compiles once), over the predict function the
    trainer passes: one head's, or a population's.
    """

    def __init__(self, config, backbone_params, mesh, predict: evaluator.PredictFn):
        self.config = config
        self.backbone_params = backbone_params
        self.mesh = mesh
        self.eval_data = config_lib.eval_data(config)
        self.depth_cast = config_lib.release_depth_cast(config, self.eval_data.name)
        self.evaluator = evaluator.Evaluator(
            predict, config.data.n_classes, mesh, progress=False, desc="validate"
        )

    def loader(self, max_batches: int):
        return pipeline.make_eval_loader(
            self.eval_data,
            global_batch_size=self.config.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_batches=max_batches,
            release_depth_cast=self.depth_cast,
        )

    def __call__(self, trainable: dict):
        return self.evaluator(
            model_lib.full_params(self.backbone_params, trainable),
            self.loader(self.config.train.eval_batches),
        )


def train_examples(config: ml_collections.ConfigDict) -> int:
    return len(pipeline.make_source(config.data, config.data.train_split))


@dataclasses.dataclass
class Run:
    """A started training run: everything the loop needs, set up the same way for a single
    head and for a population (`start_run`)."""

    config: ml_collections.ConfigDict  # resolved
    workdir: str
    mesh: Any
    spec: model_lib.ModelSpec
    backbone_params: dict  # replicated on the mesh
    k_step: jax.Array
    manager: Any
    loader: Any
    validate: Validator
    eval_every: int
    state: Any  # restored, or freshly initialised
    initial_params: dict  # host copy of the initial trainable params (baselines)
    finished: dict | None  # results.json of a run that already ended, else None


@dataclasses.dataclass(frozen=True)
class Reporting:
    """How the loop turns a run's outputs into logged scalars (a population: per member)."""

    log_scalars: Callable[[dict], dict] = lambda fetched: fetched
    # -> scalars written and attached to the checkpoint (must hold train.best_metric)
    val_scalars: Callable[[Any], dict] = reports.val_summary
    format_val: Callable[[int, Any], str] = reports.format_val
    picture_grids: bool = True  # train.image_every summaries (a single head's predictions)


def start_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    init_state: Callable[[model_lib.ModelSpec, jax.Array], Any],
    predict: Callable[[model_lib.ModelSpec], evaluator.PredictFn],
) -> Run:
    """Guards the workdir, builds model and data, restores the latest intact checkpoint."""
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.guard_resume(config, workdir)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")

    spec = model_lib.ModelSpec.from_config(config)
    k_backbone, k_state, k_step = seeds.run_keys(config.seed)
    backbone_params = model_lib.init_backbone(config.model, k_backbone)
    setup_data.prepare_data(config)
    check_eval_split(config)
    write_config(config, workdir)
    backbone_params = sharding.replicate(backbone_params, mesh)

    state = sharding.replicate(init_state(spec, k_state), mesh)
    initial_params = jax.device_get(state.params)  # host copy: the step donates `state`
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"),
        keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every,
        best_metric=config.train.best_metric,
    )
    loader = pipeline.make_train_loader(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        release_depth_cast=config_lib.release_depth_cast(config, config.data.name),
    )
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpoint.restore_train_state(manager, abstract_state, set_aside=True)
    if restored is not None:
        state, data_state, start = restored
        loader.set_state(data_state)
        print(f"Resumed from {workdir}/checkpoints at step {start}", flush=True)
    resumed_at = restored[2] if restored is not None else 0
    if jax.process_index() == 0:
        workdir_lib.truncate_metrics(workdir, resumed_at)
    finished = workdir_lib.finished_results(workdir, resumed_at, config.train.num_steps)
    eval_every = config_lib.validation_interval(config, train_examples(config))
    if eval_every != config.train.eval_every:
        print(
            f"Validating every {eval_every} batches (each epoch's end): "
            f"train.eval_every={config.train.eval_every} exceeds a quarter epoch",
            flush=True,
        )
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        spec=spec,
        backbone_params=backbone_params,
        k_step=k_step,
        manager=manager,
        loader=loader,
        validate=Validator(config, backbone_params, mesh, predict(spec)),
        eval_every=eval_every,
        state=state,
        initial_params=initial_params,
        finished=finished,
    )


def finish_training(run: Run, outcome: dict):
    """Saves the final state and returns (state, its validation): the last in-loop one if it
    was of the final step, else a fresh one."""
    state, final = outcome["state"], outcome["last_val"]
    final_step = int(jax.device_get(state.step))
    checkpoint.finish(run.manager)
    if final_step not in run.manager.all_steps():
        checkpoint.save_train_state(
            run.manager, final_step, state, outcome["data_state"], force=True
        )
    checkpoint.finish(run.manager)
    if final is None or outcome["last_val_step"] != final_step:
        final = run.validate(state.params)
    return state, final


def run_loop(run: Run, step_fn, writer: MetricWriter, reporting: Reporting) -> dict:
    """Runs the steps from state.step to num_steps; returns the final state and last validation,
    or {"preempted_at": step} after a SIGTERM/SIGINT (a checkpoint of that step is saved).

    step_fn(state, batch, step_index) -> (state, metrics with "finite") (training.step.BoundStep).
    """
    config, manager, eval_every, state = run.config, run.manager, run.eval_every, run.state
    prefetch = pipeline.Prefetcher(run.loader, run.mesh, size=config.data.prefetch)
    start = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    data_state = run.loader.get_state()
    last_val: dict | None = None
    last_val_step = -1
    progress = progress_bar(start, num_steps)
    t_last, steps_since = time.perf_counter(), 0
    try:
        with Preemption() as preemption:
            if distributed.any_process(preemption.requested):
                progress.write(f"{preemption.signal_name} before step {start + 1}: "
                               "nothing new to save; exiting")  # fmt: skip
                return {"preempted_at": start}
            pending: list[tuple[int, dict]] = []  # (step, metrics) not yet checked finite
            for step in range(start, num_steps):
                batch, data_state = next(prefetch)
                state, metrics = step_fn(state, batch, step)
                steps_since += 1
                done = step + 1
                pending.append((done, metrics))
                progress.update(1)
                logging_step = done % config.train.log_every == 0 or done == num_steps
                validating = bool(eval_every and done % eval_every == 0)
                if logging_step or validating or manager.should_save(done):
                    finite.require_finite_steps(config, pending)
                if logging_step:
                    fetched = jax.device_get(metrics)
                    fetched.pop("finite", None)
                    scalars = reporting.log_scalars(fetched)
                    finite.check_finite(done, scalars)
                    rate = steps_since / (time.perf_counter() - t_last)
                    scalars["steps_per_s"] = rate
                    scalars["images_per_s"] = rate * config.train.batch_size
                    t_last, steps_since = time.perf_counter(), 0
                    writer.write(done, scalars)
                    postfix = {"img_s": f"{scalars['images_per_s']:.1f}"}
                    if "loss" in scalars:
                        postfix["loss"] = f"{scalars['loss']:.4f}"
                    progress.set_postfix(**postfix)
                val_metrics = None
                if validating:
                    last_val, last_val_step = run.validate(state.params), done
                    val_metrics = reporting.val_scalars(last_val)
                    writer.write(done, val_metrics)
                    progress.write(reporting.format_val(done, last_val))
                pictures = reporting.picture_grids and config.train.image_every
                image_step = bool(pictures and done % config.train.image_every == 0)
                grid = None
                if image_step or (validating and reporting.picture_grids):
                    grid = summaries.write_image_summary(
                        run.workdir if image_step else None,  # else for TensorBoard only
                        done,
                        model_lib.full_params(run.backbone_params, state.params),
                        config,
                        run.validate.loader(1),
                        last_val,
                    )
                if validating:
                    summaries.log_validation(writer, done, last_val, config, grid)
                # Every validated step is saved, so the best checkpoint is one the release
                # would have kept (docs/release.md#checkpoint-choice).
                checkpoint.save_train_state(
                    manager, done, state, data_state, metrics=val_metrics,
                    force=val_metrics is not None,
                )  # fmt: skip
                check_now = jax.process_count() == 1 or done % config.train.log_every == 0
                if check_now and distributed.any_process(preemption.requested):
                    finite.require_finite_steps(config, pending)
                    checkpoint.finish(manager)
                    if done not in manager.all_steps():
                        checkpoint.save_train_state(manager, done, state, data_state, force=True)
                        checkpoint.finish(manager)
                    progress.write(
                        f"{preemption.signal_name}: saved a checkpoint at step {done}; exiting"
                    )
                    return {"preempted_at": done}
    except BaseException:
        checkpoint.abandon_in_flight(manager)  # finished or removed, never half-written
        raise
    finally:
        prefetch.close()
        progress.close()
    return {
        "state": state,
        "data_state": data_state,
        "last_val": last_val,
        "last_val_step": last_val_step,
    }


def progress_bar(start: int, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
