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
import warnings
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from depthg_jax.models.model import PARAM_KEYS as EXPORT_PARAMS
from depthg_jax.models.model import ModelSpec, check_params
from depthg_jax.runtime import files, integrity

_CONFIG_FILE = "config.json"
_PARAMS_DIR = "params"
SELECTION_FILE = "selection.json"
# The files save_export writes (what an export's manifest covers at the top level).
EXPORT_FILES = (_CONFIG_FILE, _PARAMS_DIR, SELECTION_FILE, "MANIFEST.json")
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
    """Saves the train state and the input iterator's state (as JSON) at `step`.

    Before a save starts, the previous one is finished and sealed (`seal_checkpoints`).
    """
    if not (force or manager.should_save(step)):
        return False
    finish(manager)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    # {} rather than None: Orbax warns on every save without metrics once best_fn is set.
    return manager.save(step, args=args, metrics=metrics or {}, force=force)


def step_directory(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(int(step)))


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the in-flight save, then seals every finished step (writes its manifest)."""
    manager.wait_until_finished()
    seal_checkpoints(manager)


def seal_checkpoints(manager: ocp.CheckpointManager) -> list[int]:
    """Writes MANIFEST.json into each finished step directory lacking one; returns the steps.

    Call only with no save in flight (`finish`). Process 0 writes (the directory is shared).
    """
    if jax.process_index() != 0:
        return []
    sealed = []
    for step in manager.all_steps():
        directory = step_directory(manager, step)
        if os.path.isdir(directory) and not integrity.has_manifest(directory):
            integrity.write_manifest(directory)
            sealed.append(int(step))
    return sealed


def abandon_in_flight(manager: ocp.CheckpointManager) -> None:
    """After an error: finish the in-flight save if it can, else remove its temporary folder."""
    try:
        finish(manager)
    except Exception as e:  # noqa: BLE001 - the save itself failed: leave nothing half-written
        warnings.warn(f"the checkpoint save in flight failed ({e}); removing its temporary files",
                      stacklevel=2)  # fmt: skip
    root = str(manager.directory)
    if jax.process_index() == 0 and os.path.isdir(root):
        for name in os.listdir(root):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class CheckpointUnusable(RuntimeError):
    """Every saved checkpoint failed verification or could not be read."""


def restore_train_state(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    step: int | None = None,
    *,
    set_aside: bool = False,
) -> tuple[Any, dict, int] | None:
    """Restores (state, data_state, step) from the latest (or given) step; None if none saved.

    Each candidate is verified against its manifest first. With no step given, a checkpoint
    that fails (or cannot be read) is reported by path and skipped for the newest intact one;
    with set_aside it is also moved to <checkpoints>_damaged/ so training can save that step
    again. A given step that fails raises, naming the file.
    """
    if step is not None:
        return _restore_verified(manager, abstract_state, int(step))
    failures = []
    for candidate in sorted(manager.all_steps(), reverse=True):
        try:
            return _restore_verified(manager, abstract_state, int(candidate))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            path = step_directory(manager, candidate)
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            failures.append(f"{path}: {reason}")
            warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
            print(f"warning: checkpoint {path} is unusable ({reason}); trying an older one",
                  flush=True)  # fmt: skip
            if set_aside:
                _set_aside(manager, int(candidate))
    if failures:
        raise CheckpointUnusable(
            "no intact checkpoint could be restored: " + "; ".join(failures) + ". Check each with "
            "`python -m depthg_jax.export --verify=<checkpoint step dir>`: where it says intact, "
            "the files are sound and what reads them differs (another config or version), so "
            "keep them; where not, --config.train.restart=True starts over and moves the old "
            "run aside (nothing is deleted)"
        )
    return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> None:
    if jax.process_index() == 0:
        damaged = str(manager.directory).rstrip("/") + "_damaged"
        os.makedirs(damaged, exist_ok=True)
        target = os.path.join(damaged, str(step))
        n = 1
        while os.path.exists(target):
            target, n = os.path.join(damaged, f"{step}.{n}"), n + 1
        os.replace(step_directory(manager, step), target)
        print(f"moved the damaged checkpoint to {target}", flush=True)
    manager.reload()


def _restore_verified(manager, abstract_state, step: int):
    directory = step_directory(manager, step)
    if integrity.has_manifest(directory):
        integrity.verify_manifest(directory)
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
    _remove_abandoned_exports(parent)
    with files.atomic_directory(path, prefix=f".export-{os.getpid()}-") as tmp:
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
        integrity.write_manifest(tmp)  # last: an export with a manifest is complete


def replace_export(
    path: str, config: ml_collections.ConfigDict, params: dict, *, selection: dict
) -> str | None:
    """Writes an export beside `path`, then swaps it in; returns where the old one went.

    Nothing is lost: an old export of another step is kept whole as `<path>.step<N>`; one of
    the same step (a rerun of an interrupted export) gives its added files (eval/ ...) to the
    new one and is removed.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    new = os.path.join(parent, f".{name}.new-{os.getpid()}")
    if os.path.exists(new):
        shutil.rmtree(new)
    save_export(new, config, params, selection=selection)
    if not os.path.exists(path):
        os.replace(new, path)
        return None
    old = load_selection(path) or {}
    if old.get("step") == selection.get("step") and old.get("checkpoint") == selection.get(
        "checkpoint"
    ):
        own = set(EXPORT_FILES)
        for entry in os.listdir(path):
            if entry not in own and not os.path.exists(os.path.join(new, entry)):
                os.replace(os.path.join(path, entry), os.path.join(new, entry))
        aside = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.replace(path, aside)
        os.replace(new, path)
        shutil.rmtree(aside)
        return None
    kept, n = f"{path}.step{old.get('step', 'unknown')}", 1
    while os.path.exists(kept):
        kept, n = f"{path}.step{old.get('step', 'unknown')}.{n}", n + 1
    os.replace(path, kept)
    os.replace(new, path)
    print(f"kept the previous {name}/ (step {old.get('step')}) as {kept}", flush=True)
    return kept


def _remove_abandoned_exports(parent: str) -> None:
    """Removes the temporary folders of killed export writers beside a new export:
    `.export-<pid>-*` (save_export) and `.<name>.new-<pid>` (replace_export)."""
    for name in os.listdir(parent):
        if name.startswith(".export-"):
            pid = name.split("-")[1]
        elif name.startswith(".") and ".new-" in name:
            pid = name.rsplit(".new-", 1)[1]
        else:
            continue
        if pid.isdigit() and not files.pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def verify_export(path: str) -> int:
    """Checks an export against its manifest (eval/ and other added files aside)."""
    return integrity.verify_manifest(os.path.abspath(path), allow_extra=_ADDED_TO_EXPORTS)


# What evaluate and users add to an export after it was written (not in its manifest).
_ADDED_TO_EXPORTS = ("eval",)


def load_export(path: str, *, unverified: bool = False) -> tuple[ml_collections.ConfigDict, dict]:
    """Loads (config, params) written by `save_export`, checked to fit the config's model.

    The files are verified against the export's manifest first, as `export --verify` does
    (IntegrityError naming the file); an export without its manifest is refused the same
    way, unless `unverified` (an explicit choice: loaded with a warning)."""
    path = os.path.abspath(path)
    config_file = os.path.join(path, _CONFIG_FILE)
    params_dir = os.path.join(path, _PARAMS_DIR)
    if not os.path.isfile(config_file) or not os.path.isdir(params_dir):
        raise FileNotFoundError(
            f"{path} is not a depthg-jax export (needs {_CONFIG_FILE} and {_PARAMS_DIR}/); "
            "make one with `python -m depthg_jax.export --workdir=W --out=DIR`"
        )
    if unverified and not integrity.has_manifest(path):
        warnings.warn(
            f"export {path} has no {integrity.MANIFEST}: loading it unverified, as asked",
            stacklevel=2,
        )
    else:
        try:
            verify_export(path)
        except integrity.IntegrityError as e:
            if integrity.has_manifest(path):
                raise
            raise integrity.IntegrityError(
                f"{e}; its files cannot be checked. Re-export it, or load it anyway with "
                "--unverified (unverified=True)"
            ) from None
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
        check_params(params, ModelSpec.from_config(config), where=path)
    except KeyError as e:
        raise ValueError(f"export {path} lacks parameter {e} of its model") from e
