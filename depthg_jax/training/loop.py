"""A training run's set-up and loop, shared by a single head (`train`) and a population
(`population`): the guarded workdir, model and data, resume from the newest intact
checkpoint, the steps with finite checks, validation, checkpoints and clean stops.

Validation (`train.validate`, decided at start by `plan_validation` and said in one line):
on labels, the evaluation split is scored as the release scores it and the best score picks
export_best/; without labels, label-free monitoring runs instead on the same split (cluster
usage from the one evaluator, the training objective's terms on it, picture grids), and no
checkpoint is picked, since no label-free signal tells a better segmentation from a worse one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from depthg_jax import config as config_lib
from depthg_jax.data import label_check, pipeline
from depthg_jax.evaluation import evaluator, reports
from depthg_jax.method import image_ops
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.models import partitioning
from depthg_jax.runtime import checkpoint, distributed, files, seeds, sharding, xla
from depthg_jax.runtime.metric_writer import MetricWriter
from depthg_jax.runtime.preemption import Preemption
from depthg_jax.training import finite, planning, setup_data, summaries, sweep
from depthg_jax.training import workdir as workdir_lib

RESULTS_FILE = "results.json"


LABELS, LABEL_FREE = "labels", "label-free"


@dataclasses.dataclass(frozen=True)
class ValidationPlan:
    """How a run validates: on LABELS or LABEL_FREE, and the line that says so at start."""

    mode: str
    message: str

    @property
    def labelled(self) -> bool:
        return self.mode == LABELS


def plan_validation(config: ml_collections.ConfigDict) -> ValidationPlan:
    """Reads the evaluation split and its labels once, before any training work, and decides
    how the run validates (`train.validate`). Raises ValueError when the split cannot be read,
    when a label holds an id >= data.n_classes, when every label file is ignore-only, or when
    labels are asked for and there are none."""
    data = config_lib.eval_data(config)
    where = f"{data.root or data.data_dir}"
    name = f"the evaluation split {data.eval_split!r} of {data.name} at {where}"
    try:
        source = pipeline.make_source(data, data.eval_split, role="eval")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{name} cannot be read: {e}") from e
    setting = config.train.validate
    free = (
        "label-free monitoring every validation interval (held-out losses, cluster usage and "
        "picture grids, in metrics.jsonl and TensorBoard); the linear probe learns only from "
        "labelled training pixels; export_best/ is not written (nothing label-free picks a "
        "better checkpoint)"
    )
    if setting == "none":
        plan = ValidationPlan(LABEL_FREE, f"Validation: none (train.validate='none'): {free}")
    else:
        scan = label_check.scan_split(source, data.n_classes)
        label_check.require_usable(
            scan,
            name,
            "Remove those label files to train label-free, or set train.validate='none'.",
        )
        if scan["usable"]:
            said = label_check.describe(scan, data.eval_split)
            return ValidationPlan(LABELS, f"Validation: on labels ({said}; scored over those)")
        if setting == LABELS:
            raise ValueError(
                f"train.validate='labels', but {name} has no labels ({scan['total']} images): "
                "point data.eval_name/eval_root at labelled images, or set train.validate='auto' "
                "(label-free monitoring)"
            )
        plan = ValidationPlan(
            LABEL_FREE, f"Validation: label-free ({name} has no labels, train.validate='auto'): "
            f"{free}",
        )  # fmt: skip
    if sweep.is_sweep(config):
        raise ValueError(
            f"config.sweep names a population, which picks its best member on labels, but "
            f"{name} is validated label-free: give the sweep labelled evaluation data "
            "(data.eval_name/eval_root), or train the settings as single runs"
        )
    return plan


def train_has_labels(config: ml_collections.ConfigDict) -> bool:
    """Whether any training image has a label file (loose files; prepared records and the
    generated set are taken as labelled: their loss on all-ignored labels is 0 anyway)."""
    if config.data.data_dir or config.data.name == "synthetic":
        return True
    source = pipeline.make_source(config.data, config.data.train_split)
    records = getattr(source, "records", None)
    if records is None:
        return True
    return any(getattr(r, "label", None) for r in records)


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
    trainer passes: one head's, or a population's. Label-free (`labelled=False`): the same
    pass gives the cluster usage, and `HeldOutLosses` adds the objective's terms.
    """

    def __init__(
        self, config, backbone_params, mesh, predict: evaluator.PredictFn, *, labelled=True
    ):
        self.config = config
        self.backbone_params = backbone_params
        self.mesh = mesh
        self.labelled = labelled
        self.eval_data = config_lib.eval_data(config)
        self.depth_cast = config_lib.release_depth_cast(config, self.eval_data.name)
        self.evaluator = evaluator.Evaluator(
            predict, config.data.n_classes, mesh, progress=False, desc="validate"
        )
        self.heldout = None if labelled else HeldOutLosses(config, backbone_params)

    def loader(self, max_batches: int):
        return pipeline.make_eval_loader(
            self.eval_data,
            global_batch_size=self.config.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_batches=max_batches,
            release_depth_cast=self.depth_cast,
        )

    def __call__(self, trainable: dict, step: int = 0):
        """The evaluator's result for these params; label-free, with "heldout" losses at the
        objective's schedule of `step`."""
        loader = self.loader(self.config.train.eval_batches)
        result = self.evaluator(model_lib.full_params(self.backbone_params, trainable), loader)
        if self.heldout is not None:
            result["heldout"] = self.heldout(trainable, loader, step)
        return result


@xla.jit(static_argnames=("spec", "objective", "num_side"))
def heldout_terms(trainable, backbone, images, depth, key, step, hp, *, spec, objective,
                  num_side):  # fmt: skip
    """The objective's terms on a held-out batch, each image's positive its nearest other image
    of the batch (cosine of pooled features; the split has no KNN table). No labels: the
    linear probe's term is 0."""
    feats = model_lib.frozen_features(spec, backbone, images)
    pooled = image_ops.l2_normalize(feats.mean(axis=(1, 2)), eps=1e-10)  # as the KNN tables
    b = images.shape[0]
    similarity = pooled @ pooled.T - 3.0 * jnp.eye(b) * (b > 1)
    pos = jnp.argmax(similarity, axis=1)
    ignore = jnp.full(images.shape[:3], -1, jnp.int32)
    batch = {"image": images, "depth": depth, "label": ignore, "image_pos": images[pos],
             "depth_pos": depth[pos], "label_pos": ignore}  # fmt: skip
    _, metrics = objective_lib.losses_from_features(
        trainable, feats, feats[pos], batch, key, step,
        spec=spec, objective=objective, num_side=num_side, hp=hp,
    )  # fmt: skip
    return {k: metrics[k] for k in reports.HELDOUT_TERMS}


class HeldOutLosses:
    """Label-free monitoring's losses: the training objective on the evaluation split, with
    the training dropout under one fixed key so that steps compare.

    Each process scores its own valid images on its first local device (padding never
    enters a batch); the means are over every image of every process.
    """

    def __init__(self, config, backbone_params):
        self.spec = model_lib.ModelSpec.from_config(config)
        self.objective = objective_lib.Objective.from_config(config)
        self.device = jax.local_devices()[0]
        self.hp = jax.device_put(objective_lib.hparams(config), self.device)
        self.backbone = jax.device_put(jax.device_get(backbone_params), self.device)
        self.key = jax.device_put(seeds.run_keys(config.seed)[2], self.device)

    def __call__(self, trainable: dict, loader, step: int) -> dict:
        params = jax.device_put(jax.device_get(trainable), self.device)
        num_side = self.objective.samples_at(step)
        sums = np.zeros(len(reports.HELDOUT_TERMS))
        count = 0
        for batch in loader:
            valid = np.asarray(batch["valid"], bool)
            if not valid.any():
                continue
            terms = heldout_terms(
                params, self.backbone, np.asarray(batch["image"])[valid],
                np.asarray(batch["depth"])[valid], self.key, jnp.int32(step), self.hp,
                spec=self.spec, objective=self.objective, num_side=num_side,
            )  # fmt: skip
            terms = jax.device_get(terms)
            sums += valid.sum() * np.array([float(terms[k]) for k in reports.HELDOUT_TERMS])
            count += int(valid.sum())
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gathered = multihost_utils.process_allgather(np.append(sums, count))
            sums, count = gathered[:, :-1].sum(0), int(gathered[:, -1].sum())
        means = sums / max(count, 1)
        return {k: float(v) for k, v in zip(reports.HELDOUT_TERMS, means, strict=True)}


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
    backbone_params: dict  # on the mesh, split over 'model' (models/partitioning.py)
    k_step: jax.Array
    manager: Any
    loader: Any
    validate: Validator
    plan: ValidationPlan
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
    val_histograms: Callable[[Any], dict] = lambda result: {}  # name -> counts per id


LABEL_FREE_REPORTING = Reporting(
    val_scalars=reports.monitor_summary,
    format_val=reports.format_monitor,
    val_histograms=reports.usage_histograms,
)


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
    mesh = sharding.mesh_for(config)
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    if not sweep.is_sweep(config):  # a population checks its members' memory first
        planning.check_fits(config, mesh)  # before any device work

    spec = model_lib.ModelSpec.from_config(config)
    k_backbone, k_state, k_step = seeds.run_keys(config.seed)
    setup_data.prepare_data(config)
    plan = plan_validation(config)  # the evaluation labels, read before any model work
    if jax.process_index() == 0:
        print(plan.message, flush=True)
    # On the mesh, split over 'model' and in backbone_param_dtype; a converted backbone is
    # restored straight into its shards.
    backbone_params = partitioning.load_backbone(config.model, k_backbone, mesh)
    write_config(config, workdir)

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
        validate=Validator(config, backbone_params, mesh, predict(spec), labelled=plan.labelled),
        plan=plan,
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
        final = run.validate(state.params, final_step)
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
                    last_val, last_val_step = run.validate(state.params, done), done
                    val_metrics = reporting.val_scalars(last_val)
                    writer.write(done, val_metrics)
                    for name, counts in reporting.val_histograms(last_val).items():
                        writer.write_histogram(done, name, counts)
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
                # would have kept (docs/release.md#checkpoint-choice). Label-free scalars
                # pick nothing.
                scored = val_metrics if run.plan.labelled else None
                checkpoint.save_train_state(
                    manager, done, state, data_state, metrics=scored, force=scored is not None
                )
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
