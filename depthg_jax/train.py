"""Training: the train state, the jitted data-parallel train step, and the loop.

The step is one jitted program over a 1-D mesh ('data',): the global batch is sharded over
every device of every host, everything else is replicated, and means are over the global
batch, so results do not depend on the number of devices. The frozen backbone is a separate
replicated argument: never optimised, never checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from depthg_jax import checkpoint, inference, losses, sampling, schedules, sharding, xla
from depthg_jax.models import head as head_lib
from depthg_jax.models import vit

PROBE_KEYS = ("cluster_probe", "linear_probe")
OBJECTIVES = ("reference", "corrected")
DATASETS = ("cocostuff27", "cityscapes27", "potsdam3", "directory", "synthetic")


@flax.struct.dataclass
class TrainState:
    """Everything training changes: the step (batches done), trainable params, optimiser state."""

    step: jax.Array
    params: dict  # {"head", "cluster_probe", "linear_probe"}
    opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class Models:
    backbone: vit.DinoViT
    head: head_lib.SegmentationHead
    cluster_probe: head_lib.ClusterProbe
    linear_probe: head_lib.LinearProbe


def build_models(config: ml_collections.ConfigDict) -> Models:
    return Models(
        backbone=vit.DinoViT(variant=config.model.variant, dtype=jnp.dtype(config.model.dtype)),
        head=head_lib.SegmentationHead(dim=config.model.dim, dropout=config.model.dropout),
        cluster_probe=head_lib.ClusterProbe(n_classes=config.data.n_classes),
        linear_probe=head_lib.LinearProbe(n_classes=config.data.n_classes),
    )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, with the field named, on values the run could only fail on later."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"config.objective={config.objective!r}; expected one of {OBJECTIVES}")
    if config.model.variant not in vit.VARIANTS:
        raise ValueError(
            f"config.model.variant={config.model.variant!r}; expected one of {sorted(vit.VARIANTS)}"
        )
    for name_field, root_field in (("name", "root"), ("eval_name", "eval_root")):
        name = config.data[name_field] or config.data.name
        root = config.data[root_field] or config.data.root
        if name not in DATASETS:
            raise ValueError(f"config.data.{name_field}={name!r}; expected one of {DATASETS}")
        if name == "synthetic":
            continue
        if not root:
            raise ValueError(
                f"config.data.{root_field} is empty: set --config.data.{root_field}=DIR to the "
                f"{name} dataset (README, section Data)"
            )
        if not os.path.isdir(root):
            raise FileNotFoundError(f"config.data.{root_field}={root!r} is not a directory")
    if config.loss.sampling not in ("fps", "random"):
        raise ValueError(f"config.loss.sampling={config.loss.sampling!r}; use 'fps' or 'random'")
    patch = vit.patch_size(config.model.variant)
    for field in ("train_res", "eval_res"):
        res = config.data[field]
        if res % patch:
            raise ValueError(
                f"config.data.{field}={res} is not divisible by the patch size {patch}"
            )
    grid = (config.data.train_res // patch) ** 2
    if config.loss.feature_samples**2 > grid:
        raise ValueError(
            f"config.loss.feature_samples={config.loss.feature_samples}: "
            f"{config.loss.feature_samples}^2 samples exceed the {grid} feature-grid points"
        )
    check_backbone_weights(config)


# --------------------------------------------------------------------------------------
# State and optimiser
# --------------------------------------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with PyTorch defaults: the head at lr, each probe at probe_lr (SPEC §3)."""
    return optax.multi_transform(
        {"head": optax.adam(config.optim.lr), "probe": optax.adam(config.optim.probe_lr)},
        _param_groups,
    )


def _param_groups(params: dict) -> dict:
    group = {"head": "head", "cluster_probe": "probe", "linear_probe": "probe"}
    return {name: jax.tree.map(lambda _, g=group[name]: g, sub) for name, sub in params.items()}


def check_backbone_weights(config: ml_collections.ConfigDict) -> None:
    """Refuses a random backbone unless the config explicitly allows one (demo, tests)."""
    if not config.model.weights and not config.model.allow_random_backbone:
        raise ValueError(
            "config.model.weights is empty. DepthG distils a pretrained DINO backbone: download "
            f"the official weights for {config.model.variant} (see README, section Weights), then "
            f"`python -m depthg_jax.models.convert --variant={config.model.variant} --weights=FILE "
            "--out=DIR` and pass --config.model.weights=DIR (a .pth/.safetensors file also works). "
            "Set --config.model.allow_random_backbone=True only for smoke tests."
        )


def run_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(backbone init, train-state init, per-step root) keys, all derived from config.seed."""
    k_backbone, k_state, k_step = jax.random.split(jax.random.key(config.seed), 3)
    return k_backbone, k_state, k_step


def init_backbone(config: ml_collections.ConfigDict, models: Models, key: jax.Array) -> dict:
    """Loads the configured pretrained backbone, or a random one where the config allows it."""
    check_backbone_weights(config)
    if config.model.weights:
        from depthg_jax.models import convert

        return convert.load_backbone(config.model.weights, config.model.variant)
    patch = vit.patch_size(config.model.variant)
    dummy = jnp.zeros((1, 2 * patch, 2 * patch, 3), jnp.float32)
    return jax.jit(models.backbone.init)(key, dummy)["params"]


def init_trainable(config: ml_collections.ConfigDict, models: Models, key: jax.Array) -> dict:
    k_head, k_cluster, k_linear = jax.random.split(key, 3)
    c = vit.embed_dim(config.model.variant)
    feats = jnp.zeros((1, 2, 2, c), jnp.float32)
    code = jnp.zeros((1, 2, 2, config.model.dim), jnp.float32)
    return {
        "head": models.head.init({"params": k_head}, feats, deterministic=True)["params"],
        "cluster_probe": models.cluster_probe.init(k_cluster, code)["params"],
        "linear_probe": models.linear_probe.init(k_linear, code)["params"],
    }


def create_train_state(
    config: ml_collections.ConfigDict, models: Models, key: jax.Array
) -> TrainState:
    params = init_trainable(config, models, key)
    opt_state = make_optimizer(config).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


# --------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------


def loss_params(config: ml_collections.ConfigDict, depth_shift) -> losses.LossParams:
    return losses.LossParams(
        intra_shift=config.loss.pos_intra_shift,
        inter_shift=config.loss.pos_inter_shift,
        neg_shift=config.loss.neg_inter_shift,
        depth_shift=depth_shift,
        pointwise=config.loss.pointwise,
        depth_mode=config.objective,
        fov=config.loss.fov,
        far=config.loss.far,
        depth_positive=config.loss.depth_positive,
    )


def compute_losses(
    params: dict,
    backbone_params: dict,
    batch: dict,
    key: jax.Array,
    step: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    models: Models,
    num_side: int,
) -> tuple[jax.Array, dict]:
    """Total DepthG loss of one global batch and its parts (SPEC §3-§5)."""
    cl = config.loss
    n = batch["image"].shape[0]
    images = inference.normalize_images(jnp.concatenate([batch["image"], batch["image_pos"]]))
    feats_all = models.backbone.apply({"params": backbone_params}, images)
    feats_all = jax.lax.stop_gradient(feats_all.astype(jnp.float32))
    feats, feats_pos = feats_all[:n], feats_all[n:]

    keys = jax.random.split(key, 7)
    code = models.head.apply(
        {"params": params["head"]}, feats, deterministic=False, rngs={"dropout": keys[0]}
    )
    code_pos = models.head.apply(
        {"params": params["head"]}, feats_pos, deterministic=False, rngs={"dropout": keys[1]}
    )
    # The third, independent dropout mask acts on the features entering the correlations.
    feats_d = head_lib.channel_dropout(keys[2], feats, config.model.dropout)
    feats_pos_d = head_lib.channel_dropout(keys[3], feats_pos, config.model.dropout)

    depth, depth_pos = batch["depth"], batch["depth_pos"]
    grid_hw = feats.shape[1:3]
    if cl.sampling == "fps":
        # Anchors and positives in one batched FPS: one sequential loop instead of two.
        coords = sampling.depth_fps_coords(
            jnp.concatenate([depth, depth_pos]),
            feature_hw=grid_hw,
            num_side=num_side,
            mode=config.objective,
            fov=cl.fov,
            far=cl.far,
        )
        coords1, coords2 = coords[:n], coords[n:]
    else:
        coords1 = sampling.random_coords(keys[4], n, num_side)
        coords2 = sampling.random_coords(keys[5], n, num_side)
    perms = sampling.negative_permutations(keys[6], cl.neg_samples, n)

    depth_weight, depth_shift = schedules.depth_schedule(
        step,
        cl.depth_weight,
        cl.depth_shift,
        cl.depth_decay_every,
        cl.depth_decay_rate,
        mode=config.objective,
    )
    terms = losses.loss_terms(
        feats_d,
        feats_pos_d,
        code,
        code_pos,
        depth,
        depth_pos,
        coords1,
        coords2,
        perms,
        loss_params(config, depth_shift),
    )

    detached = jax.lax.stop_gradient(code)
    inner = models.cluster_probe.apply({"params": params["cluster_probe"]}, detached)
    logits = models.linear_probe.apply({"params": params["linear_probe"]}, detached)
    cluster_loss = losses.cluster_probe_loss(inner)
    linear_loss = losses.linear_probe_loss(logits, batch["label"])

    total = (
        cl.pos_intra_weight * terms["intra"]
        + cl.pos_inter_weight * terms["inter"]
        + cl.neg_inter_weight * terms["neg"]
        + depth_weight * terms["depth"]
        + linear_loss
        + cluster_loss
    )
    metrics = {
        "loss": total,
        "loss_intra": terms["intra"],
        "loss_inter": terms["inter"],
        "loss_neg": terms["neg"],
        "loss_depth": terms["depth"],
        "loss_cluster": cluster_loss,
        "loss_linear": linear_loss,
        "depth_weight": depth_weight,
        "depth_shift": depth_shift,
    }
    return total, metrics


def train_step(
    state: TrainState,
    backbone_params: dict,
    batch: dict,
    root_key: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    models: Models,
    num_side: int,
) -> tuple[TrainState, dict]:
    """One optimiser update on one global batch. RNG is fold_in(root_key, step): resumable."""
    key = jax.random.fold_in(root_key, state.step)
    grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
    (_, metrics), grads = grad_fn(
        state.params,
        backbone_params,
        batch,
        key,
        state.step,
        config=config,
        models=models,
        num_side=num_side,
    )
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["num_samples"] = jnp.asarray(num_side, jnp.int32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(config: ml_collections.ConfigDict, models: Models, mesh):
    """The jitted step: state donated, outputs replicated; one compile per distinct S."""
    replicated = sharding.replicated(mesh)

    @xla.jit(static_argnames=("num_side",), donate_argnums=(0,))
    def step_fn(state, backbone_params, batch, root_key, num_side):
        new_state, metrics = train_step(
            state,
            backbone_params,
            batch,
            root_key,
            config=config,
            models=models,
            num_side=num_side,
        )
        new_state = jax.lax.with_sharding_constraint(new_state, replicated)
        metrics = jax.lax.with_sharding_constraint(metrics, replicated)
        return new_state, metrics

    return step_fn


def samples_at(config: ml_collections.ConfigDict, step: int) -> int:
    """S for the batch at `step` (host side; the step is recompiled once per distinct S)."""
    return schedules.num_samples_at(
        step,
        config.loss.feature_samples,
        config.loss.samples_decay_every,
        config.loss.samples_decay_rate,
        mode=config.objective,
    )


# --------------------------------------------------------------------------------------
# Input: prefetch onto the mesh, remembering the iterator state after each batch
# --------------------------------------------------------------------------------------


class Prefetcher:
    """Moves host batches onto the mesh in a background thread, `size` batches ahead.

    Each item carries the loader's state *after* that batch, so a checkpoint taken after
    consuming it resumes with exactly the next batch, however far the thread has read ahead.
    """

    def __init__(self, loader: Any, mesh, size: int = 2):
        self._loader = loader
        self._mesh = mesh
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._loader)
                state = self._loader.get_state()
                item = (sharding.host_to_global(batch, self._mesh), state)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer, never swallowed
            self._queue.put(e)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[dict, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Resolves data defaults; makes the generated demo data and its KNN table on first use.

    Real datasets must already exist with their KNN table (the loader's error names the
    command that makes it); only the synthetic set is generated here.
    """
    from depthg_jax.data import knn, synthetic

    if not config.data.knn_variant:
        config.data.knn_variant = config.model.variant
    if config.data.name != "synthetic":
        return
    if not config.data.root:
        config.data.root = os.path.join(workdir, "synthetic_data")
    if jax.process_index() == 0:
        synthetic.generate_dataset(
            config.data.root,
            num_train=config.data.synthetic_train,
            num_val=config.data.synthetic_val,
            size=config.data.synthetic_size,
            seed=config.data.synthetic_seed,
        )
    _sync("synthetic-data")
    path = config.data.knn_path or knn.knn_table_path(
        config.data.root, config.data.train_split, config.data.knn_variant, config.data.train_res
    )
    if not os.path.exists(path):
        print(f"Building the KNN table {path} with the configured backbone", flush=True)
        knn.make_knn_table(config)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class MetricLogger:
    """JSON lines + TensorBoard on process 0."""

    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self._active:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self._active:
            return
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _check_finite(step: int, metrics: dict) -> None:
    bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(v))}
    if bad:
        raise FloatingPointError(
            f"non-finite metrics at step {step}: {bad}; stopping (lower the lr or check the data)"
        )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains DepthG as configured, evaluates, exports; resumes from `workdir` if it has a run."""
    from depthg_jax import baselines, evaluate, summaries
    from depthg_jax.data import pipeline

    validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")

    models = build_models(config)
    k_backbone, k_state, k_step = run_keys(config)
    backbone_params = init_backbone(config, models, k_backbone)
    prepare_data(config, workdir)
    write_config(config, workdir)
    backbone_params = sharding.replicate(backbone_params, mesh)

    state = sharding.replicate(create_train_state(config, models, k_state), mesh)
    initial_params = jax.device_get(state.params)  # host copy: the step donates `state`
    manager = checkpoint.make_manager(
        os.path.join(workdir, "checkpoints"),
        keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every,
    )
    loader = pipeline.make_train_loader(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpoint.restore_train_state(manager, abstract_state)
    if restored is not None:
        state, data_state, start = restored
        loader.set_state(data_state)
        print(f"Resumed from {workdir}/checkpoints at step {start}", flush=True)

    eval_data = pipeline.eval_data_config(config.data)

    def eval_loader(max_batches: int):
        return pipeline.make_eval_loader(
            eval_data,
            global_batch_size=config.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_batches=max_batches,
        )

    def validate(params_now: dict) -> dict:
        all_params = {"backbone": backbone_params, **params_now}
        return evaluate.evaluate_loader(
            all_params,
            config.model,
            config.data.n_classes,
            eval_loader(config.train.eval_batches),
            flip=False,
            crf=False,
            mesh=mesh,
            progress=False,
        )

    step_fn = make_train_step(config, models, mesh)
    logger = MetricLogger(workdir)
    prefetch = Prefetcher(loader, mesh, size=config.data.prefetch)
    start = int(jax.device_get(state.step))
    num_steps = config.train.num_steps
    data_state = loader.get_state()
    last_val: dict | None = None
    last_val_step = -1
    progress = _progress(start, num_steps)
    t_last, steps_since = time.perf_counter(), 0
    try:
        with _Preemption() as preemption:
            for step in range(start, num_steps):
                batch, data_state = next(prefetch)
                state, metrics = step_fn(
                    state, backbone_params, batch, k_step, num_side=samples_at(config, step)
                )
                steps_since += 1
                done = step + 1
                progress.update(1)
                if done % config.train.log_every == 0 or done == num_steps:
                    metrics = jax.device_get(metrics)
                    _check_finite(done, metrics)
                    dt = time.perf_counter() - t_last
                    rate = steps_since / dt
                    metrics["steps_per_s"] = rate
                    metrics["images_per_s"] = rate * config.train.batch_size
                    t_last, steps_since = time.perf_counter(), 0
                    logger.write(done, metrics)
                    progress.set_postfix(
                        loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}"
                    )
                val_metrics = None
                if config.train.eval_every and done % config.train.eval_every == 0:
                    last_val, last_val_step = validate(state.params), done
                    val_metrics = _val_summary(last_val)
                    logger.write(done, val_metrics)
                    progress.write(_format_val(done, last_val))
                if config.train.image_every and done % config.train.image_every == 0:
                    summaries.write_image_summary(
                        workdir,
                        done,
                        {"backbone": backbone_params, **state.params},
                        config,
                        eval_loader(1),
                        last_val,
                    )
                checkpoint.save_train_state(manager, done, state, data_state, metrics=val_metrics)
                check_now = jax.process_count() == 1 or done % config.train.log_every == 0
                if check_now and _any_process(preemption.requested):
                    manager.wait_until_finished()
                    if done not in manager.all_steps():
                        checkpoint.save_train_state(manager, done, state, data_state, force=True)
                        manager.wait_until_finished()
                    progress.write(f"SIGTERM: saved a checkpoint at step {done}; exiting")
                    return {"preempted_at": done}
    finally:
        prefetch.close()
        progress.close()

    final_step = int(jax.device_get(state.step))
    manager.wait_until_finished()
    if final_step not in manager.all_steps():
        checkpoint.save_train_state(manager, final_step, state, data_state, force=True)
    manager.wait_until_finished()

    if last_val_step == final_step:
        final = last_val
    else:
        final = validate(state.params)
        print(_format_val(final_step, final), flush=True)
    results = {"step": final_step, "trained": _val_summary(final)}
    if config.train.report_baselines:
        initial_params = sharding.replicate(initial_params, mesh)
        results["untrained_head"] = _val_summary(validate(initial_params))
        initial = {"backbone": backbone_params, **initial_params}
        for name, embed, params in (
            ("kmeans_untrained_head", baselines.code_embedding(config.model), initial),
            ("kmeans_backbone", baselines.backbone_embedding(config.model), backbone_params),
        ):
            result = baselines.evaluate_kmeans(
                embed, params, config.data.n_classes, eval_loader(0), seed=config.seed, mesh=mesh
            )
            results[name] = _val_summary(result)
        print(_format_baselines(results), flush=True)
    summaries.write_image_summary(
        workdir,
        final_step,
        {"backbone": backbone_params, **state.params},
        config,
        eval_loader(1),
        final,
    )
    logger.write(final_step, results["trained"])
    logger.close()
    export_dir = os.path.join(workdir, "export")
    if jax.process_index() == 0:
        if os.path.exists(export_dir):
            import shutil

            shutil.rmtree(export_dir)
        checkpoint.save_export(
            export_dir, config, {"backbone": backbone_params, **jax.device_get(state.params)}
        )
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    _sync("export")
    return results


def _val_summary(result: dict) -> dict:
    """Flat "val/<probe>_<metric>" scalars of an evaluation result (probes it has)."""
    return {
        f"val/{probe}_{metric}": float(result[probe][metric])
        for probe in ("cluster", "linear")
        if probe in result
        for metric in ("accuracy", "miou")
    }


def _format_val(step: int, result: dict) -> str:
    c, lin = result["cluster"], result["linear"]
    return (
        f"[step {step}] val cluster acc {100 * c['accuracy']:.1f} mIoU {100 * c['miou']:.1f} | "
        f"linear acc {100 * lin['accuracy']:.1f} mIoU {100 * lin['miou']:.1f}"
    )


def _format_baselines(results: dict) -> str:
    rows = [
        ("trained head, cluster probe", results["trained"]),
        ("untrained head, cluster probe", results["untrained_head"]),
        ("untrained head, k-means", results["kmeans_untrained_head"]),
        ("backbone features, k-means", results["kmeans_backbone"]),
    ]
    lines = ["Unsupervised segmentation of the validation split (accuracy / mIoU, %):"]
    for name, r in rows:
        lines.append(
            f"  {name:<31s} {100 * r['val/cluster_accuracy']:5.1f} / "
            f"{100 * r['val/cluster_miou']:5.1f}"
        )
    return "\n".join(lines)


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
