"""The Python inference API: the same labels as `segment` for arrays, PIL images and paths,
EXIF orientation as PIL applies it, the docstring's example, and clear input errors."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cli import REPO, run_in_process
from PIL import Image, ImageOps
from segment_test import N_CLASSES, make_export

from depthg_jax import inference, segment
from depthg_jax.runtime import integrity

SIZES = [(40, 56), (33, 20), (64, 48), (25, 31), (32, 32)]  # (H, W), one batch and a padded one


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("api") / "export")


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def segment_labels(export_dir, images, out, *extra):
    args = ["--checkpoint", export_dir, "--images", images, "--out", out, "--res", 32]
    assert (
        run_in_process(segment.define_flags, segment.run, args + ["--batch_size", 3, *extra]) == 0
    )
    return {p.stem: np.asarray(Image.open(p)) for p in sorted((out / "labels").glob("*.png"))}


def test_api_labels_equal_segments_for_arrays_pil_images_and_paths(export_dir, photos, tmp_path):
    want = segment_labels(export_dir, photos, tmp_path / "out")
    paths = [photos / f"{i}.png" for i in range(len(SIZES))]
    with inference.Segmenter.load(export_dir, res=32, batch_size=3) as seg:
        as_paths = seg.predict(paths)
        as_pil = seg.predict([Image.open(p) for p in paths])
        as_arrays = seg.predict([np.asarray(Image.open(p)) for p in paths])
        one = seg.predict(str(paths[2]))  # a single input gives a single Prediction
    for results in (as_paths, as_pil, as_arrays):
        assert len(results) == len(SIZES)
        for i, r in enumerate(results):
            np.testing.assert_array_equal(r.labels, want[str(i)])
            assert r.labels.shape == SIZES[i] and r.labels.dtype == np.int32
            assert r.probs.shape == (32, 32, N_CLASSES) and r.code.shape == (4, 4, 32)
            np.testing.assert_allclose(r.probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(one.labels, want["2"])


def test_a_batch_array_gives_a_list_and_the_stream_without_smoothing_agrees(export_dir):
    frames = np.random.default_rng(0).integers(0, 256, (5, 24, 40, 3), dtype=np.uint8)
    with inference.Segmenter.load(export_dir, res=32, batch_size=2) as seg:
        batch = seg.predict(frames)
        stream = list(seg.predict_stream(iter(frames)))
    assert isinstance(batch, list) and len(batch) == 5
    for a, b in zip(batch, stream, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.probs, b.probs)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_applies_it(tmp_path, orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[inference.EXIF_ORIENTATION_TAG] = orientation
    path = tmp_path / "phone.png"
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        pil_input = inference.to_rgb(im)
    np.testing.assert_array_equal(inference.read_image(path), want)
    np.testing.assert_array_equal(pil_input, want)
    if orientation >= 5:
        assert want.shape[:2] == (20, 12)  # the viewer's shape, not the stored one


def test_segment_writes_masks_in_the_viewers_orientation(export_dir, tmp_path):
    exif = Image.Exif()
    exif[inference.EXIF_ORIENTATION_TAG] = 6  # a phone photo taken upright, stored sideways
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(
        tmp_path / "phone.jpg", exif=exif
    )
    labels = segment_labels(export_dir, tmp_path / "phone.jpg", tmp_path / "out")
    assert labels["phone"].shape == (50, 30)


def test_the_docstring_example_runs_and_prints_what_it_says(export_dir):
    doc = inference.__doc__
    code = textwrap.dedent(doc.split("::\n", 1)[1].split("\nWhat `predict`", 1)[0])
    code = code.replace('"workdir/demo/export"', repr(export_dir))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "inference example", "exec"), {})  # noqa: S102
    said = re.findall(r"print\(.*?\)\s+# (\([0-9, ]+\))", code)
    assert printed.getvalue().split("\n")[:-1] == said and len(said) == 3


def test_bad_inputs_are_clear(export_dir, tmp_path):
    with inference.Segmenter.load(export_dir, res=32) as seg:
        with pytest.raises(inference.InputError, match="float32; predict takes uint8"):
            seg.predict(np.zeros((8, 8, 3), np.float32))
        with pytest.raises(inference.InputError, match=r"shape \(8, 8, 2\)"):
            seg.predict(np.zeros((8, 8, 2), np.uint8))
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"not an image")
        with pytest.raises(inference.InputError, match="broken.jpg"):
            seg.predict(broken)
    unsealed = tmp_path / "unsealed"
    shutil.copytree(export_dir, unsealed)
    (unsealed / integrity.MANIFEST).unlink()
    with pytest.raises(inference.InputError, match="MANIFEST.json.*unverified=True"):
        inference.Segmenter.load(unsealed)
    with pytest.warns(UserWarning, match="loading it unverified, as asked"):
        assert inference.Segmenter.load(unsealed, unverified=True).n_classes == N_CLASSES
    with pytest.raises(inference.InputError, match="multiple of the patch size 8"):
        inference.Segmenter.load(export_dir, res=30)


def test_assignment_files_say_what_they_hold(tmp_path):
    def write(name, record):
        path = tmp_path / name
        path.write_text(json.dumps(record))
        return str(path)

    perm = [2, 1, 0]
    report = write("e.json", {"kind": "evaluation report", "cluster": {"assignment": perm}})
    np.testing.assert_array_equal(inference.load_assignment(report, 3), perm)
    old = write(
        "old.json", {"cluster": {"assignment": perm}, "cluster_crf": {"assignment": [0, 2, 1]}}
    )
    np.testing.assert_array_equal(inference.load_assignment(old, 3), [0, 2, 1])  # CRF's first
    summary = {"kind": "training summary", "assignment": {"assignment": perm, "step": 40}}
    trained = write("t.json", summary)
    np.testing.assert_array_equal(inference.load_assignment(trained, 3, step=40), perm)
    with pytest.raises(inference.InputError, match="step 40, but the checkpoint holds step 20"):
        inference.load_assignment(trained, 3, step=20)
    label_free = write("lf.json", {"kind": "training summary", "validation": "label-free"})
    with pytest.raises(inference.InputError, match="validated without labels.*--names"):
        inference.load_assignment(label_free, 3)
    unscored = write("u.json", {"kind": "evaluation report", "labels": "none"})
    with pytest.raises(inference.InputError, match="no labelled images were scored"):
        inference.load_assignment(unscored, 3)


def test_importing_the_api_starts_no_jax_backend():
    # A notebook may call jax.distributed.initialize() after importing it.
    check = (
        "import depthg_jax.inference\n"
        "from jax._src import xla_bridge\n"
        "print(sorted(xla_bridge._backends))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
