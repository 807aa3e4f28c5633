"""Orbax checkpoints: the training manager (resume, keep-latest + keep-best) and inference exports.

Training checkpoints hold only what training changes (step, head and probe params, optimiser
state) plus the input iterator's state; the frozen backbone is never written there.
An export is self-contained: backbone + head + probes + the resolved config, so evaluation and
segmentation need nothing but the export directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from depthg_jax.models.model import PARAM_KEYS as EXPORT_PARAMS
from depthg_jax.models.model import check_params

_CONFIG_FILE = "config.json"
_PARAMS_DIR = "params"
SELECTION_FILE = "selection.json"
BEST_SELECTED_ON = "the evaluation split's labels (as the release selects its checkpoint)"


def make_manager(
    directory: str, *, keep: int, save_every: int, best_metric: str = "val/cluster_miou"
) -> ocp.CheckpointManager:
    """A manager that keeps the latest `keep` checkpoints and the best one by `best_metric`."""
    preservation = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics.get(best_metric, -math.inf),
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1),
        preservation_policy=preservation,
        # Orbax writes a step's metrics only when best_fn is set; the policy above decides.
        best_fn=lambda metrics: metrics.get(best_metric, -math.inf),
        best_mode="max",
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_names=("state", "data")
    )


def save_train_state(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_state: dict,
    *,
    metrics: dict | None = None,
    force: bool = False,
) -> bool:
    """Saves the train state and the input iterator's state (as JSON) at `step`."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    # {} rather than None: Orbax warns on every save without metrics once best_fn is set.
    return manager.save(step, args=args, metrics=metrics or {}, force=force)


def restore_train_state(
    manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict, int] | None:
    """Restores (state, data_state, step) from the latest (or given) step; None if none saved."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["data"], step


def best_selection(manager: ocp.CheckpointManager, metric: str) -> dict | None:
    """{"checkpoint": "best", step, metric, score, selected_on} of the best validated
    checkpoint, or None when no checkpoint carries validation metrics."""
    scored = []
    for step in manager.all_steps():
        metrics = manager.metrics(step)
        if metrics and metric in metrics:
            scored.append((float(metrics[metric]), -step, step))
    if not scored:
        return None
    score, _, step = max(scored)  # ties: the earlier step, as a first-seen best
    return {
        "checkpoint": "best",
        "step": int(step),
        "metric": metric,
        "score": score,
        "selected_on": BEST_SELECTED_ON,
    }


def _single_process_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer that involves only this process (exports are written by one host).

    The default one synchronises with every process of a multi-host run, which would wait
    forever for hosts that do not write the export.
    """
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save_export(
    path: str,
    config: ml_collections.ConfigDict,
    params: dict,
    *,
    selection: dict | None = None,
    extra_files: dict[str, dict] | None = None,
) -> None:
    """Writes a self-contained inference checkpoint, atomically (temp dir, then rename).

    selection: which training checkpoint this is ({"checkpoint": "final"|"best", "step", ...}),
    written as selection.json; extra_files: more JSON files by name (e.g. an import's source).
    """
    missing = [k for k in EXPORT_PARAMS if k not in params]
    if missing:
        raise ValueError(f"export params miss {missing}; expected keys {list(EXPORT_PARAMS)}")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        reserved = (".", "..", _CONFIG_FILE, _PARAMS_DIR)
        if not name or name in reserved or os.path.basename(name) != name:
            raise ValueError(
                f"extra export file {name!r} must be a plain file name other than "
                f"{_CONFIG_FILE} and {_PARAMS_DIR}"
            )
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"export target {path} exists; choose a new --out or remove it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        params = jax.device_get({k: params[k] for k in EXPORT_PARAMS})
        with _single_process_checkpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, _PARAMS_DIR), params)
            checkpointer.wait_until_finished()
        with open(os.path.join(tmp, _CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=2))
        extra = dict(extra_files or {})
        if selection is not None:
            extra[SELECTION_FILE] = selection
        for name, content in extra.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_export(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """Loads (config, params) written by `save_export`, checked to fit the config's model."""
    path = os.path.abspath(path)
    config_file = os.path.join(path, _CONFIG_FILE)
    params_dir = os.path.join(path, _PARAMS_DIR)
    if not os.path.isfile(config_file) or not os.path.isdir(params_dir):
        raise FileNotFoundError(
            f"{path} is not a depthg-jax export (needs {_CONFIG_FILE} and {_PARAMS_DIR}/); "
            "make one with `python -m depthg_jax.export --workdir=W --out=DIR`"
        )
    with open(config_file) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with _single_process_checkpointer() as checkpointer:
        params = checkpointer.restore(params_dir)
    _check_export_params(path, config, params)
    return config, params


def load_selection(path: str) -> dict | None:
    """An export's selection.json (which checkpoint it holds), or None if it has none."""
    file = os.path.join(path, SELECTION_FILE)
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def _check_export_params(path: str, config: ml_collections.ConfigDict, params: dict) -> None:
    """An export whose params do not fit its own config is refused, naming both sides."""
    try:
        check_params(
            params,
            variant=config.model.variant,
            dim=config.model.dim,
            n_classes=config.data.n_classes,
            where=path,
        )
    except KeyError as e:
        raise ValueError(f"export {path} lacks parameter {e} of its model") from e
