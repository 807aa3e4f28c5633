"""The run planner: one memory estimate, refusals with the numbers and a mesh that fits, and
the compiled plan on simulated devices of the slice's shape."""

import subprocess
import sys

import pytest
from support import REPO_CONFIGS, tiny_config
from train_process_test import ROOT

from depthg_jax import plan
from depthg_jax.runtime import sharding
from depthg_jax.training import loop, planning

GIB = 2**30


def planner(*args, devices=None):
    """Runs `python -m depthg_jax.plan` (it sets its own simulated device count)."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, "-m", "depthg_jax.plan", *args],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def coco(variant):
    return f"--config={REPO_CONFIGS / 'coco.py'}:{variant}"


@pytest.mark.slow
def test_a_float32_7b_on_v5e_8_is_refused_with_the_numbers_and_a_mesh_that_fits():
    out = planner(coco("v3-7B/16"), "--chips=v5e-8")
    assert out.returncode == 1, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: v3-7B/16 with float32 backbone parameters (26.9 GB)"), error
    assert "does not fit v5e-8 on a (8, 1) mesh" in error
    assert "GiB available per device" in error
    assert "A mesh that fits: --config.mesh.model=" in error
    assert "per device, compiled" not in out.stdout  # refused before any compile
    model = int(error.split("--config.mesh.model=")[1].split()[0])
    assert model == 2  # 12.5 GiB of parameters per device, 13.4 usable

    accepted = planner(coco("v3-7B/16"), "--chips=v5e-8", f"--config.mesh.model={model}",
                       "--compile=false")  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
    assert f"mesh: data {8 // model} x model {model}" in accepted.stdout
    # bfloat16 parameters halve the backbone (13.4 GB): then it fits a 16 GB chip whole.
    half = planner(coco("v3-7B/16"), "--chips=v5e-8", "--auto_mesh", "--compile=false",
                   "--config.model.backbone_param_dtype=bfloat16")  # fmt: skip
    assert half.returncode == 0, half.stderr
    assert "mesh: data 8 x model 1" in half.stdout, half.stdout
    assert "(backbone 12.51 of 12.51," in half.stdout, half.stdout


@pytest.mark.slow
def test_the_compiled_plan_of_the_7b_structured_tiny_model():
    out = planner(coco("v3-mu7B/16"), "--chips=v5e-8", "--config.mesh.model=4",
                  "--config.train.batch_size=8", "--config.data.train_res=64",
                  "--config.loss.feature_samples=4")  # 64 px / 16 = a 4 x 4 grid  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "mesh: data 2 x model 4" in text
    assert "per device, compiled (XLA:CPU, 8 simulated devices)" in text
    assert "FLOPs per step per device:" in text and "predicted step" in text
    assert "input per host:" in text and "CPU cores" in text


def test_chip_names_and_counts():
    assert planning.parse_chips("v5e-64") == ("v5e", 64)
    assert planning.parse_chips("8xH100") == ("H100", 8)
    with pytest.raises(ValueError, match="expected NAME-COUNT"):
        planning.parse_chips("v7-8")
    assert planning.CHIPS["v5e"].chips_per_host(4) == 4
    assert planning.CHIPS["v5e"].chips_per_host(64) == 8
    assert planning.CHIPS["v4"].chips_per_host(32) == 4
    assert planning.CHIPS["H100"].chips_per_host(8) == 8


def test_the_estimate_splits_the_backbone_and_the_batch():
    config = tiny_config(**{"model.variant": "S/8", "train.batch_size": 32})
    one = planning.estimate(config, 8, 1)
    four = planning.estimate(config, 2, 4)
    assert one.backbone_total_bytes == four.backbone_total_bytes
    assert four.backbone_bytes == one.backbone_bytes // 4
    assert four.activation_bytes > one.activation_bytes  # 16 images a device, not 4
    config.model.backbone_param_dtype = "bfloat16"
    assert planning.estimate(config, 8, 1).backbone_bytes * 2 == one.backbone_bytes
    assert planning.mesh_problem(32, 8, 3, 8) == "mesh.model=3 does not divide 8 devices"
    assert "does not split over 64 data rows" in planning.mesh_problem(32, 256, 4, 4)


def test_plan_without_compile_and_its_refusals():
    config = tiny_config(**{"model.variant": "mu/8"})
    text = plan.format_plan(plan.make_plan(config, "v5e", 8, 0.4, auto_mesh=False,
                                           compile_=False))  # fmt: skip
    assert "mesh: data 8 x model 1" in text and "GiB usable (90% of HBM)" in text
    config.mesh.model = 3
    with pytest.raises(ValueError, match="v5e-8: mesh.model=3 does not divide 8 devices"):
        plan.make_plan(config, "v5e", 8, 0.4, auto_mesh=False, compile_=False)


def test_training_refuses_a_run_that_does_not_fit_before_any_device_work(tmp_path, monkeypatch):
    """start_run checks the same estimate against the devices' memory and names a mesh that
    fits (here a budget between the estimates of mesh.model=1 and 2)."""
    config = tiny_config(**{"mesh.model": 2})
    small = planning.estimate(config, 8, 1).total_bytes
    large = planning.estimate(config, 4, 2).total_bytes
    assert small < large
    monkeypatch.setattr(planning, "device_budget", lambda: ((small + large) // 2, "test budget"))
    touched = []
    monkeypatch.setattr(loop.partitioning, "load_backbone", lambda *a: touched.append(a))
    from depthg_jax.training import trainer

    with pytest.raises(MemoryError) as e:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(e.value)
    assert "does not fit 8 devices (test budget) on a (4, 2) mesh" in message
    assert "A mesh that fits: --config.mesh.model=1" in message
    assert not touched  # refused before the backbone was loaded
    assert sharding.model_axis(config) == 2
