"""The main command as users run it: resume after SIGKILL, clean exit on SIGTERM, multi-host.

Each test starts `python -m depthg_jax.main` in subprocesses on the tiny demo settings.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains, or runs several processes

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = {
    "data.synthetic_train": 16,
    "data.synthetic_val": 8,
    "data.synthetic_size": 64,
    "data.train_res": 64,
    "data.eval_res": 64,
    "loss.feature_samples": 3,
    "loss.neg_samples": 2,
    "train.batch_size": 8,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.image_every": 0,
    "train.checkpoint_every": 1,
    "train.report_baselines": False,
    "eval.batch_size": 8,
}


def main_command(workdir, num_steps, extra=(), data_root=None):
    overrides = dict(TINY, **{"train.num_steps": num_steps})
    if data_root is not None:
        overrides["data.root"] = str(data_root)
    args = [sys.executable, "-m", "depthg_jax.main", "--config=configs/demo.py"]
    args += [f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    return args + list(extra)


def env(devices=8):
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(args, devices=8, timeout=300):
    out = subprocess.run(
        args, cwd=ROOT, env=env(devices), capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def exported_params(workdir):
    from depthg_jax.runtime import checkpoint

    _, params = checkpoint.load_export(str(pathlib.Path(workdir) / "export"))
    return params


def assert_trees_equal(a, b, atol=0.0):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def checkpoint_steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def wait_for_checkpoint(proc, workdir, step, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= step for s in checkpoint_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before checkpoint {step}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {step} within {timeout}s")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Where the module's runs share one generated data set (made by the first run)."""
    return tmp_path_factory.mktemp("data") / "synthetic"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
    """A 6-step run from scratch; it also generates the data and KNN table the others reuse."""
    work = tmp_path_factory.mktemp("full")
    run(main_command(work, 6, data_root=data_root))
    return work


def test_sigkill_then_restart_matches_an_uninterrupted_run(tmp_path, data_root, uninterrupted):
    kill_at = int(np.random.default_rng().integers(2, 5))
    proc = subprocess.Popen(
        main_command(tmp_path, 6, data_root=data_root),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_checkpoint(proc, tmp_path, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "export").exists()
    out = run(main_command(tmp_path, 6, data_root=data_root))
    assert "Resumed from" in out.stdout + out.stderr
    assert_trees_equal(exported_params(tmp_path), exported_params(uninterrupted))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_root, uninterrupted):
    del uninterrupted  # only for the data it generates
    proc = subprocess.Popen(
        main_command(tmp_path, 10_000, data_root=data_root),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_checkpoint(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in output
    saved = int(output.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
    assert saved in checkpoint_steps(tmp_path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, data_root, uninterrupted):
    port = free_port()
    procs = []
    for i in range(2):
        extra = [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(
                main_command(tmp_path, 6, extra, data_root=data_root),
                cwd=ROOT,
                env=env(devices=4),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o[-3000:]
    assert "process 1/2: 4 local of 8 devices" in outputs[1]
    assert_trees_equal(exported_params(tmp_path), exported_params(uninterrupted), atol=1e-5)
