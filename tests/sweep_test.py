"""Sweep mode end to end: the trainer's outputs, resume after SIGKILL, and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from support import tiny_config

from depthg_jax import config as config_lib
from depthg_jax.evaluation import evaluator, reports
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, sharding
from depthg_jax.training import exports, loop, population, sweep, trainer
from depthg_jax.training import step as step_lib

GRID = "loss.depth_weight=0,0.3;loss.sampling=fps,random"


def sweep_config(**overrides):
    config = tiny_config(
        **{"train.num_steps": 6, "train.checkpoint_every": 2, "train.eval_every": 3, **overrides}
    )
    config.sweep.grid = GRID
    return config


# The child trains the population and SIGKILLs itself right after step 5 (checkpoint of step
# 4 on disk, step 5 done but unsaved): no handler, no flush, as an OOM kill or a lost host.
CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
from depthg_jax.runtime import checkpoint
from depthg_jax.training import population
from sweep_test import sweep_config
save = checkpoint.save_train_state
def killing_save(manager, step, *args, **kwargs):
    if step == 5:
        manager.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(manager, step, *args, **kwargs)
checkpoint.save_train_state = killing_save
population.train_and_evaluate(sweep_config(), {workdir!r})
"""


def restore_population(workdir, config, step=None):
    config = config_lib.resolve(config, workdir)
    spec = model_lib.ModelSpec.from_config(config)
    state = step_lib.create_population_state(
        spec, objective_lib.hparams(config), jax.random.key(0), 4
    )
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"), keep=3, save_every=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _, at = checkpoint.restore_train_state(manager, abstract, step)
    return jax.device_get(restored), at


@pytest.mark.slow
def test_sweep_trains_reports_exports_and_resumes_after_sigkill(tmp_path):
    full = str(tmp_path / "full")
    results = population.train_and_evaluate(sweep_config(), full)
    names = [m["member"] for m in results["members"]]
    assert names == ["m0", "m1", "m2", "m3"] and results["step"] == 6
    assert results["swept_fields"] == ["loss.depth_weight", "loss.sampling"]
    table = json.load(open(os.path.join(full, "sweep_members.json")))
    assert [m["settings"]["loss.sampling"] for m in table] == ["fps", "random"] * 2
    assert [m["settings"]["loss.depth_weight"] for m in table] == [0.0, 0.0, 0.3, 0.3]
    saved = json.load(open(os.path.join(full, "sweep.json")))
    assert saved["best"]["member"] in names
    assert "evaluation split" in saved["best"]["selected_on"]
    best_i = names.index(saved["best"]["member"])
    scores = [row["val/cluster_miou"] for row in saved["members"]]
    assert scores[best_i] == max(scores)
    # The export is the best member's head, with its settings and selection record.
    cfg, params = checkpoint.load_export(os.path.join(full, "export"))
    assert cfg.loss.sampling == table[best_i]["settings"]["loss.sampling"]
    assert not sweep.is_sweep(cfg)
    final, _ = restore_population(full, sweep_config())
    exported = {k: params[k] for k in final.params}
    best_params = step_lib.member_params(final.params, best_i)
    for a, b in zip(jax.tree.leaves(best_params), jax.tree.leaves(exported), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.load_selection(os.path.join(full, "export"))["member"] == names[best_i]
    # The population's validation of a member equals evaluate_loader on that member alone.
    resolved = config_lib.resolve(sweep_config(), full)
    spec = model_lib.ModelSpec.from_config(cfg)
    validator = loop.Validator(
        resolved,
        params["backbone"],
        sharding.make_mesh(),
        evaluator.head_predictor(spec, flip=False),
    )
    alone = evaluator.evaluate_loader(
        params, spec, validator.loader(0), flip=False, crf=False, progress=False
    )
    expected = {k: v for k, v in saved["members"][best_i].items() if k != "member"}
    assert reports.val_summary(alone) == pytest.approx(expected, abs=1e-12)
    check_member_exports(tmp_path, full, saved, table)
    picture = Image.open(os.path.join(full, "sweep.png"))
    assert picture.size[0] == 2 * 300 and picture.mode == "RGB"
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert any("m3/loss" in r and "m0/loss_depth" in r for r in rows)
    assert any("m2/val/cluster_miou" in r for r in rows)
    assert os.listdir(os.path.join(full, "tensorboard"))

    # SIGKILL after step 5, then resume: the same population as the uninterrupted run.
    killed = str(tmp_path / "killed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=root, workdir=killed)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]
    _, at = restore_population(killed, sweep_config())
    assert at == 4
    resumed = population.train_and_evaluate(sweep_config(), killed)
    assert resumed["step"] == 6
    after, _ = restore_population(killed, sweep_config(), 6)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert resumed["members"] == results["members"]


def check_member_exports(tmp_path, workdir, saved, table):
    """`export` on a finished sweep writes the best member by default and any member by name
    or index; each loads in evaluate and segment and scores the member's validation."""
    from depthg_jax import evaluate, segment

    names = [m["name"] for m in table]
    best = exports.export_run(workdir, str(tmp_path / "x_best"))
    assert best["member"] == saved["best"]["member"] and best["step"] == 6
    _, default_params = checkpoint.load_export(str(tmp_path / "x_best"))
    _, trained_params = checkpoint.load_export(os.path.join(workdir, "export"))
    for a, b in zip(jax.tree.leaves(default_params), jax.tree.leaves(trained_params), strict=True):
        np.testing.assert_array_equal(a, b)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(photos / "a.png")
    for member, out in (("m1", "x_m1"), ("2", "x_m2")):
        selection = exports.export_run(workdir, str(tmp_path / out), member=member)
        index = names.index(member) if member in names else int(member)
        assert selection["member"] == names[index]
        assert selection["settings"] == table[index]["settings"]
        cfg, _ = checkpoint.load_export(str(tmp_path / out))
        assert cfg.loss.depth_weight == table[index]["settings"]["loss.depth_weight"]
        cfg.eval.flip, cfg.eval.crf = False, False  # the in-training validation's protocol
        results, _, _, _ = evaluate.run(str(tmp_path / out), cfg, str(tmp_path / f"{out}_eval"))
        expected = {k: v for k, v in saved["members"][index].items() if k != "member"}
        assert reports.val_summary(results) == pytest.approx(expected, abs=1e-12)
        written, errors = segment.segment_folder(
            str(tmp_path / out), str(photos), str(tmp_path / f"{out}_seg"), res=64,
            progress=False,
        )  # fmt: skip
        assert written == 1 and not errors
    with pytest.raises(ValueError, match="not a member of this sweep"):
        exports.export_run(workdir, str(tmp_path / "x_bad"), member="nobody")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("grid", "model.dim=32,64", "'model.dim' cannot differ between members"),
        ("grid", "loss.feature_samples=3,4", "cannot differ between members"),
        ("grid", "loss.depth_weight=0.1,,0.2", "has an empty value"),
        ("grid", "loss.depth_weight:0.1,0.2", "is not 'field=values'"),
        ("grid", "loss.depth_weight=0.1;", "an empty entry"),
        ("grid", "loss.depth_weight=a,b", "is not a number"),
        ("grid", "loss.sampling=fps,grid", r"expected one of \('fps', 'random'\)"),
        ("grid", "optim.lr=1e-3;optim.lr=1e-4", "listed twice"),
        ("members", "name=x|name=x", "member names repeat"),
        ("members", "optim.lr=1e-3||optim.lr=1e-4", "an empty member"),
        ("ranges", "optim.lr=1e-3", "is not 'lo:hi' or 'lo:hi:log'"),
        ("ranges", "optim.lr=0:1e-3:log", "lo > 0 with :log"),
    ],
)
def test_bad_sweeps_are_refused_with_the_field_named(field, value, message):
    config = tiny_config()
    config.sweep[field] = value
    if field == "ranges":
        config.sweep.random = 3
    with pytest.raises(ValueError, match=message):
        sweep.member_table(config)


def test_two_ways_of_naming_members_are_refused():
    config = tiny_config()
    config.sweep.grid = "optim.lr=1e-3,1e-4"
    config.sweep.members = "optim.lr=1e-3"
    with pytest.raises(ValueError, match="one way only"):
        sweep.member_table(config)


def test_grid_random_and_members_resolve_to_tables():
    config = tiny_config()
    config.sweep.grid = "loss.pos_intra_weight=0.5,0.58;loss.neg_inter_shift=0.7,0.76"
    table = sweep.member_table(config)
    got = [(m["settings"]["loss.pos_intra_weight"], m["settings"]["loss.neg_inter_shift"])
           for m in table]  # fmt: skip
    assert got == [(0.5, 0.7), (0.5, 0.76), (0.58, 0.7), (0.58, 0.76)]
    assert all(m["settings"]["optim.lr"] == config.optim.lr for m in table)
    config.sweep.grid = ""
    config.sweep.random = 16
    config.sweep.ranges = "loss.depth_weight=0.05:0.3;optim.lr=1e-4:1e-3:log"
    drawn = sweep.member_table(config)
    again = sweep.member_table(config)
    assert drawn == again and len(drawn) == 16
    weights = [m["settings"]["loss.depth_weight"] for m in drawn]
    lrs = np.log10([m["settings"]["optim.lr"] for m in drawn])
    assert min(weights) >= 0.05 and max(weights) <= 0.3 and len(set(weights)) == 16
    assert lrs.min() >= -4 and lrs.max() <= -3
    config.sweep.seed = 1
    assert sweep.member_table(config) != drawn


def test_a_population_too_large_for_memory_is_refused_before_compiling(tmp_path):
    config = tiny_config()
    config.sweep.grid = "optim.lr=" + ",".join(str(1e-4 * (i + 1)) for i in range(64))
    config.sweep.memory_gb = 0.01
    member = sweep.estimate_member_bytes(config_lib.resolve(config, str(tmp_path)))
    with pytest.raises(MemoryError, match=r"population of 64 members needs about .* GiB"):
        population.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing was built or compiled
    # The estimate grows by one member's bytes per member and counts the batch.
    config.sweep.memory_gb = 100.0
    resolved = config_lib.resolve(config, str(tmp_path))
    resolved_big = config_lib.resolve(tiny_config(**{"train.batch_size": 16}), str(tmp_path))
    assert sweep.estimate_member_bytes(resolved_big) > member
    shared = sweep.estimate_shared_bytes(resolved)
    assert sweep.check_memory(resolved, 1)["estimate_bytes"] == shared + member
    assert sweep.check_memory(resolved, 64)["estimate_bytes"] == shared + 64 * member


def test_single_trainer_refuses_a_sweep_config(tmp_path):

    config = tiny_config()
    config.sweep.grid = "optim.lr=1e-3,1e-4"
    with pytest.raises(ValueError, match="config.sweep names a population"):
        trainer.train_and_evaluate(config, str(tmp_path))
