"""Fault injection for the data and weight readers (issue 21): each fault replayed for real.

Bad KNN tables, hostile weight files (run in a subprocess under a 1.5 GB address-space cap),
ids and symlinks leading out of a dataset's root, outputs leading out of --out, images over
PIL's decompression-bomb limit, damaged record shards, what a killed command leaves, and the
label scan. Each ends in a one-line error naming the file and what to do, or in the stated
fallback, with nothing written outside its place.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from depthg_jax.data import (
    datasets,
    five_crop,
    images,
    knn,
    outputs,
    pipeline,
    prepare,
    records,
)
from depthg_jax.models import pth

ROOT = pathlib.Path(__file__).resolve().parents[1]
R = 16
CAP_BYTES = int(1.5 * 2**30)


def save(path, array):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def directory_dataset(root, split="train", n=4, labels=True, size=(24, 34)):
    rng = np.random.default_rng(0)
    for i in range(n):
        save(f"{root}/images/{split}/{i:02d}.png", rng.integers(0, 256, (*size, 3), np.uint8))
        save(f"{root}/depth/{split}/{i:02d}_zoedepth.png", rng.integers(0, 256, size, np.uint8))
        if labels:
            save(f"{root}/labels/{split}/{i:02d}.png", rng.integers(0, 3, size, np.uint8))
    return str(root)


def run_module(module, args, timeout=120, cap=False):
    """`python -m module args` in a fresh process (one CPU device); with cap, under RLIMIT_AS
    of 1.5 GB, reporting its peak RSS. Returns (exit status, stdout + stderr, seconds, peak
    RSS MB)."""
    prelude = "import sys, runpy, resource, atexit\n"
    if cap:
        prelude += f"resource.setrlimit(resource.RLIMIT_AS, ({CAP_BYTES}, {CAP_BYTES}))\n"
    # VmHWM is this process's own peak: ru_maxrss would include the forking parent's RSS,
    # which Linux carries across fork + exec.
    prelude += (
        "atexit.register(lambda: sys.stderr.write('\\nmaxrss_kb %s\\n' % [l.split()[1] for l "
        "in open('/proc/self/status') if l.startswith('VmHWM:')][0]))\n"
        f"sys.argv = [{module!r}, *{[str(a) for a in args]!r}]\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", prelude], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    seconds = time.monotonic() - start
    lines = (out.stdout + out.stderr).splitlines()
    rss = [int(line.split()[1]) / 1024 for line in lines if line.startswith("maxrss_kb")]
    text = "\n".join(line for line in lines if not line.startswith("maxrss_kb"))
    return out.returncode, text.strip(), seconds, rss[-1] if rss else float("nan")


def error_line(stderr: str) -> str:
    """The command's `error:` line; asserts it is its only output of note (no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# --------------------------------------------------------------------------------------
# 1. KNN tables checked on load; the KNN and data commands' numeric flags
# --------------------------------------------------------------------------------------


@pytest.fixture
def split(tmp_path):
    root = directory_dataset(tmp_path / "ds", n=4)
    return root, datasets.make_source("directory", root, "train", 3)


BAD_TABLES = {
    "all_minus_one": lambda t: np.full_like(t, -1),
    "plus_1000": lambda t: t + 1000,
    "float": lambda t: t.astype(np.float32),
    "not_self_first": lambda t: t[:, ::-1].copy(),
    "too_few_columns": lambda t: t[:, :2],
    "missing_row": lambda t: t[:-1],
}


@pytest.mark.parametrize("damage", sorted(BAD_TABLES))
def test_a_bad_knn_table_is_refused_naming_it_and_the_command_that_remakes_it(split, damage):
    root, source = split
    good = np.stack([np.roll(np.arange(4), -i) for i in range(4)]).astype(np.int32)
    path = knn.knn_table_path(root, "train", "pix", R)
    knn.save_knn_table(path, good, source.ids)
    assert knn.load_knn_table(path, source.ids, num_neighbors=2).shape == (4, 4)
    bad = BAD_TABLES[damage](good)
    # The table's own ids stay those of the split: only its indices are wrong.
    np.savez(path, indices=bad, ids=np.asarray(source.ids))
    command = "python -m depthg_jax.data.knn"
    with pytest.raises(
        ValueError, match=rf"^KNN table {re.escape(path)}.*; remake it with: {command}"
    ) as e:
        knn.load_knn_table(path, source.ids, num_neighbors=2)
    assert "\n" not in str(e.value)


def train_config(**kw):
    cfg = ml_collections.ConfigDict(
        dict(name="directory", root="", data_dir="", n_classes=3, train_split="train",
             eval_split="train", train_res=R, eval_res=R, num_neighbors=2, knn_variant="pix",
             read_threads=2, worker_count=0, prefetch=2)
    )  # fmt: skip
    cfg.update(kw)
    return cfg


def test_the_train_loader_refuses_a_table_of_minus_ones_instead_of_training_on_it(split):
    # Before: every positive silently became the last image (index -1).
    root, source = split
    path = knn.knn_table_path(root, "train", "pix", R)
    knn.save_knn_table(path, np.full((4, 4), -1, np.int32), source.ids)
    with pytest.raises(ValueError, match=r"16 indices outside \[0, 4\).*remake it with"):
        pipeline.make_train_loader(
            train_config(root=root), global_batch_size=2, seed=0, process_index=0,
            process_count=1,
        )  # fmt: skip


def test_the_knn_command_checks_its_numbers_before_any_work():
    with pytest.raises(ValueError, match="--per_device_batch=0"):
        knn.check_knn_args(0, 30, 7)
    with pytest.raises(ValueError, match=r"--k=7 .*use --k > 7"):
        knn.check_knn_args(1, 7, 7)
    knn.check_knn_args(1, 8, 7)


@pytest.mark.parametrize(
    "module, args, flag",
    [
        ("depthg_jax.data.knn", ["--config=configs/demo.py", "--per_device_batch=0"],
         "per_device_batch"),
        ("depthg_jax.data.prepare", ["--dataset=directory", "--data_dir=/nonexistent", "--k=1"],
         "k"),
        ("depthg_jax.data.five_crop", ["--dataset=directory", "--root=/a", "--out=/b",
                                       "--jpeg_quality=0"], "jpeg_quality"),
        ("depthg_jax.data.five_crop", ["--dataset=directory", "--root=/a", "--out=/b",
                                       "--n_classes=300"], "n_classes"),
    ],
)  # fmt: skip
def test_data_commands_refuse_out_of_range_numbers_in_one_line(module, args, flag):
    # Before: --per_device_batch=0 was a raw ZeroDivisionError after the backbone loaded.
    status, stderr, _, _ = run_module(module, args)
    assert status != 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"flag --{flag}=" in stderr


# --------------------------------------------------------------------------------------
# 2. Hostile weight and checkpoint files, under a 1.5 GB address-space cap
# --------------------------------------------------------------------------------------


def _p(value) -> bytes:
    """A value's pickle opcodes (protocol 2, without PROTO and STOP)."""
    return pickle_dumps(value)[2:-1]


def pickle_dumps(value) -> bytes:
    import pickle

    return pickle.dumps(value, protocol=2)


def tensor_pickle(numel, size, stride, key="0") -> bytes:
    """data.pkl of {"w": tensor} as torch.save writes it: _rebuild_tensor_v2 over a
    FloatStorage persistent id (written by hand: the names are torch's, torch is not needed)."""
    tup = lambda xs: b"(" + b"".join(_p(int(x)) for x in xs) + b"t"  # noqa: E731
    storage = b"(" + _p("storage") + b"ctorch\nFloatStorage\n" + _p(key) + _p("cpu")
    storage += _p(int(numel)) + b"tQ"  # the persistent id tuple, BINPERSID
    args = b"(" + storage + _p(0) + tup(size) + tup(stride) + b"\x89"  # offset, geometry
    args += b"ccollections\nOrderedDict\n)Rt"  # backward hooks: OrderedDict(); the args tuple
    return b"\x80\x02}" + _p("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."


def zip_entries(path, entries):
    """A zip of (name, data, method, crc, declared size) written by hand, so an entry's
    compressed data and its declared size can disagree (zipfile cannot write that)."""
    body, central = b"", b""
    for name, data, method, crc, size in entries:
        name = name.encode()
        offset = len(body)
        fields = (20, 0, method, 0, 33, crc, len(data), size, len(name), 0)
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields) + name + data
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, offset) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                      len(central), len(body), 0)  # fmt: skip
    pathlib.Path(path).write_bytes(body + central + end)


def stored(name, data):
    return (name, data, 0, zlib.crc32(data), len(data))


def deflated_zeros(n_chunks, chunk=1 << 24) -> bytes:
    """Raw deflate of n_chunks x chunk zero bytes, built in O(chunk): after a full flush the
    compressor forgets its history, so each chunk compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    return segment * n_chunks + c.flush()


GIB3 = 3 << 30
CRC_3GIB_OF_ZEROS = 0x480BBE37  # zlib.crc32 of 3 GiB of zero bytes


def hostile_files(folder) -> dict:
    folder = pathlib.Path(folder)
    bomb = deflated_zeros(GIB3 >> 24)  # 3 GiB of zeros in 3.1 MB
    files = {}
    # A 4-byte storage rebuilt as (40000, 40000) with stride (0, 0): 6.4 GB if expanded.
    zip_entries(folder / "stride0.pth", [
        stored("archive/data.pkl", tensor_pickle(1, (40000, 40000), (0, 0))),
        stored("archive/data/0", bytes(4)),
    ])  # fmt: skip
    files["stride0.pth"] = r"has 1600000000 elements but its storage holds 1"
    # One float's storage as a deflated entry declaring (and holding) 3 GiB.
    zip_entries(folder / "bomb.pth", [
        stored("archive/data.pkl", tensor_pickle(1, (1,), (1,))),
        ("archive/data/0", bomb, 8, CRC_3GIB_OF_ZEROS, GIB3),
    ])  # fmt: skip
    files["bomb.pth"] = r"declares 3221225472 bytes uncompressed, more than the 4"
    # The same stream under a header that declares 4 bytes.
    zip_entries(folder / "bomb_lying.pth", [
        stored("archive/data.pkl", tensor_pickle(1, (1,), (1,))),
        ("archive/data/0", bomb, 8, zlib.crc32(bytes(4)), 4),
    ])  # fmt: skip
    files["bomb_lying.pth"] = r"compressed bytes for the 4 it declares"
    # Lightning checkpoints whose hyper-parameters are a 40-level DAG, a cycle, or 5000 deep.
    dag = []
    for _ in range(40):
        dag = [dag, dag]
    cycle = []
    cycle.append(cycle)
    deep = b"\x80\x02" + b"]" * 5000 + b"a" * 4999  # [[[...]]] as opcodes
    for name, hparams, expected in [
        ("dag.ckpt", pickle_dumps(dag)[2:-1], r"hold more than 100000 values"),
        ("cycle.ckpt", pickle_dumps(cycle)[2:-1], r"contain themselves"),
        ("deep.ckpt", deep[2:], r"nest deeper than 64 levels"),
    ]:
        data = b"\x80\x02}" + _p("state_dict") + b"}s" + _p("hyper_parameters") + hparams + b"s."
        zip_entries(folder / name, [stored("archive/data.pkl", data)])
        files[name] = expected
    # safetensors whose header gives a 4-byte tensor a (40000, 40000) shape.
    header = json.dumps({"w": {"dtype": "F32", "shape": [40000, 40000], "data_offsets": [0, 4]}})
    (folder / "shape.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + bytes(4)
    )
    files["shape.safetensors"] = r"invalid shape, data type, or offset"
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, hostile_files(folder)


def test_the_hand_made_torch_files_are_what_torch_writes(tmp_path):
    """Control: the same writer with an honest geometry loads, so the refusals below are
    about the geometry, the entry sizes and the graphs, not the format."""
    zip_entries(tmp_path / "ok.pth", [
        stored("archive/data.pkl", tensor_pickle(3, (3,), (1,))),
        stored("archive/data/0", np.arange(3, dtype="<f4").tobytes()),
    ])  # fmt: skip
    np.testing.assert_array_equal(pth.load_pth(tmp_path / "ok.pth")["w"], [0.0, 1.0, 2.0])
    shared = [1]
    plain = pth.to_plain({"a": [shared, shared]})  # a small DAG is fine
    assert plain == {"a": [[1], [1]]}


@pytest.mark.parametrize(
    "name", ["stride0.pth", "bomb.pth", "bomb_lying.pth", "dag.ckpt", "cycle.ckpt", "deep.ckpt",
             "shape.safetensors"],
)  # fmt: skip
def test_a_hostile_weight_file_ends_in_one_clear_line_within_bounds(hostile, tmp_path, name):
    # Before: stride0 reached 8 GB RSS, bomb 6 GB, the DAG ran > 120 s at 7.4 GB, the cycle
    # was a 2,995-line RecursionError.
    folder, expected = hostile
    path = folder / name
    if name.endswith(".ckpt"):
        module, args = "depthg_jax.models.release", [f"--checkpoint={path}"]
    else:
        module, args = "depthg_jax.models.convert", ["--variant=mu/8", f"--weights={path}"]
    out = tmp_path / "out"
    status, stderr, seconds, rss_mb = run_module(module, [*args, f"--out={out}"], cap=True)
    line = error_line(stderr)
    print(f"{name}: {path.stat().st_size} bytes, {seconds:.1f} s, peak RSS {rss_mb:.0f} MB")
    assert status == 1 and line.startswith(f"error: {path}: ")
    assert re.search(expected[name], line), line
    assert seconds < 30 and rss_mb < 1024
    assert not out.exists()


def test_graph_bounds_are_parameters(tmp_path):
    with pytest.raises(pth.GraphError, match="deeper than 3"):
        pth.to_plain([[[[1]]]], max_depth=3)
    with pytest.raises(pth.GraphError, match="more than 10 values"):
        pth.to_plain(list(range(20)), max_nodes=10)
    loop = {}
    loop["self"] = loop
    with pytest.raises(pth.GraphError, match="a cycle through a dict"):
        pth.to_plain(loop)


# --------------------------------------------------------------------------------------
# 3. Ids confined to the root; outputs confined to --out
# --------------------------------------------------------------------------------------


def potsdam_root(root, ids):
    for i in ids:
        pathlib.Path(root, "imgs").mkdir(parents=True, exist_ok=True)
        savemat(f"{root}/imgs/{i}.mat", {"img": np.full((8, 8, 4), 0.5, np.float32)})
        save(f"{root}/depth/{i}_zoedepth.png", np.zeros((8, 8), np.uint8))
    return str(root)


@pytest.mark.parametrize("evil", ["../../outside/evil", "ABSOLUTE"])
def test_potsdam_ids_leading_out_of_the_root_are_refused_and_five_crop_writes_nothing(
    tmp_path, evil
):
    outside = tmp_path / "outside"
    outside.mkdir()
    savemat(str(outside / "evil.mat"), {"img": np.ones((8, 8, 4))})
    if evil == "ABSOLUTE":
        evil = str(outside / "evil")
    root = potsdam_root(tmp_path / "potsdam" / "data", ["a"])
    listing = pathlib.Path(root, "labelled_train.txt")
    listing.write_text(f"a\n{evil}\n")
    message = re.escape(f"{listing}: id '{evil}' is not a relative path inside the root {root}")
    with pytest.raises(ValueError, match=message):
        datasets.list_records("potsdam3", root, "train")
    out = tmp_path / "crops"
    status, stderr, _, _ = run_module(
        "depthg_jax.data.five_crop", ["--dataset=potsdam3", f"--root={root}", f"--out={out}"]
    )
    assert status == 1 and f"id '{evil}'" in error_line(stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "potsdam"]  # no crops
    assert [p.name for p in outside.iterdir()] == ["evil.mat"]


def test_coco_curated_ids_leading_out_of_the_root_are_refused(tmp_path):
    root = tmp_path / "coco"
    save(root / "images" / "val2017" / "1.jpg", np.zeros((8, 8, 3), np.uint8))
    listing = root / "curated" / "val2017" / datasets.COCO_CURATED_LISTS["val2017"]
    listing.parent.mkdir(parents=True)
    listing.write_text("1\n../../../outside/evil\n")
    with pytest.raises(ValueError, match=re.escape(f"{listing}: id '../../../outside/evil' is")):
        datasets.list_records("cocostuff27", str(root), "val")


def test_symlinks_leading_out_of_a_layout_folder_are_refused_but_linked_folders_work(tmp_path):
    outside = tmp_path / "outside"
    save(outside / "x.png", np.zeros((24, 34, 3), np.uint8))
    root = directory_dataset(tmp_path / "ds", n=2, labels=False)
    link = pathlib.Path(root, "images", "train", "02.png")
    link.symlink_to(outside / "x.png")
    with pytest.raises(ValueError, match=re.escape(f"id '02' leads to {outside / 'x.png'}, out")):
        datasets.list_records("directory", root, "train")
    link.unlink()
    # A symlinked split folder (data on another disk) is fine: its files stay inside it.
    moved = tmp_path / "big_disk" / "train"
    shutil.move(os.path.join(root, "images", "train"), moved)
    os.symlink(moved, os.path.join(root, "images", "train"))
    assert [r.id for r in datasets.list_records("directory", root, "train")] == ["00", "01"]
    # Cityscapes: a city folder linked to somewhere else.
    city = tmp_path / "cs" / "leftImg8bit" / "val"
    save(outside / "aachen" / "a_leftImg8bit.png", np.zeros((8, 8, 3), np.uint8))
    city.mkdir(parents=True)
    (city / "aachen").symlink_to(outside / "aachen")
    with pytest.raises(ValueError, match=r"id 'aachen/a' leads to .*outside .*of the root"):
        datasets.list_records("cityscapes27", str(tmp_path / "cs"), "val")


def test_five_crop_refuses_an_id_that_would_write_outside_out(tmp_path):
    root = directory_dataset(tmp_path / "ds", n=1, labels=False)
    (rec,) = datasets.list_records("directory", root, "train")
    escaping = datasets.Record("../../../../escaped", rec.image, rec.depth_stem)
    source = datasets.ExampleSource(
        [escaping], n_classes=3, label_lut=datasets.identity_lut(3), name="evil"
    )
    out = tmp_path / "a" / "out"
    with pytest.raises(
        ValueError, match=r"crop '../../../../escaped_0' of split 'train' would write"
    ):
        five_crop.write_five_crops(source, str(out), "train")
    assert not list(tmp_path.rglob("escaped*"))


# --------------------------------------------------------------------------------------
# 4. Images over PIL's decompression-bomb limit
# --------------------------------------------------------------------------------------


def png_of_zeros(path, width, height):
    """A valid greyscale PNG of width x height zeros, written in O(width) time and memory
    (14000 x 14000 decodes to 196 MB; the file is ~200 KB)."""
    row = bytes(width + 1)  # filter byte + pixels
    c = zlib.compressobj(9)
    body = c.compress(row) + c.flush(zlib.Z_FULL_FLUSH)
    segment = c.compress(row) + c.flush(zlib.Z_FULL_FLUSH)
    idat = body + segment * (height - 1) + c.flush()

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("side", [14000, 10000])  # over twice PIL's limit; over it (PIL warns)
def test_an_image_over_the_decompression_bomb_limit_is_a_named_error(tmp_path, side):
    root = directory_dataset(tmp_path / "ds", n=1)
    big = pathlib.Path(root, "images", "train", "00.png")
    png_of_zeros(big, side, side)
    with pytest.warns() if side == 10000 else _nothing():
        with pytest.raises(
            images.ImageReadError, match=re.escape(f"Cannot read image {big}: ")
        ) as e:
            images.read_image(big)
    assert e.value.path == big and "decompression-bomb limit" in str(e.value)
    assert "\n" not in str(e.value)
    label = pathlib.Path(root, "labels", "train", "00.png")
    png_of_zeros(label, side, side)
    with pytest.warns() if side == 10000 else _nothing():
        with pytest.raises(images.ImageReadError, match=re.escape(f"Cannot read label {label}: ")):
            datasets.read_label_png(str(label))
        source = datasets.make_source("directory", root, "train", 3)
        with pytest.raises(images.ImageReadError, match=re.escape(f"image {big}")):
            source[0]


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# 5., 6. Prepared records: damaged shards; what a killed prepare or five_crop leaves
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    root = directory_dataset(tmp / "download", "train", n=5)
    directory_dataset(tmp / "download", "val", n=3)
    prepare.prepare("directory", root, str(tmp / "records"))
    return root, tmp / "records"


def shard_of(data_dir):
    (shard,) = (data_dir / "directory" / "train" / "1.0.0").glob("*.array_record-*")
    return shard


def test_a_shard_with_flipped_bytes_is_named_with_its_example_range(prepared, tmp_path):
    # Before: "Corrupted Riegeli/records file: chunk data hash mismatch" from inside grain.
    data_dir = tmp_path / "records"
    shutil.copytree(prepared[1], data_dir)
    shard = shard_of(data_dir)
    data = bytearray(shard.read_bytes())
    for i in range(200, 1000, 13):  # inside the first chunk of records
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    source = records.make_source("directory", str(data_dir), "train", 3)
    message = (
        rf"^Corrupt records shard {re.escape(str(shard))} \(examples 0\.\.24 of .*hash mismatch"
    )
    with pytest.raises(ValueError, match=message) as e:
        source[0]
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        datasets.check_labels(source)


def test_a_shard_cut_to_half_is_refused_when_the_split_is_opened(prepared, tmp_path):
    data_dir = tmp_path / "records"
    shutil.copytree(prepared[1], data_dir)
    for cut in (0, 7):  # on a 64 KiB block boundary (read as empty before) and past it
        shard = shard_of(data_dir)
        shard.write_bytes(shard_of(prepared[1]).read_bytes()[: shard.stat().st_size // 2 + cut])
        with pytest.raises(ValueError, match=rf"^Corrupt records shard {re.escape(str(shard))}"):
            records.make_source("directory", str(data_dir), "train", 3)
        shard.write_bytes(shard_of(prepared[1]).read_bytes())


def test_a_killed_prepare_leaves_incomplete_folders_the_next_run_removes(prepared, tmp_path):
    root = prepared[0]
    data_dir = tmp_path / "records"
    hang = (
        "import sys, time\n"
        "from depthg_jax.data import datasets, prepare\n"
        "def stuck(self, i):\n"
        "    print('writing', flush=True); time.sleep(120)\n"
        "datasets.ExampleSource.__getitem__ = stuck\n"
        f"prepare.prepare('directory', {root!r}, {str(data_dir)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", hang], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        lines = iter(proc.stdout.readline, "")
        assert "writing" in (line.strip() for line in lines)  # TFDS prints a line first
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    left = prepare.stale_incomplete(data_dir / "directory")
    assert left and all(p.name.startswith("incomplete.") for p in left), left
    made = prepare.prepare("directory", root, str(data_dir))
    assert not prepare.stale_incomplete(data_dir / "directory")
    assert [pathlib.Path(m).name for m in made] == ["1.0.0", "1.0.0"]
    assert len(records.make_source("directory", str(data_dir), "train", 3)) == 25


def test_a_second_prepare_is_refused_while_one_runs(prepared, tmp_path):
    data_dir = tmp_path / "records"
    with outputs.WriterLock(data_dir / "directory", prepare.LOCK_FILE, "prepare"):
        with pytest.raises(ValueError, match=rf"another prepare \(pid {os.getpid()}\) is writing"):
            prepare.prepare("directory", prepared[0], str(data_dir))


def test_five_crop_removes_the_temporary_files_of_a_killed_run(prepared, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "crops"
    # What a five_crop killed inside runtime.files.write_atomic leaves.
    stale = out / "images" / "train" / f".00_0.jpg.{dead.pid}-w-k3x9a2b_.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a jpeg")
    source = datasets.make_source("directory", prepared[0], "train", 3)
    assert five_crop.write_five_crops(source, str(out), "train") == 5
    assert not stale.exists() and not list(out.rglob("*.tmp"))


# --------------------------------------------------------------------------------------
# 7. Unlabelled images; the label scan
# --------------------------------------------------------------------------------------


def test_five_crop_of_unlabelled_images_needs_no_n_classes(tmp_path):
    # Before: "--n_classes is required for dataset 'directory'".
    root = directory_dataset(tmp_path / "ds", n=2, labels=False)
    out = tmp_path / "crops"
    status, stderr, _, _ = run_module(
        "depthg_jax.data.five_crop", ["--dataset=directory", f"--root={root}", f"--out={out}"]
    )
    assert status == 0, stderr[-3000:]
    assert len(list((out / "images" / "train").iterdir())) == 10 and not (out / "labels").exists()
    _, help_text, _, _ = run_module("depthg_jax.data.five_crop", ["--help"])
    assert "directory and synthetic copy every stored id" in " ".join(help_text.split())
    assert "Default: the dataset's" not in help_text


def test_check_labels_names_bad_ids_and_all_ignore_files(tmp_path, prepared):
    root = directory_dataset(tmp_path / "ds", n=3)
    labels = pathlib.Path(root, "labels", "train")
    bad = np.zeros((24, 34), np.uint8)
    bad[:3, :4] = 7
    save(labels / "01.png", bad)
    save(labels / "02.png", np.full((24, 34), 255, np.uint8))
    source = datasets.make_source("directory", root, "train", 5)
    message = re.escape(f"outside the 5 classes: {labels / '01.png'} (id '01'): ")
    with pytest.raises(ValueError, match=message + r"12 pixels of \[7\]"):
        datasets.check_labels(source)
    with pytest.raises(ValueError, match="n_classes=8 is more than the 5"):
        datasets.check_labels(source, n_classes=8)
    found = datasets.check_labels(datasets.make_source("directory", root, "train", 8))
    assert found == {
        "total": 3, "labelled": 3, "all_ignore": 1, "all_ignore_files": [str(labels / "02.png")],
        "usable": 2, "class_pixels": found["class_pixels"],
    }  # fmt: skip
    assert found["class_pixels"][7] == 12 and sum(found["class_pixels"]) == 2 * 24 * 34
    unlabelled = directory_dataset(tmp_path / "u", n=2, labels=False)
    scan = datasets.check_labels(datasets.make_source("directory", unlabelled, "train", 5))
    assert (scan["total"], scan["labelled"], scan["usable"]) == (2, 0, 0)
    rec = datasets.check_labels(records.make_source("directory", str(prepared[1]), "train", 3))
    assert (rec["total"], rec["labelled"], rec["all_ignore"]) == (25, 25, 0)
