"""Exports of a training run: the one path for the end of training, sweeps and
`python -m depthg_jax.export`.

A run's own files say how to read it: `config.json` (the resolved config), the checkpoint
layout (a single head, or a population when `sweep_members.json` is present: params with a
leading member axis) and its validation metrics. `export_run` restores any intact
checkpoint (the latest, a step, or the best validated one) of either layout and writes one
head (for a sweep: the best member by default, any member by name or index) as a
self-contained inference export (backbone + head + probes + config, runtime/checkpoint.py),
or with format="portable" as a portable inference artifact (runtime/portable.py: the
inference function serialised with jax.export for cpu, cuda and tpu); `portable_from_export`
writes that artifact from an existing export. The trainers write their exports at the end of
training with the same functions (`write_export`, `restore_trainable`, `member_export`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from depthg_jax.data import palette
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.models import partitioning
from depthg_jax.runtime import checkpoint, files, integrity, portable, seeds, sharding
from depthg_jax.training import step as step_lib
from depthg_jax.training import sweep

SWEEP_SUMMARY = "sweep.json"
FORMATS = ("checkpoint", "portable")


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """What a workdir holds: its resolved config and, for a sweep, its member table."""

    workdir: str
    config: ml_collections.ConfigDict
    members: list[dict] | None  # sweep_members.json, or None for a single head

    @property
    def is_sweep(self) -> bool:
        return self.members is not None

    def manager(self):
        c = self.config.train
        return checkpoint.make_manager(
            os.path.join(self.workdir, "checkpoints"),
            keep=c.keep_checkpoints,
            save_every=1,
            best_metric=c.best_metric,
        )

    def abstract_state(self) -> step_lib.TrainState:
        """The shapes a checkpoint of this run holds (nothing allocated), placed on one local
        device: a run saved on any number of devices restores here (an export reads it on
        one host, whatever the training topology was)."""
        spec = model_lib.ModelSpec.from_config(self.config)
        hp = objective_lib.hparams(self.config)
        key = seeds.run_keys(self.config.seed)[1]
        if self.is_sweep:
            make = lambda: step_lib.create_population_state(  # noqa: E731
                spec, hp, key, len(self.members)
            )
        else:
            make = lambda: step_lib.create_train_state(spec, hp, key)  # noqa: E731
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            jax.eval_shape(make),
        )


def read_layout(workdir: str) -> RunLayout:
    """The run in `workdir`, from its own config.json (and sweep_members.json)."""
    workdir = os.path.abspath(workdir)
    config_file = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: is {workdir} a training workdir?")
    with open(config_file) as f:
        config = ml_collections.ConfigDict(json.load(f))
    members = None
    if sweep.is_sweep(config):
        members = sweep.read_table(workdir)
    return RunLayout(workdir=workdir, config=config, members=members)


def pick_member(layout: RunLayout, member: str | None) -> int:
    """The index of a sweep member named by name or index; by default the best one of the
    finished sweep (sweep.json)."""
    names = [m["name"] for m in layout.members]
    if member is None:
        summary = os.path.join(layout.workdir, SWEEP_SUMMARY)
        if not os.path.isfile(summary):
            raise ValueError(
                f"{layout.workdir} is a sweep that has not finished (no {SWEEP_SUMMARY} names its "
                f"best member): pick one with --member=NAME or index, one of {names}"
            )
        with open(summary) as f:
            member = json.load(f)["best"]["member"]
    if member in names:
        return names.index(member)
    if str(member).isdigit() and int(member) < len(names):
        return int(member)
    raise ValueError(
        f"--member={member!r} is not a member of this sweep: one of {names} or an index "
        f"0..{len(names) - 1}"
    )


def restore_trainable(
    layout: RunLayout, *, step: int | None = None, best: bool = False, manager=None
) -> tuple[dict, int, dict]:
    """(trainable params on the host, step, selection) of the latest, given or best validated
    checkpoint; a sweep's params keep their member axis. `manager`: the run's own, when it is
    still open (the end of training)."""
    manager = manager or layout.manager()
    metric = layout.config.train.best_metric
    selection = None
    if best:
        selection = checkpoint.best_selection(manager, metric)
        if selection is None:
            raise FileNotFoundError(
                f"{layout.workdir}/checkpoints has no validated checkpoint to pick the best from "
                f"(none carries {metric}; train.eval_every was 0 or no validation ran yet): "
                "export the latest with --step or without --best"
            )
        step = selection["step"]
    restored = checkpoint.restore_train_state(manager, layout.abstract_state(), step)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {layout.workdir}/checkpoints")
    state, _, step = restored
    if selection is None:
        selection = {"checkpoint": "step", "step": int(step)}
    return jax.device_get(state.params), int(step), selection


def write_export(
    out: str,
    config: ml_collections.ConfigDict,
    backbone: dict,
    trainable: dict,
    selection: dict,
    *,
    replace: bool = False,
) -> None:
    """One head's export at `out` (replace: swap it in beside an existing one, as training
    does on a rerun; else `out` must not exist). The backbone is written in
    config.model.backbone_param_dtype, as training holds it."""
    dtype = partitioning.param_dtype(str(config.model.get("backbone_param_dtype", "float32")))
    backbone = jax.tree.map(lambda x: x.astype(dtype, copy=False), sharding.host_copy(backbone))
    params = model_lib.full_params(backbone, sharding.host_copy(trainable))
    if replace:
        checkpoint.replace_export(out, config, params, selection=selection)
    else:
        checkpoint.save_export(out, config, params, selection=selection)


def member_export(layout: RunLayout, trainable: dict, index: int, selection: dict):
    """(config, trainable, selection) of one member of a sweep: its own single-run config."""
    member = layout.members[index]
    selection = {**selection, "member": member["name"], "settings": member["settings"]}
    params = step_lib.member_params(trainable, index)
    return sweep.member_config(layout.config, member), params, selection


def export_run(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    best: bool = False,
    member: str | None = None,
    format: str = "checkpoint",
    res: int | None = None,
    flip: bool = True,
) -> dict:
    """Exports a run to `out` (must not exist); returns the selection record written.

    step/best pick the checkpoint (default: the latest intact one); member picks a sweep's
    member (default: the finished sweep's best). format "portable" writes the portable
    artifact instead of an export (`write_portable`: res, flip).
    """
    if format not in FORMATS:
        raise ValueError(f"--format={format!r}; expected one of {FORMATS}")
    check_out(out)
    layout = read_layout(workdir)
    if member is not None and not layout.is_sweep:
        raise ValueError(f"--member={member!r}: {layout.workdir} is a single run, not a sweep")
    manager = layout.manager()
    trainable, step, selection = restore_trainable(layout, step=step, best=best, manager=manager)
    config = layout.config
    if layout.is_sweep:
        index = pick_member(layout, member)
        config, trainable, selection = member_export(layout, trainable, index, selection)
    backbone = model_lib.init_backbone(config.model, seeds.run_keys(config.seed)[0])
    if format == "checkpoint":
        write_export(out, config, backbone, trainable, selection)
        return selection
    source = {
        "kind": "checkpoint",
        "path": checkpoint.step_directory(manager, step),
        "manifest_sha256": _manifest_digest(checkpoint.step_directory(manager, step)),
        "backbone": config.model.weights or f"random, seed {config.seed}",
        "selection": selection,
    }
    params = model_lib.full_params(jax.device_get(backbone), trainable)
    write_portable(out, config, params, res=res, flip=flip, source=source)
    return selection


def check_out(out: str) -> None:
    """Before any long work: `out` must not exist and its parent must be writable."""
    if os.path.exists(out):
        raise FileExistsError(f"--out={out} exists; choose a new folder (exports never overwrite)")
    files.check_writable(os.path.dirname(os.path.abspath(out)), "the parent of --out")


def portable_from_export(export: str, out: str, *, res: int | None = None, flip: bool = True):
    """The portable artifact of an existing export (verified first); returns its sidecar."""
    check_out(out)
    config, params = checkpoint.load_export(export)
    export = os.path.abspath(export)
    source = {
        "kind": "export",
        "path": export,
        "manifest_sha256": _manifest_digest(export),
        "selection": checkpoint.load_selection(export),
    }
    return write_portable(out, config, params, res=res, flip=flip, source=source)


def write_portable(
    out: str,
    config: ml_collections.ConfigDict,
    params: dict,
    *,
    res: int | None,
    flip: bool,
    source: dict,
) -> dict:
    """runtime.portable.write_portable with the config's model, classes and palette; res
    defaults to the evaluation resolution (data.eval_res)."""
    spec = model_lib.ModelSpec.from_config(config)
    n, dataset = spec.n_classes, str(config.data.name)
    return portable.write_portable(
        out,
        spec,
        params,
        res=int(res or config.data.eval_res),
        flip=flip,
        classes=palette.class_names(dataset, n),
        palette=palette.palette_for(dataset, n),
        source={"dataset": dataset, **source},
    )


def _manifest_digest(directory: str) -> str | None:
    """SHA-256 of a directory's MANIFEST.json (which pins every file in it), or None."""
    if not integrity.has_manifest(directory):
        return None
    return integrity.file_digest(os.path.join(directory, integrity.MANIFEST))
