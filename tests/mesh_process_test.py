"""The 2-D mesh across processes: 2 processes x 4 CPU devices (gloo) on a (2, 4) mesh.

- `python -m depthg_jax.main` with mesh.model=4 in two processes trains exactly as one
  process of 8 devices with mesh.model=1 (3 steps: the logged losses and the exported head).
- A converted backbone restored into sharded targets: each process reads each of its shards
  once (TensorStore's byte counter), and with the 'model' axis across the two processes
  each reads only its half.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from support import tiny_config
from train_process_test import ROOT, env, exported_params, free_port, main_command, run

pytestmark = pytest.mark.slow

STEPS = 3


def metrics_losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_on_a_2x4_mesh_train_as_one_process(tmp_path):
    data_root = tmp_path / "synthetic"
    one = tmp_path / "one"
    run(main_command(one, STEPS, data_root=data_root))  # 8 devices, mesh.model=1
    port = free_port()
    two = tmp_path / "two"
    procs = []
    for i in range(2):
        extra = [
            "--config.mesh.model=4",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        procs.append(
            subprocess.Popen(
                main_command(two, STEPS, extra, data_root=data_root),
                cwd=ROOT, env=env(devices=4), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )
        )  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o[-3000:]
    assert "process 1/2: 4 local of 8 devices" in outputs[1]
    config = json.loads((two / "config.json").read_text())
    assert config["mesh"]["model"] == 4
    ref, got = metrics_losses(one), metrics_losses(two)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
    a, b = exported_params(one), exported_params(two)
    for part in ("head", "cluster_probe", "linear_probe"):
        for x, y in zip(_leaves(a[part]), _leaves(b[part]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(_leaves(a["backbone"]), _leaves(b["backbone"]), strict=True):
        np.testing.assert_array_equal(x, y)  # gathered back from its shards unchanged


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


RESTORE = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]))
import numpy as np
import tensorstore as ts
from jax.sharding import Mesh
from depthg_jax.models import convert, partitioning
from depthg_jax.runtime import sharding

def read():
    m = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(int(v["value"]) for x in m for v in x["values"])

out = {}
shapes = None
for name, mesh in [
    ("2x4", sharding.make_mesh(model=4)),
    # The 'model' axis across both processes: each holds half of every parameter.
    ("1x8", Mesh(np.asarray(jax.devices()).reshape(1, 8), sharding.AXES)),
]:
    before = read()
    params = convert.load_backbone(
        sys.argv[3], "S/16", target=lambda s: partitioning.abstract_backbone(s, mesh))
    out[name] = read() - before
    out[name + "_device_bytes"] = partitioning.per_device_bytes(params)
    # The restored values, gathered: what the process holds equals the converted weights.
    host = sharding.host_copy(params)
    out[name + "_sum"] = float(sum(np.abs(x).astype(np.float64).sum()
                                   for x in jax.tree.leaves(host)))
print("RESULT " + json.dumps(out), flush=True)
"""


def _write_converted(path):
    import jax

    from depthg_jax.models import convert
    from depthg_jax.models import model as model_lib

    config = tiny_config(**{"model.variant": "S/16"})
    params = jax.device_get(model_lib.init_backbone(config.model, jax.random.key(7)))
    convert.save_backbone(params, "S/16", path, source="random init")
    return params


def test_restoring_reads_each_shard_once_per_process(tmp_path):
    import jax

    from depthg_jax.models import partitioning

    out = tmp_path / "s16"
    params = _write_converted(out)
    stored = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file())
    total = partitioning.total_bytes(params)
    expected_sum = float(sum(np.abs(x).astype(np.float64).sum() for x in jax.tree.leaves(params)))
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESTORE, f"127.0.0.1:{port}", str(i), str(out)],
            cwd=ROOT, env={**env(devices=4), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outputs, strict=True):
        assert p.returncode == 0, o[-3000:]
    for o in outputs:
        result = json.loads(o.split("RESULT ", 1)[1].splitlines()[0])
        # (2, 4): a process's 4 devices hold one row, i.e. every shard of every parameter:
        # it reads the whole checkpoint once (not once per device or per replica).
        assert 0.97 * stored <= result["2x4"] <= 1.03 * stored, (result, stored)
        assert result["2x4_device_bytes"] == total // 4
        # (1, 8): a process holds 4 of the 8 shards and reads only those: half.
        assert 0.47 * stored <= result["1x8"] <= 0.53 * stored, (result, stored)
        assert result["1x8_device_bytes"] == total // 8
        for name in ("2x4", "1x8"):
            assert result[name + "_sum"] == pytest.approx(expected_sum, rel=1e-6)
