"""Records read by grain: the loose-file pipeline's batches for the same seed, resumable state
(also after SIGKILL), and two jax.distributed processes each reading their share."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from depthg_jax.data import datasets, five_crop, knn, pipeline, prepare, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 16
N_CLASSES = 5


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def pooled(images):
    """A feature function: 4x4-pooled pixels (the backbone is not what is tested here)."""
    b = len(images)
    return images.reshape(b, 4, R // 4, 4, R // 4, 3).mean((2, 4)).reshape(b, -1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A directory download, its records (with KNN table) and the loose five-crop folder."""
    tmp = tmp_path_factory.mktemp("rec")
    root, data_dir, crops = str(tmp / "download"), str(tmp / "records"), str(tmp / "crops")
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 7)):
        for i in range(n):
            save(f"{root}/images/{split}/{i:02d}.png", rng.integers(0, 256, (24, 34, 3), np.uint8))
            save(f"{root}/labels/{split}/{i:02d}.png", rng.integers(0, 6, (24, 34), np.uint8))
            save(
                f"{root}/depth/{split}/{i:02d}_zoedepth.png",
                rng.integers(0, 256, (24, 34), np.uint8),
            )
    prepare.prepare("directory", root, data_dir)
    five_crop.write_five_crops(
        datasets.make_source("directory", root, "train", N_CLASSES), crops, "train"
    )
    source = records.make_source("directory", data_dir, "train", N_CLASSES)
    path = records.knn_table_path(source, "pix", R)
    knn.build_knn_table(source, pooled, res=R, global_batch_size=4, k=8, path=path)
    loose_path = knn.knn_table_path(crops, "train", "pix", R)
    loose = datasets.make_source("directory", crops, "train", N_CLASSES)
    knn.build_knn_table(loose, pooled, res=R, global_batch_size=4, k=8, path=loose_path)
    return {"root": root, "data_dir": data_dir, "crops": crops, "knn": str(path)}


def config(**kw):
    cfg = ml_collections.ConfigDict(
        dict(
            name="directory",
            root="",
            data_dir="",
            n_classes=N_CLASSES,
            train_split="train",
            eval_split="val",
            train_res=R,
            eval_res=R,
            num_neighbors=3,
            knn_variant="pix",
            read_threads=2,
            worker_count=0,
            prefetch=2,
        )
    )
    cfg.update(kw)
    return cfg


def train_loader(cfg, index=0, count=1, batch=6, seed=3):
    return pipeline.make_train_loader(
        cfg, global_batch_size=batch, seed=seed, process_index=index, process_count=count
    )


def assert_batches_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_knn_table_beside_the_records_equals_the_loose_one(prepared):
    assert prepared["knn"].endswith("directory/train/1.0.0/knn/nns_pix_train_16.npz")
    source = records.make_source("directory", prepared["data_dir"], "train", N_CLASSES)
    table = knn.load_knn_table(prepared["knn"], source.ids)
    loose = knn.load_knn_table(knn.knn_table_path(prepared["crops"], "train", "pix", R))
    assert table.shape == (25, 8)
    np.testing.assert_array_equal(table, loose)


@pytest.mark.slow
def test_same_train_and_eval_batches_as_the_loose_files(prepared):
    rec = train_loader(config(data_dir=prepared["data_dir"]))
    loose = train_loader(config(root=prepared["crops"]))
    for _ in range(6):  # 36 pairs: more than one epoch of the 25 crops.
        assert_batches_equal(next(rec), next(loose))
    rec_eval = pipeline.make_eval_loader(
        config(data_dir=prepared["data_dir"]),
        global_batch_size=4,
        process_index=0,
        process_count=1,
    )
    loose_eval = pipeline.make_eval_loader(
        config(root=prepared["root"]), global_batch_size=4, process_index=0, process_count=1
    )
    got, want = list(rec_eval), list(loose_eval)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert_batches_equal(a, b)


@pytest.mark.slow
def test_iterator_state_round_trip(prepared):
    cfg = config(data_dir=prepared["data_dir"])
    it = train_loader(cfg)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = train_loader(cfg)
    resumed.set_state(state)
    for want in expected:
        assert_batches_equal(next(resumed), want)


READER = r"""
import json, sys, time
import numpy as np
import ml_collections
from depthg_jax.data import pipeline
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
out, state = sys.argv[2], sys.argv[3]
it = pipeline.make_train_loader(cfg, global_batch_size=6, seed=3, process_index=0, process_count=1)
if state != "-":
    it.set_state(json.load(open(state)))
k = 0
while True:
    batch = next(it)
    np.savez(f"{out}/batch_{k}.npz", **batch)
    with open(f"{out}/state.json.tmp", "w") as f:
        json.dump(it.get_state(), f)
    import os
    os.replace(f"{out}/state.json.tmp", f"{out}/state.json")
    with open(f"{out}/done.txt", "w") as f:
        f.write(str(k))
    k += 1
    time.sleep(0.3)
"""


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_batches(prepared, tmp_path):
    cfg = config(data_dir=prepared["data_dir"])
    reference = train_loader(cfg)
    reference = [next(reference) for _ in range(8)]
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", READER, json.dumps(cfg.to_dict()), str(out), "-"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "done.txt").exists() or int((out / "done.txt").read_text() or -1) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "reader made no progress"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads((out / "state.json").read_text())
    resumed = train_loader(cfg)
    resumed.set_state(done)
    written = sorted(out.glob("batch_*.npz"))
    k = max(int(p.stem.split("_")[1]) for p in written)
    state_after = int((out / "done.txt").read_text())  # The state saved after batch k.
    assert state_after in (k, k - 1)  # Killed after writing batch k, maybe before its state.
    for want in reference[state_after + 1 : state_after + 4]:
        assert_batches_equal(next(resumed), want)
    for j in range(state_after + 1):
        with np.load(out / f"batch_{j}.npz") as z:
            assert_batches_equal(dict(z), reference[j])


WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[3]))
import numpy as np
import ml_collections
from depthg_jax.data import pipeline
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
p, n = jax.process_index(), jax.process_count()
it = pipeline.make_train_loader(cfg, global_batch_size=6, seed=3, process_index=p, process_count=n)
train = [next(it) for _ in range(5)]
ev = list(pipeline.make_eval_loader(cfg, global_batch_size=4, process_index=p, process_count=n))
np.savez(sys.argv[4], **{f"train{t}_{k}": v for t, b in enumerate(train) for k, v in b.items()},
         **{f"eval{t}_{k}": v for t, b in enumerate(ev) for k, v in b.items()})
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_each_read_their_share(prepared, tmp_path):
    cfg = config(data_dir=prepared["data_dir"])
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    address = f"127.0.0.1:{free_port()}"
    outs = [str(tmp_path / f"p{i}.npz") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(cfg.to_dict()), address, str(i), outs[i]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(logs)
    parts = [dict(np.load(o)) for o in outs]
    # Train: each host holds its half of every global batch, together the one-process batch.
    single = train_loader(cfg)
    for t in range(5):
        want = next(single)
        for key, value in want.items():
            got = np.concatenate([parts[0][f"train{t}_{key}"], parts[1][f"train{t}_{key}"]])
            np.testing.assert_array_equal(got, value, err_msg=f"train batch {t} {key}")
    # Eval: the valid examples of both hosts are the split, each once.
    src = records.make_source("directory", prepared["data_dir"], "val", N_CLASSES, role="eval")
    from depthg_jax.data.transforms import resize_center_crop

    seen = []
    for t in range(2):
        for p in parts:
            valid = p[f"eval{t}_valid"]
            seen += list(p[f"eval{t}_image"][valid])
    assert len(seen) == len(src) == 7
    for i, image in enumerate(seen):  # Host 0 reads 0-1, host 1 reads 2-3, then 4-5 and 6.
        np.testing.assert_array_equal(image, resize_center_crop(src[i], R)["image"])
