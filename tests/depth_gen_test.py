"""Tests of the depth-generation command (depthg_jax.data.depth) and its file helpers.

The model is a tiny Depth Anything (2-layer width-32 Dinov2 backbone, the "v2-mu/14" variant,
random weights) saved with save_pretrained into a temporary folder and loaded by path: no
download, no network. Depth Anything runs on the JAX backend by default; `tiny_model` (a
loaded PyTorch model) and `--backend=torch` run the PyTorch one, and both must write the same
maps.
"""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from depth_anything_test import official_state  # a test module (tests/ is on sys.path)
from PIL import Image

from depthg_jax.data import depth as depth_cmd
from depthg_jax.data import depth_io
from depthg_jax.data import images as images_lib
from depthg_jax.models import depth_anything as da

try:  # The optional 'depth' extra; these tests need it and fail (not skip) without it.
    import torch
    import transformers
except ImportError as e:
    pytest.fail(f"tests/depth_gen_test.py needs the 'depth' extra: {depth_cmd.EXTRA_HINT} ({e})")

REPO = Path(__file__).resolve().parents[1]
SIZES = [(40, 70), (64, 48), (33, 33), (40, 70), (50, 90)]  # (H, W), two sharing a shape.


# --- Fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight Depth Anything saved with its image processor, loadable by path."""
    path = tmp_path_factory.mktemp("tiny_depth_anything")
    backbone = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,  # mlp_ratio 4: the project's "v2-mu/14" ViT
        patch_size=14,
        image_size=28,
        out_indices=[1, 2],
        reshape_hidden_states=False,
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        reassemble_factors=[2, 1],
        neck_hidden_sizes=[16, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
    )
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # every tensor matters (biases, LayerNorm affine, LayerScale)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.head.conv3.bias.add_(0.5)  # most of the map above the final ReLU
    model.save_pretrained(path)
    processor = transformers.DPTImageProcessorPil(
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> "depth_cmd.DepthModel":
    return depth_cmd.load_depth_model(str(tiny_model_dir), device="cpu")


def write_directory_dataset(root: Path, n_extra: int = 0) -> list[Path]:
    """A `directory` layout with sub-folders, PNG and JPEG, several sizes; returns rel paths."""
    rng = np.random.default_rng(0)
    rels = []
    for i, (h, w) in enumerate(SIZES + [(32, 32)] * n_extra):
        split = "train" if i % 2 == 0 else "val"
        sub = "city_a/" if i == 4 else ""
        ext = ".jpg" if i == 1 else ".png"
        rel = Path(f"{split}/{sub}img_{i:03d}{ext}")
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        # Smooth images with structure, so a random model's prediction is not flat.
        yy, xx = np.mgrid[0:h, 0:w]
        base = (np.sin(xx / (3 + i)) + np.cos(yy / 5.0)) * 60 + 128
        img = np.clip(base[..., None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / rel)
        rels.append(rel)
    return rels


def hash_tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) → sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def reference_depth(model_dir: Path, image_path: Path) -> np.ndarray:
    """The model's raw prediction at the image's size, straight from transformers, one image."""
    model = transformers.AutoModelForDepthEstimation.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    with torch.no_grad():
        out = model(**processor(images=image, return_tensors="pt"))
    # Resized as the transformers depth pipelines do: bicubic, align_corners False.
    resized = torch.nn.functional.interpolate(
        out.predicted_depth[:, None], size=image.shape[:2], mode="bicubic", align_corners=False
    )
    return resized[0, 0].numpy()


def interrupt_after(n: int):
    """(the out paths reported done, an on_image_done that raises KeyboardInterrupt at the n-th,
    as if the run were stopped there)."""
    done = []

    def stop(rel, out_path):
        done.append(out_path)
        if len(done) == n:
            raise KeyboardInterrupt

    return done, stop


def run_main(argv, capsys) -> tuple[int, str]:
    rc = depth_cmd.main([*argv, "--noprogress"])
    return rc, capsys.readouterr().err


# --- Pure helpers ------------------------------------------------------------------------------


def test_depth_to_png8_range_and_sign():
    depth = np.array([[1.0, 2.0], [3.0, 5.0]])  # Depth: 1 is nearest.
    np.testing.assert_array_equal(depth_io.depth_to_png8(depth, "small"), [[0, 63], [127, 255]])
    # Disparity: 5 is nearest, so it maps to 0 and the smallest value to 255.
    disparity = depth
    np.testing.assert_array_equal(
        depth_io.depth_to_png8(disparity, "large"), [[255, 191], [127, 0]]
    )
    assert depth_io.depth_to_png8(depth).dtype == np.uint8
    np.testing.assert_array_equal(
        depth_io.depth_to_png16(depth, "small"), [[0, 16383], [32767, 65535]]
    )
    assert depth_io.depth_to_png16(depth).dtype == np.uint16
    np.testing.assert_array_equal(depth_io.depth_to_png8(np.full((3, 4), 7.0)), np.zeros((3, 4)))
    np.testing.assert_allclose(depth_io.depth_to_far_positive(disparity, "large"), [[4, 3], [2, 0]])
    np.testing.assert_array_equal(depth_io.depth_to_far_positive(depth, "small"), depth)
    with pytest.raises(ValueError, match="non-finite"):
        depth_io.depth_to_png8(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\(2, 2, 1\)"):
        depth_io.depth_to_png8(np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="nearest_is"):
        depth_io.depth_to_png8(depth, "near")


@pytest.mark.parametrize(
    "rel, fmt, expected",
    [
        ("train2017/000000000139.jpg", "png8", "train2017/000000000139_zoedepth.png"),
        (
            "train/aachen/aachen_000000_000019_leftImg8bit.png",
            "png8",
            "train/aachen/aachen_000000_000019_leftImg8bit_zoedepth.png",
        ),
        ("top_potsdam_2_10_0.mat", "png8", "top_potsdam_2_10_0_zoedepth.png"),
        ("val/a.b.png", "png16", "val/a.b_zoedepth_16.png"),
        ("val/x.png", "npy", "val/x_depth.npy"),
    ],
)
def test_map_output_path(rel, fmt, expected):
    assert depth_io.map_output_path(rel, fmt) == Path(expected)


def test_discover_images_mirrors_layouts(tmp_path):
    files = [
        "train2017/1.jpg",  # COCO-Stuff
        "train/aachen/a_leftImg8bit.png",  # Cityscapes
        "t_2_10.mat",  # Potsdam
        "val/deep/er/x.PNG",  # directory, nested ids
        "val/y_depth.png",  # Only our depth PNG names are excluded.
    ]
    ignored = [
        "train/.hidden.png",
        ".cache/y.png",
        "val/x_zoedepth.png",
        "val/x_zoedepth_16.png",
        "notes.txt",
    ]
    for f in files + ignored:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    assert images_lib.find_images(tmp_path) == sorted(Path(f) for f in files)
    collisions = depth_io.find_output_collisions([Path("a/x.jpg"), Path("a/x.png")], "png8")
    assert collisions == {Path("a/x_zoedepth.png"): [Path("a/x.jpg"), Path("a/x.png")]}


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "d" / "x_zoedepth.png"

    def half_write(f):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt  # As if the run were stopped mid-write.

    with pytest.raises(KeyboardInterrupt):
        depth_io.write_atomic(target, half_write)
    assert list(target.parent.iterdir()) == []
    depth_io.save_depth(target, np.array([[0, 255]], np.uint8))
    np.testing.assert_array_equal(np.asarray(Image.open(target)), [[0, 255]])
    assert sorted(p.name for p in target.parent.iterdir()) == ["x_zoedepth.png"]


def test_read_potsdam_mat(tmp_path):
    from scipy.io import savemat

    rgbi = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    savemat(tmp_path / "p.mat", {"img": rgbi})
    img = images_lib.read_image(tmp_path / "p.mat")
    assert img.shape == (6, 5, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, (rgbi[..., :3] * 255).astype(np.uint8))


# --- Model loading -----------------------------------------------------------------------------


def test_infer_nearest_is_per_model_type():
    relative = transformers.DepthAnythingConfig(depth_estimation_type="relative")
    metric = transformers.DepthAnythingConfig(depth_estimation_type="metric", max_depth=20)
    assert depth_cmd.infer_nearest_is(relative) == "large"  # Disparity.
    assert depth_cmd.infer_nearest_is(metric) == "small"
    assert depth_cmd.infer_nearest_is(transformers.DPTConfig()) == "large"  # MiDaS.
    assert depth_cmd.infer_nearest_is(transformers.ZoeDepthConfig()) == "small"
    assert depth_cmd.infer_nearest_is(transformers.GLPNConfig()) == "small"
    with pytest.raises(depth_cmd.DepthGenError, match="--nearest_is"):
        depth_cmd.infer_nearest_is(transformers.BertConfig())


def test_unknown_model_gives_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_directory_dataset(tmp_path)
    args = [f"--images={tmp_path / 'images'}", f"--out={tmp_path / 'depth'}"]
    rc, err = run_main([*args, "--model=no-such-org/no-such-depth-model"], capsys)
    assert rc == 2
    assert "no-such-org/no-such-depth-model" in err and "--model=DIR" in err
    rc, err = run_main([*args, f"--model={tmp_path / 'missing_model'}"], capsys)
    assert rc == 2 and "missing_model: no such directory" in err
    assert not (tmp_path / "depth").exists() or not any((tmp_path / "depth").rglob("*.png"))


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # Makes `import transformers` fail.
    with pytest.raises(depth_cmd.DepthGenError, match=r"\.\[depth\]"):
        depth_cmd.import_backend()


def test_core_modules_do_not_import_torch():
    code = (
        "import sys, depthg_jax.data.depth, depthg_jax.data.depth_io;"
        "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# --- The command end to end --------------------------------------------------------------------


def test_generates_every_map_at_image_size_and_reruns_as_noop(tiny_model_dir, tmp_path, capsys):
    rels = write_directory_dataset(tmp_path)
    images, out = tmp_path / "images", tmp_path / "depth"
    before = hash_tree(images)
    argv = [f"--images={images}", f"--out={out}", f"--model={tiny_model_dir}", "--batch_size=2"]
    rc, err = run_main(argv, capsys)
    assert rc == 0, err
    assert "written 5, skipped 0 (already present), failed 0" in err
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written == sorted(depth_io.map_output_path(r) for r in rels)
    for rel in rels:
        png = np.asarray(Image.open(out / depth_io.map_output_path(rel)))
        h, w = np.asarray(Image.open(images / rel)).shape[:2]
        assert png.shape == (h, w) and png.dtype == np.uint8
        assert png.min() == 0 and png.max() == 255  # Per-image min-max.
        # Against transformers directly: Depth Anything gives disparity, so its largest
        # value (nearest) is 0 in our file and its smallest is 255.
        ref = reference_depth(tiny_model_dir, images / rel)
        assert png.flat[np.argmax(ref)] <= 1 and png.flat[np.argmin(ref)] >= 254
        expected = depth_io.depth_to_png8(ref, "large").astype(int)
        assert np.abs(png.astype(int) - expected).max() <= 1  # Batched vs single: last bit.
    assert hash_tree(images) == before  # Inputs byte-identical, nothing added beside them.

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc, err = run_main(argv, capsys)
    assert rc == 0 and "written 0, skipped 5 (already present), failed 0" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert hash_tree(images) == before

    # The folder reads through the `directory` dataset: depth aligned, 0..255, 0 = nearest.
    from depthg_jax.data import datasets

    source = datasets.make_source("directory", str(tmp_path), "train", n_classes=3)
    assert len(source) == 3
    for i in range(len(source)):
        ex = source[i]
        assert ex["depth"].shape == ex["image"].shape[:2]
        assert ex["depth"].min() == 0.0 and ex["depth"].max() == 255.0


@pytest.mark.parametrize("fmt", ["npy", "png16"])
def test_other_formats(fmt, tiny_model, tiny_model_dir, tmp_path):
    rels = write_directory_dataset(tmp_path)
    for extra in rels[2:]:
        (tmp_path / "images" / extra).unlink()
    rels = rels[:2]
    out = tmp_path / "depth"
    summary = depth_cmd.generate_depth(
        tmp_path / "images", out, tiny_model, fmt=fmt, progress=False
    )
    assert summary.written == 2 and not summary.failed
    for rel in rels:
        path = out / depth_io.map_output_path(rel, fmt)
        ref = reference_depth(tiny_model_dir, tmp_path / "images" / rel)
        if fmt == "npy":
            got = np.load(path)
            assert got.dtype == np.float32 and got.shape == ref.shape
            # Larger = farther: the disparity flipped, the nearest point at 0.
            np.testing.assert_allclose(got, ref.max() - ref, rtol=1e-4, atol=1e-4 * np.ptp(ref))
            assert got.min() == 0.0
        else:
            got = np.asarray(Image.open(path))
            assert got.dtype == np.uint16 and got.shape == ref.shape
            assert got.min() == 0 and got.max() == 65535
            expected = depth_io.depth_to_png16(ref, "large").astype(int)
            assert np.abs(got.astype(int) - expected).max() <= 1


def test_nearest_is_override_flips_the_map(tiny_model, tiny_model_dir, tmp_path):
    rel = write_directory_dataset(tmp_path)[2]
    images, out = tmp_path / "images", tmp_path / "depth"
    summary = depth_cmd.generate_depth(images, out, tiny_model, nearest_is="small", progress=False)
    assert summary.written == 5 and tiny_model.nearest_is == "large"  # Caller's model untouched.
    png = np.asarray(Image.open(out / depth_io.map_output_path(rel))).astype(int)
    ref = reference_depth(tiny_model_dir, images / rel)
    assert np.abs(png - depth_io.depth_to_png8(ref, "small").astype(int)).max() <= 1


def test_interrupted_run_resumes(tiny_model, tmp_path):
    rels = write_directory_dataset(tmp_path)
    images, out = tmp_path / "images", tmp_path / "depth"
    done, stop = interrupt_after(2)
    with pytest.raises(KeyboardInterrupt):
        depth_cmd.generate_depth(
            images, out, tiny_model, batch_size=1, progress=False, on_image_done=stop
        )
    on_disk = sorted(p for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(done)  # Two whole files, no temporaries.
    mtimes = {p: p.stat().st_mtime_ns for p in on_disk}

    summary = depth_cmd.generate_depth(images, out, tiny_model, progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (3, 2, [])
    assert {p: p.stat().st_mtime_ns for p in on_disk} == mtimes
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == sorted(
        depth_io.map_output_path(r) for r in rels
    )


def test_killed_process_resumes(tiny_model, tiny_model_dir, tmp_path):
    """A real `python -m` run, SIGKILLed once it has written something, then resumed."""
    rels = write_directory_dataset(tmp_path, n_extra=25)
    images, out = tmp_path / "images", tmp_path / "depth"
    before = hash_tree(images)
    cmd = [sys.executable, "-m", "depthg_jax.data.depth", f"--images={images}", f"--out={out}"]
    cmd += [f"--model={tiny_model_dir}", "--batch_size=1", "--device=cpu", "--noprogress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not any(out.rglob("*_zoedepth.png")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the command ended before writing anything"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = sorted(out.rglob("*_zoedepth.png"))
    assert 1 <= len(first) < len(rels)
    input_of = {out / depth_io.map_output_path(r): images / r for r in rels}
    for path in first:  # Everything under its final name is whole and the image's size.
        with Image.open(path) as png:
            png.load()
            assert png.size == Image.open(input_of[path]).size

    summary = depth_cmd.generate_depth(images, out, tiny_model, progress=False)
    assert summary.skipped == len(first) and summary.written == len(rels) - len(first)
    assert sorted(out.rglob("*_zoedepth.png")) == sorted(input_of)
    assert hash_tree(images) == before


def test_unreadable_image_is_reported_and_others_continue(tiny_model_dir, tmp_path, capsys):
    rels = write_directory_dataset(tmp_path)
    bad = tmp_path / "images" / "train" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    argv = [f"--images={tmp_path / 'images'}", f"--out={tmp_path / 'depth'}"]
    rc, err = run_main([*argv, f"--model={tiny_model_dir}"], capsys)
    assert rc == 1
    assert "written 5, skipped 0 (already present), failed 1" in err
    assert "failed: train/broken.jpg: unreadable image" in err
    for rel in rels:
        assert (tmp_path / "depth" / depth_io.map_output_path(rel)).is_file()
    assert not (tmp_path / "depth" / "train" / "broken_zoedepth.png").exists()


def test_output_inside_images_is_refused(tiny_model_dir, tmp_path, capsys):
    write_directory_dataset(tmp_path)
    images = tmp_path / "images"
    before = hash_tree(images)
    for out in (images, images / "depth", images / "train"):
        rc, err = run_main([f"--images={images}", f"--out={out}"], capsys)
        assert rc == 2 and "is inside --images" in err
    # --images inside --out is fine, unless an output would land in the images' tree:
    # out/images/<x> for an image at images/images/<x>.
    nested = images / "images" / "n.png"
    nested.parent.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(nested)
    rc, err = run_main([f"--images={images}", f"--out={tmp_path}"], capsys)
    assert rc == 2 and "would lie inside --images" in err
    nested.unlink()
    nested.parent.rmdir()
    assert hash_tree(images) == before
    # Nothing was loaded or written for the refused runs; the model was never needed.
    assert not any(tmp_path.rglob("*_zoedepth.png"))


# --- ZoeDepth with flip test-time augmentation (the release's depth maps) ----------------------


@pytest.fixture(scope="module")
def tiny_zoedepth_dir(tmp_path_factory) -> Path:
    """A random-weight ZoeDepth (4-layer width-32 BEiT, 8 bins) with ZoeDepth's processor,
    saved with save_pretrained and loaded by path: no download."""
    path = tmp_path_factory.mktemp("tiny_zoedepth")
    backbone = transformers.BeitConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        out_indices=[1, 2, 3, 4],
        use_relative_position_bias=True,
        reshape_hidden_states=False,
    )
    config = transformers.ZoeDepthConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        bottleneck_features=16,
        num_relative_features=8,
        bin_embedding_dim=8,
        num_attractors=[4, 2, 2, 1],
        bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0}],
        # At the default 0.02 a model this small predicts a constant; 0.2 gives varied maps.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    transformers.ZoeDepthForDepthEstimation(config).save_pretrained(path)
    # The PIL-backed class where transformers has one (the other needs torchvision).
    processor_cls = getattr(transformers, "ZoeDepthImageProcessorPil", None)
    processor_cls = processor_cls or transformers.ZoeDepthImageProcessor
    # As Intel/zoedepth-nyu's, at a tiny size: reflect padding, aspect kept, multiple of 32.
    processor_cls(
        size={"height": 64, "width": 64}, keep_aspect_ratio=True, ensure_multiple_of=32
    ).save_pretrained(path)
    return path


def zoedepth_restated(model_dir: Path, image_path: Path, flip_tta: bool) -> np.ndarray:
    """ZoeDepth's map at the image's size, restated with transformers, one image:
    model(x) (and model(flip(x)) flipped back, averaged), resized bicubically to the padded
    size, the int(sqrt(side / 2) * 3) reflection padding cropped off."""
    model = transformers.ZoeDepthForDepthEstimation.from_pretrained(model_dir).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    image = np.asarray(Image.open(image_path).convert("RGB"))
    h, w = image.shape[:2]
    x = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pred = model(pixel_values=x).predicted_depth
        if flip_tta:
            pred_flipped = model(pixel_values=torch.flip(x, dims=[3])).predicted_depth
            pred = 0.5 * (pred + torch.flip(pred_flipped, dims=[2]))
    ph, pw = int(np.sqrt(h / 2) * 3), int(np.sqrt(w / 2) * 3)
    full = torch.nn.functional.interpolate(
        pred[:, None], size=(h + 2 * ph, w + 2 * pw), mode="bicubic", align_corners=False
    )
    return full[0, 0, ph : ph + h, pw : pw + w].numpy()


def released_png8(depth: np.ndarray) -> np.ndarray:
    """The release's encoding: (d - min) / (max - min), then (· 255).astype(uint8)."""
    return ((depth - depth.min()) / (depth.max() - depth.min()) * 255).astype(np.uint8)


def test_zoedepth_padding_by_hand():
    assert depth_cmd.zoedepth_padding(40, 70) == (13, 17)  # sqrt(20)·3 = 13.4, sqrt(35)·3 = 17.7
    assert depth_cmd.zoedepth_padding(480, 640) == (46, 53)  # 46.5, 53.7


def test_zoedepth_flip_tta_equals_transformers_restated(tiny_zoedepth_dir, tmp_path, capsys):
    rels = write_directory_dataset(tmp_path)[:3]
    for extra in write_directory_dataset(tmp_path)[3:]:
        (tmp_path / "images" / extra).unlink()
    images = tmp_path / "images"
    model = f"--model={tiny_zoedepth_dir}"
    rc, err = run_main(
        [f"--images={images}", f"--out={tmp_path / 'tta'}", model, "--flip_tta"], capsys
    )
    assert rc == 0, err
    rc, err = run_main([f"--images={images}", f"--out={tmp_path / 'plain'}", model], capsys)
    assert rc == 0, err
    for rel in rels:
        out_rel = depth_io.map_output_path(rel)
        tta = np.asarray(Image.open(tmp_path / "tta" / out_rel)).astype(int)
        plain = np.asarray(Image.open(tmp_path / "plain" / out_rel)).astype(int)
        want_tta = released_png8(zoedepth_restated(tiny_zoedepth_dir, images / rel, True))
        want_plain = released_png8(zoedepth_restated(tiny_zoedepth_dir, images / rel, False))
        assert tta.shape == want_tta.shape == np.asarray(Image.open(images / rel)).shape[:2]
        assert tta.min() == 0 and tta.max() == 255
        # ZoeDepth predicts depth: the nearest point is 0 as released, no inversion.
        # One image per forward on both sides (all sizes differ): the same arithmetic.
        np.testing.assert_array_equal(tta, want_tta, err_msg=str(rel))
        np.testing.assert_array_equal(plain, want_plain, err_msg=str(rel))
        # The augmentation changes the map (the random model is not mirror-symmetric).
        assert np.abs(want_tta.astype(int) - want_plain.astype(int)).max() > 8, rel


def test_flip_average_checks_shapes():
    a = torch.arange(6.0).reshape(1, 2, 3)
    np.testing.assert_array_equal(depth_cmd.flip_average(a, a), [[[1, 1, 1], [4, 4, 4]]])
    with pytest.raises(ValueError, match=r"\(1, 2, 3\).*\(1, 3, 2\)"):
        depth_cmd.flip_average(a, a.reshape(1, 3, 2))


# --- The JAX path (the default for Depth Anything) ---------------------------------------------


def png_stats(a: Path, b: Path, rels) -> tuple[int, float]:
    """(max grey-level difference, share of identical pixels) of the maps of rels under a, b."""
    worst, same, total = 0, 0, 0
    for rel in rels:
        x = np.asarray(Image.open(a / depth_io.map_output_path(rel))).astype(int)
        y = np.asarray(Image.open(b / depth_io.map_output_path(rel))).astype(int)
        assert x.shape == y.shape
        worst, same, total = (
            max(worst, int(np.abs(x - y).max())),
            same + (x == y).sum(),
            total + x.size,
        )
    return worst, same / total


@pytest.mark.slow
@pytest.mark.parametrize("flip", [False, True])
def test_jax_maps_equal_the_pytorch_maps(tiny_model_dir, tmp_path, capsys, flip):
    rels = write_directory_dataset(tmp_path)
    images = tmp_path / "images"
    for backend in ("jax", "torch"):
        argv = [f"--images={images}", f"--out={tmp_path / backend}", f"--model={tiny_model_dir}"]
        argv += [f"--backend={backend}", "--batch_size=2", *(["--flip_tta"] if flip else [])]
        rc, err = run_main(argv, capsys)
        assert rc == 0, err
        assert f"depth: {backend} backend" in err and "written 5, skipped 0" in err
    worst, same = png_stats(tmp_path / "jax", tmp_path / "torch", rels)
    assert worst <= 1 and same >= 0.99, (worst, same)


def test_auto_backend_is_jax_for_depth_anything_and_torch_for_others(
    tiny_model_dir, tiny_zoedepth_dir
):
    assert depth_cmd.choose_backend(tiny_model_dir) == "jax"
    assert depth_cmd.choose_backend(tiny_zoedepth_dir) == "torch"
    assert depth_cmd.choose_backend(tiny_zoedepth_dir, "jax") == "jax"


@pytest.mark.slow
def test_flip_tta_changes_the_jax_map(tiny_model_dir, tmp_path):
    rels = write_directory_dataset(tmp_path)
    jm = depth_cmd.load_jax_model(str(tiny_model_dir))
    for flip in (False, True):
        out = tmp_path / f"flip_{flip}"
        summary = depth_cmd.generate_depth(
            tmp_path / "images", out, jm, flip_tta=flip, progress=False
        )
        assert summary.written == 5
    worst, _ = png_stats(tmp_path / "flip_False", tmp_path / "flip_True", rels)
    assert worst > 8  # the random model is not mirror-symmetric


def test_one_compile_per_preprocessed_shape(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Images of 5 sizes in 4 preprocessed shapes (33x33 and 32x32 both become 56x56): one
    program per shape, however many images share it (partial batches are padded), and the
    images run in shape order, so only each shape's last batch is partial."""
    write_directory_dataset(tmp_path, n_extra=3)  # three more 32x32 images
    jm = depth_cmd.load_jax_model(str(tiny_model_dir))
    pre = jm.preprocess
    shapes = {
        da.preprocessed_size(h, w, pre["size"], pre["multiple"], pre["keep_aspect_ratio"])
        for h, w in SIZES + [(32, 32)]
    }
    assert len(shapes) < len(set(SIZES + [(32, 32)]))
    depth_cmd._jax_forward.cache_clear()  # a fresh jitted forward: count its programs
    forward = depth_cmd.JaxPredictor(jm, 3, "float32", False).forward  # the run's (cached)
    before = forward._cache_size()
    batches = []
    submit = depth_cmd.JaxPredictor.submit
    monkeypatch.setattr(
        depth_cmd.JaxPredictor,
        "submit",
        lambda self, items: (
            batches.append([it.pixel_values.shape for it in items]) or submit(self, items)
        ),
    )
    summary = depth_cmd.generate_depth(
        tmp_path / "images", tmp_path / "depth", jm, batch_size=3, progress=False
    )
    assert summary.written == len(SIZES) + 3
    counts = {}
    for h, w in SIZES + [(32, 32)] * 3:
        key = da.preprocessed_size(h, w, pre["size"], pre["multiple"], pre["keep_aspect_ratio"])
        counts[key] = counts.get(key, 0) + 1
    assert len(batches) == sum(-(-n // 3) for n in counts.values())  # one partial per shape
    assert all(len(set(b)) == 1 for b in batches)
    assert f"{len(shapes)} input shape(s), one compiled program each" in capsys.readouterr().err
    assert forward._cache_size() - before == len(shapes)


def test_jax_run_resumes_after_an_interruption(tiny_model_dir, tmp_path):
    rels = write_directory_dataset(tmp_path, n_extra=6)
    images, out = tmp_path / "images", tmp_path / "depth"
    jm = depth_cmd.load_jax_model(str(tiny_model_dir))
    done, stop = interrupt_after(3)
    with pytest.raises(KeyboardInterrupt):
        depth_cmd.generate_depth(images, out, jm, batch_size=2, progress=False, on_image_done=stop)
    on_disk = sorted(p for p in out.rglob("*") if p.is_file())
    assert set(done) <= set(on_disk) and len(on_disk) < len(rels)  # writers may be ahead
    assert all(p.name.endswith("_zoedepth.png") for p in on_disk)  # no temporaries left
    for path in on_disk:
        with Image.open(path) as png:
            png.load()  # whole files only
    summary = depth_cmd.generate_depth(images, out, jm, progress=False)
    assert (summary.written, summary.skipped) == (len(rels) - len(on_disk), len(on_disk))
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == sorted(
        depth_io.map_output_path(r) for r in rels
    )


def test_official_pth_converts_to_the_hf_folders_params(tiny_model_dir, tmp_path, capsys):
    """An official-layout .pth (renamed from the tiny model, torch.save'd) is read without
    torch into the same params as the HF folder (the real Small shape, with its default
    layers, is compared with transformers in tests/depth_anything_test.py)."""
    from safetensors.numpy import load_file

    from depthg_jax.models import convert_depth_anything as convert_da

    write_directory_dataset(tmp_path)
    official = official_state(load_file(str(tiny_model_dir / "model.safetensors")))
    pth = tmp_path / "depth_anything_v2_vitmu.pth"
    torch.save({k: torch.from_numpy(v) for k, v in official.items()}, pth)
    state = convert_da.read_state_dict(pth)
    spec = convert_da.infer_spec(state, layers=(1, 2))
    folder = depth_cmd.load_jax_model(str(tiny_model_dir))
    assert spec == folder.spec
    from_pth = convert_da.convert_state_dict(state, spec)
    assert jax.tree.structure(from_pth) == jax.tree.structure(folder.params)
    for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(folder.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # A .pth has no config: its layers follow the encoder's width, unknown for width 32.
    argv = [f"--images={tmp_path / 'images'}", f"--out={tmp_path / 'o'}", f"--model={pth}"]
    rc, err = run_main(argv, capsys)
    assert rc == 2 and "no default intermediate layers for encoder width 32" in err


def test_offline_hub_name_says_what_to_download_and_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
    write_directory_dataset(tmp_path)
    argv = [f"--images={tmp_path / 'images'}", f"--out={tmp_path / 'depth'}"]
    rc, err = run_main([*argv, "--backend=jax"], capsys)  # the default model
    assert rc == 2
    assert depth_cmd.DEFAULT_MODEL in err and "hub is unreachable" in err
    assert f"hf download {depth_cmd.DEFAULT_MODEL} --local-dir DIR" in err
    assert "--model=DIR" in err


def test_help_lists_every_flag_and_exits_0(capsys):
    assert depth_cmd.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("images", "out", "model", "backend", "batch_size", "format", "device", "dtype",
                 "nearest_is", "flip_tta", "progress", "distributed", "coordinator_address",
                 "num_processes", "process_id"):  # fmt: skip
        assert f"--{flag}" in out or f"--[no]{flag}" in out, flag


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_depth_process(argv, devices: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    cmd = [sys.executable, "-m", "depthg_jax.data.depth", "--noprogress", *map(str, argv)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_two_processes_write_disjoint_shares_that_equal_one_process(tiny_model_dir, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed on localhost, gloo) against 1 process x 2
    devices: each process writes only its share, together every map, equal to one process's."""
    rels = write_directory_dataset(tmp_path, n_extra=8)  # 13 images, 5 sizes
    images = tmp_path / "images"
    common = [f"--images={images}", f"--model={tiny_model_dir}", "--batch_size=2"]
    port = free_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [
        run_depth_process([*common, f"--out={tmp_path / 'two'}", *dist, f"--process_id={i}"], 2)
        for i in range(2)
    ]
    procs.append(run_depth_process([*common, f"--out={tmp_path / 'one'}"], 2))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
    written = []
    for i, out in enumerate(outs[:2]):
        assert f"(process {i} of 2: its share)" in out, out
        line = next(x for x in out.splitlines() if x.startswith("depth: written "))
        written.append(int(line.split()[2].rstrip(",")))
    share = [len(rels[i::2]) for i in range(2)]
    assert written == share and sum(written) == len(rels)  # each map written exactly once
    for path in (tmp_path / "two", tmp_path / "one"):
        assert sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file()) == sorted(
            depth_io.map_output_path(r) for r in rels
        )
    worst, same = png_stats(tmp_path / "two", tmp_path / "one", rels)
    assert worst <= 1 and same >= 0.999, (worst, same)
    # Run again: every process finds its share done and nothing is rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*")}
    port = free_port()
    dist = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [
        run_depth_process([*common, f"--out={tmp_path / 'two'}", *dist, f"--process_id={i}"], 2)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(outs)
    assert all("written 0, skipped" in out for out in outs), outs
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*")} == mtimes
