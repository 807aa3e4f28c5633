"""The KNN command as a two-process jax.distributed job (gloo on CPU) equals one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from depthg_jax.data import knn

pytestmark = pytest.mark.slow  # trains, or runs several processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
from depthg_jax import config as base


def get_config():
    config = base.get_config()
    config.model.variant = "mu/8"
    config.model.weights = {weights!r}
    config.data.name = "directory"
    config.data.root = {root!r}
    config.data.n_classes = 3
    config.data.train_res = 16
    config.data.knn_path = {root!r} + "/knn/" + {name!r}
    return config
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_inputs(tmp_path):
    from safetensors.numpy import save_file

    from depthg_jax.models.convert import expected_shapes

    root = str(tmp_path / "ds")
    rng = np.random.default_rng(0)
    for i in range(13):  # Not a multiple of the global batch: the last one is padded.
        img = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        for sub, arr, ext in [("images", img, ".png"), ("depth", img[..., 0], "_zoedepth.png")]:
            os.makedirs(f"{root}/{sub}/train", exist_ok=True)
            Image.fromarray(arr).save(f"{root}/{sub}/train/{i:02d}{ext}")
    weights = str(tmp_path / "mu8.safetensors")
    shapes = expected_shapes("mu/8", 28 * 28)
    save_file({k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in shapes.items()}, weights)
    configs = {}
    for name in ("one.npz", "two.npz"):
        path = tmp_path / f"config_{name[:3]}.py"
        path.write_text(CONFIG.format(weights=weights, root=root, name=name))
        configs[name] = str(path)
    return root, configs


def run_knn(config, devices, extra=(), process_id=None):
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
    )
    cmd = [
        sys.executable,
        "-m",
        "depthg_jax.data.knn",
        f"--config={config}",
        "--per_device_batch=1",
        "--k=5",
        "--config.data.num_neighbors=4",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_processes_write_the_same_table_as_one(tmp_path):
    root, configs = write_inputs(tmp_path)
    port = free_port()
    dist = ["--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [run_knn(configs["two.npz"], 4, [*dist, f"--process_id={i}"]) for i in range(2)]
    procs.append(run_knn(configs["one.npz"], 8))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
    one = knn.load_knn_table(f"{root}/knn/one.npz")
    two = knn.load_knn_table(f"{root}/knn/two.npz")
    assert one.shape == (13, 5) and (one[:, 0] == np.arange(13)).all()
    np.testing.assert_array_equal(one, two)
