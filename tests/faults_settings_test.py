"""Trust under faults, round 3 (the settings, exports and leftovers half): bad settings fail
before any work with the field named; an export without its manifest is refused unless the
user says --unverified; a killed writer's temporary files are removed by the next run."""

import os
import subprocess
import sys

import pytest
import support
from support import tiny_config

from depthg_jax import config as config_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, files, integrity


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optim.lr", -0.05, r"config.optim.lr=-0.05; expected a value in \(0, 1\]"),
        ("optim.lr", float("nan"), "config.optim.lr=nan; expected a finite number"),
        ("optim.probe_lr", 0.0, "config.optim.probe_lr=0.0"),
        ("loss.fov", 0.0, r"config.loss.fov=0.0; expected a value in \(0, 180\)"),
        ("loss.far", 0.0, "config.loss.far=0.0"),
        ("seed", -1, r"config.seed=-1; expected a value in \[0, inf\)"),
        ("data.train_res", 40000, r"config.data.train_res=40000; expected a value in \[1, 4096\]"),
        ("model.dim", 100_000_000, "config.model.dim=100000000"),
        ("loss.depth_weight", -0.1, "config.loss.depth_weight=-0.1"),
        ("loss.depth_decay_rate", 0.0, "config.loss.depth_decay_rate=0.0"),
        ("loss.pos_intra_shift", float("inf"), "config.loss.pos_intra_shift=inf"),
        ("data.num_neighbors", 30, "config.data.num_neighbors=30"),
        ("data.n_classes", 300, "config.data.n_classes=300"),
        ("train.batch_size", 2.5, "config.train.batch_size=2.5; expected an integer"),
        ("eval.flip", 1, "config.eval.flip=1; expected True or False"),
        ("model.dtype", "float8", "config.model.dtype='float8'; expected one of"),
    ],
)
def test_bad_settings_fail_before_any_work_naming_the_field(tmp_path, field, value, message):
    config = tiny_config()
    section, leaf = field.rsplit(".", 1) if "." in field else ("", field)
    target = config[section] if section else config
    with target.ignore_type():
        target[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.resolve(config, str(tmp_path))
    assert not os.listdir(tmp_path)  # nothing generated, nothing written


def test_every_field_of_the_table_is_checked_by_validate():
    # A value of the wrong type for every field: each is refused by name.
    for name, field in config_lib.FIELDS.items():
        config = tiny_config()
        section, _, leaf = name.rpartition(".")
        target = config[section] if section else config
        wrong = "text" if field.kind is not str else 3
        with target.ignore_type():
            target[leaf] = wrong
        with pytest.raises(ValueError, match=f"config.{name}="):
            config_lib.validate_fields(config)


def make_export(path):
    config = tiny_config()
    spec = model_lib.ModelSpec.from_config(config)
    import jax

    checkpoint.save_export(str(path), config, model_lib.init_params(spec, jax.random.key(0)))
    return path


@pytest.mark.slow
def test_an_export_without_its_manifest_is_refused_unless_unverified(tmp_path):
    export = make_export(tmp_path / "exp")
    os.remove(export / integrity.MANIFEST)
    with pytest.raises(integrity.IntegrityError, match="never completed.*--unverified"):
        checkpoint.load_export(str(export))
    # `export --verify` says the same thing about the same folder.
    out = subprocess.run(
        [sys.executable, "-m", "depthg_jax.export", f"--verify={export}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and "never completed" in out.stderr
    with pytest.warns(UserWarning, match="loading it unverified, as asked"):
        config, params = checkpoint.load_export(str(export), unverified=True)
    assert set(params) == set(model_lib.PARAM_KEYS)


@pytest.mark.slow
def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.png.{dead.pid}-w-xyz.tmp"
    stale.write_bytes(b"half")
    alive = tmp_path / f".b.png.{os.getppid()}-w-xyz.tmp"  # a live writer's: kept
    alive.write_bytes(b"writing")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_bytes(b"mine")
    files.write_text_atomic(tmp_path / "c.txt", "done")
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert (tmp_path / "c.txt").read_text() == "done"


@pytest.mark.slow
def test_unwritable_outputs_fail_first_in_one_line(tmp_path):
    # A regular file where a folder should be: unwritable for root too (chmod is not).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    demo = support.REPO_CONFIGS / "demo.py"
    cases = [
        (["depthg_jax.main", f"--config={demo}", f"--workdir={blocker / 'w'}"], "--workdir="),
        (["depthg_jax.export", f"--workdir={tmp_path}", f"--out={blocker / 'x'}"], "--out"),
    ]
    for args, flag in cases:
        out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 1 and "is not writable" in last and flag in last, out.stderr
        assert "Traceback" not in out.stderr
