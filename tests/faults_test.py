"""Fault injection: each probe of issue 13 replayed, ending in a fallback or a clear error.

One tiny demo run is trained once (module fixture); each test copies its workdir and breaks
something: flipped bytes, truncated and deleted files, changed configs, a second trainer,
NaN depth, weights and steps, signals at start, a full disk (injected ENOSPC), colliding
outputs. Subprocesses only where signals or a second process are the point.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from support import tiny_config

from depthg_jax import config as config_lib
from depthg_jax import evaluate, export, segment
from depthg_jax.data import datasets, five_crop, images, knn
from depthg_jax.evaluation import reports
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import convert
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, files, integrity
from depthg_jax.runtime.preemption import Preemption
from depthg_jax.training import loop, trainer, workdir
from depthg_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run: checkpoints 2, 3, 4 (sealed), export/, results.json, its data."""
    wd = tmp_path_factory.mktemp("run") / "w"
    config = tiny_config(**{"train.checkpoint_every": 1, "train.log_every": 1})
    trainer.train_and_evaluate(config, str(wd))
    return wd


@pytest.fixture
def copy(run_dir, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(run_dir, dst)
    return dst


def saved_config(wd) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))


def manager_and_abstract(wd):
    config = saved_config(wd)
    spec = model_lib.ModelSpec.from_config(config)
    state = step_lib.create_train_state(spec, objective_lib.hparams(config), jax.random.key(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    manager = checkpoint.make_manager(str(wd / "checkpoints"), keep=3, save_every=1)
    return manager, abstract


def largest_file(directory) -> pathlib.Path:
    return max((p for p in pathlib.Path(directory).rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip


def flip_bytes(path, n=64, seed=0):
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(data), size=min(n, len(data)), replace=False):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------
# 1. Integrity of checkpoints and exports
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", ["flip_state", "truncate_state", "delete_metadata", "delete_data_metadata"]
)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(copy, damage):
    step4 = copy / "checkpoints" / "4"
    assert integrity.has_manifest(step4)  # sealed when the run finished
    if damage == "flip_state":
        flip_bytes(largest_file(step4 / "state"))
    elif damage == "truncate_state":
        f = largest_file(step4 / "state")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete_metadata":
        (step4 / "state" / "_METADATA").unlink()
    else:
        (step4 / "data" / "metadata").unlink()
    with pytest.raises(integrity.IntegrityError, match=str(step4)):
        integrity.verify_manifest(str(step4))
    manager, abstract = manager_and_abstract(copy)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {step4}"):
        state, data_state, step = checkpoint.restore_train_state(manager, abstract, set_aside=True)
    assert step == 3 and int(state.step) == 3 and data_state
    # Moved aside (nothing deleted) so step 4 can be saved again on resume.
    assert not step4.exists() and (copy / "checkpoints_damaged" / "4").is_dir()
    assert 4 not in manager.all_steps()
    # A step asked for by number that fails is an error naming the file.
    manager3, _ = manager_and_abstract(copy)
    flip_bytes(largest_file(copy / "checkpoints" / "3" / "state"), seed=1)
    with pytest.raises(integrity.IntegrityError, match="checkpoints/3/state"):
        checkpoint.restore_train_state(manager3, abstract, 3)


@pytest.mark.slow
def test_every_checkpoint_damaged_is_an_error_not_a_silent_restart(copy):
    for step in (2, 3, 4):
        (copy / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    manager, abstract = manager_and_abstract(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(checkpoint.CheckpointUnusable, match="no intact checkpoint"):
            checkpoint.restore_train_state(manager, abstract)


@pytest.mark.slow
def test_a_bit_flipped_export_is_refused_naming_the_file(copy, capsys):
    exp = copy / "export"
    assert "export intact" in export.verify(str(exp))
    target = largest_file(exp / "params")
    flip_bytes(target)
    with pytest.raises(integrity.IntegrityError, match=str(target)):
        checkpoint.load_export(str(exp))
    # The CLI's --verify names it too, with exit status 1.
    out = subprocess.run(
        [sys.executable, "-m", "depthg_jax.export", f"--verify={exp}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 1 and target.name in out.stderr
    # segment never writes labels from it.
    photos = copy / "photos"
    photos.mkdir()
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(photos / "a.png")
    with pytest.raises(segment.SegmentError, match=f"{target.name} fails its SHA-256"):
        segment.segment_folder(str(exp), str(photos), str(copy / "seg"), res=64, progress=False)
    assert not (copy / "seg").exists()


@pytest.mark.slow
def test_checkpoint_step_directory_verifies_by_hand(copy):
    step = copy / "checkpoints" / "3"
    assert "intact" in export.verify(str(step))
    (step / "metrics" / "metrics").write_text('{"val/cluster_miou": 0.99}')
    with pytest.raises(integrity.IntegrityError, match="metrics/metrics"):
        export.verify(str(step))


# --------------------------------------------------------------------------------------
# 2. Guarded resume
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "field, value",
    [
        ("train.batch_size", 16),
        ("seed", 7),
        ("objective", "reference"),
        ("model.dim", 16),
        ("data.synthetic_size", 96),
        ("optim.lr", 1e-3),
        ("loss.neg_samples", 3),
    ],
)
def test_resume_with_a_run_changing_field_is_refused_before_anything_is_written(copy, field, value):
    before = {p: p.read_bytes() for p in copy.glob("*.json*")}
    config = tiny_config(**{"train.checkpoint_every": 1, "train.log_every": 1, field: value})
    old = saved_config(copy)
    for part in field.split("."):
        old = old[part]
    with pytest.raises(workdir.WorkdirError, match=rf"{field}: run {old!r}, now {value!r}"):
        trainer.train_and_evaluate(config, str(copy))
    assert {p: p.read_bytes() for p in copy.glob("*.json*")} == before  # config.json kept
    assert not (copy / workdir.LOCK_FILE).exists()  # the lock is released on errors


@pytest.mark.slow
def test_allowed_changes_resume_and_are_recorded(copy):
    config = tiny_config(**{"train.checkpoint_every": 1, "train.log_every": 2,
                            "train.num_steps": 6, "eval.crf": True})  # fmt: skip
    resolved = config_lib.resolve(config, str(copy))
    assert workdir.guard_resume(resolved, str(copy)) == "resume"
    record = json.loads((copy / workdir.RESUMES_FILE).read_text().splitlines()[-1])
    assert record["changes"]["train.num_steps"] == [4, 6]
    assert record["changes"]["train.log_every"] == [1, 2]
    assert set(record["changes"]) == {"train.num_steps", "train.log_every", "eval.crf"}


@pytest.mark.slow
def test_logs_without_checkpoints_refuse_unless_restart_then_nothing_is_deleted(copy):
    shutil.rmtree(copy / "checkpoints")
    config = config_lib.resolve(tiny_config(), str(copy))
    with pytest.raises(workdir.WorkdirError, match="no checkpoint to resume from.*restart"):
        workdir.guard_resume(config, str(copy))
    metrics_before = (copy / "metrics.jsonl").read_text()
    restart = tiny_config(**{"train.restart": True})
    assert workdir.guard_resume(config_lib.resolve(restart, str(copy)), str(copy)) == ("restart")
    (previous,) = copy.glob("previous-*")
    assert (previous / "metrics.jsonl").read_text() == metrics_before
    assert (previous / "export" / "MANIFEST.json").is_file()
    assert not (copy / "metrics.jsonl").exists() and (copy / "synthetic_data").is_dir()


@pytest.mark.slow
def test_resume_after_damage_extends_the_run_without_duplicate_rows_and_keeps_the_old_export(
    copy,
):
    # A report evaluate wrote into the export; the newest checkpoint then gets damaged.
    (copy / "export" / "eval").mkdir()
    (copy / "export" / "eval" / "results.json").write_text('{"mine": 1}')
    flip_bytes(largest_file(copy / "checkpoints" / "4" / "state"))
    config = tiny_config(**{"train.checkpoint_every": 1, "train.log_every": 1,
                            "train.num_steps": 6})  # fmt: skip
    results = trainer.train_and_evaluate(config, str(copy))
    assert results["step"] == 6
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r["step"] for r in rows if "loss" in r]
    assert train_rows == [1, 2, 3, 4, 5, 6]  # the step-4 row of the first run was dropped
    assert (copy / "checkpoints_damaged" / "4").is_dir()
    # The new export is in place, the old one kept whole with the report written into it.
    assert checkpoint.load_selection(str(copy / "export"))["step"] == 6
    checkpoint.verify_export(str(copy / "export"))
    kept = copy / "export.step4"
    assert checkpoint.load_selection(str(kept))["step"] == 4
    assert json.loads((kept / "eval" / "results.json").read_text()) == {"mine": 1}
    assert not list(copy.glob(".export*")) and not list(copy.glob(".*.new-*"))


@pytest.mark.slow
def test_rerunning_a_finished_run_rewrites_nothing(copy):
    (copy / "export" / "eval").mkdir()
    (copy / "export" / "eval" / "report.md").write_text("kept")
    stamp = (copy / "export" / "MANIFEST.json").stat().st_mtime_ns
    results = trainer.train_and_evaluate(tiny_config(), str(copy))
    assert results["step"] == 4
    assert (copy / "export" / "MANIFEST.json").stat().st_mtime_ns == stamp
    assert (copy / "export" / "eval" / "report.md").read_text() == "kept"


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    rows = [{"step": s, "loss": s} for s in (1, 2, 3, 4, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo'  # torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    assert workdir.truncate_metrics(str(tmp_path), 3) == 3
    kept = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3]


# --------------------------------------------------------------------------------------
# 3. The workdir lock
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_holder(copy):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from depthg_jax.training import workdir; "
         f"workdir.WorkdirLock({str(copy)!r}).acquire(); print('held', flush=True); "
         "time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir.WorkdirError, match=f"pid {holder.pid} on host"):
            trainer.train_and_evaluate(tiny_config(), str(copy))
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale (pid gone) and is taken over.
    lock = workdir.WorkdirLock(str(copy)).acquire()
    assert workdir.read_lock(lock.path)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(lock.path)


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / workdir.LOCK_FILE).write_text(
        json.dumps({"pid": 1, "host": "elsewhere", "started": time.time()})
    )
    with pytest.raises(workdir.WorkdirError, match="pid 1 on host elsewhere"):
        workdir.WorkdirLock(str(tmp_path)).acquire()


# --------------------------------------------------------------------------------------
# 4. Finite or nothing
# --------------------------------------------------------------------------------------


def infinite_learning_rate(monkeypatch):
    """Steps that go non-finite: an infinite learning rate injected past the config's
    validation (which refuses optim.lr=inf by name) into the hyperparameters the step gets."""
    resolve = objective_lib.hparams

    def hparams(config):
        return {**resolve(config), "lr": np.float32(np.inf)}

    monkeypatch.setattr(objective_lib, "hparams", hparams)


@pytest.mark.slow
def test_a_non_finite_step_stops_before_it_is_checkpointed_naming_step_and_examples(
    run_dir, tmp_path, monkeypatch
):
    infinite_learning_rate(monkeypatch)
    data = run_dir / "synthetic_data"
    config = tiny_config(**{"data.root": str(data), "train.checkpoint_every": 1})
    wd = tmp_path / "nan"
    ids = r"examples \(anchor/positive\): \['\d+/\d+'"
    with pytest.raises(FloatingPointError, match=r"step 1 in .*" + ids):
        trainer.train_and_evaluate(config, str(wd))
    ckpts = wd / "checkpoints"
    assert not ckpts.exists() or not [p for p in os.listdir(ckpts)]  # nothing saved, no tmp


@pytest.mark.slow
def test_the_first_non_finite_step_is_named_when_flags_are_checked_in_a_batch(
    run_dir, tmp_path, monkeypatch
):
    # Flags are fetched before saves and logs only: step 1 goes bad, the check at step 4 (the
    # first save and log) still names step 1, and nothing is saved.
    infinite_learning_rate(monkeypatch)
    data = run_dir / "synthetic_data"
    config = tiny_config(**{"data.root": str(data), "train.checkpoint_every": 4,
                            "train.log_every": 4})  # fmt: skip
    wd = tmp_path / "nan4"
    with pytest.raises(FloatingPointError, match=r"non-finite values at step 1 "):
        trainer.train_and_evaluate(config, str(wd))
    ckpts = wd / "checkpoints"
    assert not ckpts.exists() or not os.listdir(ckpts)


def test_nan_depth_files_are_rejected_by_name(tmp_path):
    depth = np.ones((4, 4), np.float32)
    depth[1, 2] = np.nan
    stem = tmp_path / "x"
    np.save(str(stem) + "_depth.npy", depth)
    with pytest.raises(ValueError, match=r"x_depth.npy holds 1 NaN/inf"):
        datasets.read_depth(str(stem), "x")
    np.save(str(stem) + "_depth.npy", np.full((4, 4), np.inf, np.float32))
    with pytest.raises(ValueError, match="NaN/inf"):
        datasets.read_depth(str(stem), "x")


def test_nan_weights_are_rejected_by_name_at_conversion_and_load(tmp_path):
    params = model_lib.init_backbone(tiny_config().model, jax.random.key(0))
    params = jax.tree.map(np.array, jax.device_get(params))
    leaf_path, leaf = jax.tree_util.tree_flatten_with_path(params)[0][0]
    leaf.reshape(-1)[0] = np.nan
    out = tmp_path / "backbone"
    convert.save_backbone(params, "mu/8", out, source="test")
    name = ".".join(k.key for k in leaf_path)
    with pytest.raises(ValueError, match=rf"{out}.*NaN/inf.*{name}"):
        convert.load_backbone(out, "mu/8")
    with pytest.raises(ValueError, match=r"NaN/inf values: cls_token \(1 of"):
        convert.convert_state_dict({"cls_token": np.array([[[np.nan, 0.0]]])}, "mu/8")


# --------------------------------------------------------------------------------------
# 5. Clean stops
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_start_exits_zero_with_a_message(run_dir, tmp_path, sig):
    wd = tmp_path / "w"
    args = [sys.executable, "-m", "depthg_jax.main", "--config=configs/demo.py",
            f"--workdir={wd}"]  # fmt: skip
    overrides = {"data.root": run_dir / "synthetic_data", "data.synthetic_train": 16,
                 "data.synthetic_val": 8, "data.synthetic_size": 64, "data.train_res": 64,
                 "data.eval_res": 64, "loss.feature_samples": 3, "train.batch_size": 8,
                 "eval.batch_size": 8, "train.num_steps": 3}  # fmt: skip
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (wd / workdir.LOCK_FILE).exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the handlers are installed right after the lock is taken
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert f"{signal.Signals(sig).name} before step 1: nothing new to save" in out
    assert not (wd / workdir.LOCK_FILE).exists()


@pytest.mark.slow
def test_ctrl_c_mid_run_saves_a_sealed_checkpoint_and_returns(run_dir, tmp_path, monkeypatch):
    make = step_lib.make_train_step

    def interrupting(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def step(state, *a, **k):
            if int(state.step) == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the second step
            return step_fn(state, *a, **k)

        return step

    monkeypatch.setattr(step_lib, "make_train_step", interrupting)
    config = tiny_config(**{"data.root": str(run_dir / "synthetic_data"),
                            "train.checkpoint_every": 10})  # fmt: skip
    wd = tmp_path / "w"
    assert trainer.train_and_evaluate(config, str(wd)) == {"preempted_at": 2}
    names = os.listdir(wd / "checkpoints")
    assert "2" in names and all(n.isdigit() for n in names), names  # no temporary folder
    for name in names:
        assert integrity.verify_manifest(str(wd / "checkpoints" / name)) > 0  # sealed
    assert not (wd / workdir.LOCK_FILE).exists()


def test_second_ctrl_c_exits_at_once():
    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGINT)
        assert p.requested and p.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_an_exception_during_an_async_save_leaves_no_temporary_checkpoint(copy):
    manager, abstract = manager_and_abstract(copy)
    state, data_state, _ = checkpoint.restore_train_state(manager, abstract)
    checkpoint.save_train_state(manager, 5, state, data_state, force=True)  # async, in flight
    try:
        raise RuntimeError("injected")
    except RuntimeError:
        checkpoint.abandon_in_flight(manager)
    names = os.listdir(copy / "checkpoints")
    assert not [n for n in names if "tmp" in n], names
    assert integrity.verify_manifest(str(copy / "checkpoints" / "5")) > 0  # finished, sealed


# --------------------------------------------------------------------------------------
# 6. No silent loss; a full disk
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_checks_out_first_and_prints_scores_when_the_disk_is_full(
    copy, monkeypatch, capsys
):
    blocker = copy / "a_file"
    blocker.write_text("x")
    called = []
    monkeypatch.setattr(evaluate, "evaluate_loader", lambda *a, **k: called.append(1))
    with pytest.raises(OSError, match="is not writable"):
        evaluate.run(str(copy / "export"), None, str(blocker / "eval"), max_batches=1)
    assert not called  # refused before computing anything
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reports, "write_report", full)
    with pytest.raises(OSError, match="could not write the report"):
        evaluate.run(str(copy / "export"), None, str(copy / "out"), max_batches=1)
    printed = capsys.readouterr().out
    assert "cluster" in printed.lower() and "%" in printed or "miou" in printed.lower()


@pytest.mark.slow
def test_a_full_disk_never_leaves_partial_files_or_loses_the_old_export(copy, monkeypatch):
    target = copy / "note.txt"
    target.write_text("old")

    def full(f):
        f.write(b"new and partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.write_atomic(target, full)
    assert target.read_text() == "old" and not list(copy.glob(".note.txt.*"))
    config, params = checkpoint.load_export(str(copy / "export"))
    before = checkpoint.load_selection(str(copy / "export"))

    def no_space(path, *a, **k):
        os.makedirs(path)
        (pathlib.Path(path) / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_export", no_space)
    with pytest.raises(OSError):
        checkpoint.replace_export(str(copy / "export"), config, params,
                                  selection={"checkpoint": "final", "step": 9})  # fmt: skip
    assert checkpoint.load_selection(str(copy / "export")) == before
    checkpoint.verify_export(str(copy / "export"))


@pytest.mark.slow
def test_segment_keeps_same_stem_outputs_apart_and_refuses_out_inside_images(run_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(photos / "a.png")
    Image.fromarray(np.full((30, 16, 3), 20, np.uint8)).save(photos / "a.jpg")
    Image.fromarray(np.full((12, 12, 3), 90, np.uint8)).save(photos / "b.png")
    with pytest.raises(segment.SegmentError, match="inside --images"):
        segment.segment_folder(str(run_dir / "export"), str(photos), str(photos / "out"))
    out = tmp_path / "seg"
    written, errors = segment.segment_folder(
        str(run_dir / "export"), str(photos), str(out), res=64, progress=False
    )
    assert written == 3 and not errors
    labels = sorted(p.name for p in (out / "labels").iterdir())
    assert labels == ["a.jpg.png", "a.png.png", "b.png"]
    assert Image.open(out / "labels" / "a.jpg.png").size == (16, 30)
    assert Image.open(out / "labels" / "a.png.png").size == (24, 20)


def test_five_crop_refuses_an_output_inside_its_source(tmp_path):
    with pytest.raises(ValueError, match="inside the source"):
        five_crop.check_out_dir(str(tmp_path), str(tmp_path))
    with pytest.raises(ValueError, match="inside the source"):
        five_crop.check_out_dir(str(tmp_path), str(tmp_path / "crops"))
    five_crop.check_out_dir(str(tmp_path / "a"), str(tmp_path / "b"))


@pytest.mark.slow
def test_a_killed_exports_empty_folder_is_removed_by_the_next_export(run_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".export-{dead.pid}-abc").mkdir()  # what a SIGKILLed export leaves
    (tmp_path / f".export.new-{dead.pid}").mkdir()  # a SIGKILLed replace_export
    live = tmp_path / f".export-{os.getppid()}-xyz"
    live.mkdir()  # another writer still running: left alone
    config, params = checkpoint.load_export(str(run_dir / "export"))
    checkpoint.save_export(str(tmp_path / "e"), config, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "e"]


@pytest.mark.slow
def test_written_files_and_exports_follow_the_umask(run_dir, tmp_path):
    old = os.umask(0o022)
    try:
        files.write_text_atomic(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        config, params = checkpoint.load_export(str(run_dir / "export"))
        checkpoint.save_export(str(tmp_path / "e"), config, params)
        assert (tmp_path / "e").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "e" / "MANIFEST.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        files.write_text_atomic(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


# --------------------------------------------------------------------------------------
# 7. Inputs: validation up front, images, KNN tables
# --------------------------------------------------------------------------------------


def _directory_dataset(root, split, n, labels):
    for sub in ("images", "depth") + (("labels",) if labels else ()):
        (root / sub / split).mkdir(parents=True)
    for i in range(n):
        image = np.full((16, 16, 3), i, np.uint8)
        Image.fromarray(image).save(root / "images" / split / f"{i}.png")
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(
            root / "depth" / split / f"{i}_zoedepth.png"
        )
        if labels:
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "labels" / split / f"{i}.png")


def test_an_unlabelled_or_missing_eval_split_is_refused_at_start(tmp_path):
    # Refused when labels are asked for (train.validate="labels"); "auto" monitors label-free
    # (tests/own_images_test.py).
    root = tmp_path / "ds"
    _directory_dataset(root, "train", 2, labels=True)
    _directory_dataset(root, "val", 2, labels=False)
    config = tiny_config(
        **{"data.name": "directory", "data.root": str(root), "train.validate": "labels"}
    )
    resolved = config_lib.resolve(config, str(tmp_path / "w"))
    with pytest.raises(ValueError, match="'val' of directory .* has no labels"):
        loop.plan_validation(resolved)
    shutil.rmtree(root / "images" / "val")
    with pytest.raises(ValueError, match="'val' of directory .* cannot be read: No image folder"):
        loop.plan_validation(resolved)


def test_sixteen_bit_grayscale_images_are_scaled_not_white(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = images.read_image(path)
    expected = np.round(ramp.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))
    assert rgb.min() == 0 and rgb.max() == 255


@pytest.mark.slow
def test_a_knn_table_for_the_same_ids_but_other_images_is_refused(copy):
    root = copy / "synthetic_data"
    source = datasets.make_source("synthetic", str(root), "train", 6)
    path = knn.knn_table_path(str(root), "train", "mu/8", 64)
    fp = knn.source_fingerprint(source)
    table = knn.load_knn_table(path, source.ids, fingerprint=fp)  # made with the run: matches
    assert table.shape[0] == len(source)
    first = pathlib.Path(source.records[0].image)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(first)  # another image, same id
    changed = knn.source_fingerprint(datasets.make_source("synthetic", str(root), "train", 6))
    with pytest.raises(ValueError, match="same 16 ids but other image files"):
        knn.load_knn_table(path, source.ids, fingerprint=changed)


@pytest.mark.slow
def test_a_truncated_knn_table_is_a_clear_error(copy):
    path = pathlib.Path(knn.knn_table_path(str(copy / "synthetic_data"), "train", "mu/8", 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"KNN table {path} is unreadable.*make it again"):
        knn.load_knn_table(str(path))
