"""Five-crop command: crop geometry, aligned labels/depth, resume and idempotence."""

import os

import numpy as np
import pytest
from cli import run_cli
from PIL import Image

from depthg_jax.data import datasets, five_crop


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_cityscapes(root, h=10, w=14):
    """Two Cityscapes images whose pixel values encode (row, col)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for n, name in enumerate(["aachen/aachen_0_1", "bonn/bonn_0_2"]):
        img = np.stack([rows * 10 + n, cols * 10, np.full_like(rows, 7)], -1).astype(np.uint8)
        save(f"{root}/leftImg8bit/train/{name}_leftImg8bit.png", img)
        save(
            f"{root}/gtFine/train/{name}_gtFine_labelIds.png",
            (7 + (rows + cols) % 27).astype(np.uint8),
        )
        save(
            f"{root}/depth/train/{name}_leftImg8bit_zoedepth.png",
            (rows * w + cols).astype(np.uint8),
        )


def test_boxes_are_four_corners_and_the_centre_of_half_size():
    assert five_crop.five_crop_boxes(10, 15) == [
        (0, 0, 5, 7),
        (0, 8, 5, 7),
        (5, 0, 5, 7),
        (5, 8, 5, 7),
        (2, 4, 5, 7),  # round(2.5) = 2 (banker's rounding as torchvision), round(4.0) = 4.
    ]


@pytest.mark.slow
def test_crops_keep_image_label_and_depth_aligned(tmp_path):
    src_root, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_cityscapes(src_root)
    run_cli(
        "depthg_jax.data.five_crop",
        ["--dataset=cityscapes27", f"--root={src_root}", f"--out={out}", "--image_format=png"],
        check=True,
    )
    src = datasets.make_source("cityscapes27", src_root, "train", 27)
    crops = datasets.make_source("directory", out, "train", 27)
    assert len(crops) == 10
    by_id = {crop_id: k for k, crop_id in enumerate(crops.ids)}
    for n in range(2):
        ex = src[n]
        for k, (t, l, h, w) in enumerate(five_crop.five_crop_boxes(10, 14)):
            c = crops[by_id[f"{src.ids[n]}_{k}"]]
            win = (slice(t, t + h), slice(l, l + w))
            np.testing.assert_array_equal(c["image"], ex["image"][win])
            np.testing.assert_array_equal(c["depth"], ex["depth"][win])  # Not re-normalised.
            np.testing.assert_array_equal(c["label"], ex["label"][win])


@pytest.mark.slow
def test_rerun_is_a_no_op_and_an_interrupted_run_resumes(tmp_path):
    src_root, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_cityscapes(src_root)
    args = ["--dataset=cityscapes27", f"--root={src_root}", f"--out={out}"]
    cli = lambda: run_cli("depthg_jax.data.five_crop", args, check=True).stdout  # noqa: E731
    assert "Cropped 2 of 2" in cli()
    victim = f"{out}/images/train/bonn/bonn_0_2_3.jpg"
    stamp = os.stat(f"{out}/images/train/aachen/aachen_0_1_0.jpg").st_mtime_ns
    os.remove(victim)  # As if killed before the last crop of the second image.
    assert "Cropped 1 of 2" in cli() and os.path.exists(victim)
    assert os.stat(f"{out}/images/train/aachen/aachen_0_1_0.jpg").st_mtime_ns == stamp
    assert "Cropped 0 of 2" in cli()


def test_fractional_depth_is_kept_at_16_bits(tmp_path):
    depth = np.array([[0.0, 127.5], [255.0, 3.25]], np.float32)
    arr, is16 = five_crop.encode_depth_crop(depth)
    assert is16 and arr.dtype == np.uint16
    np.testing.assert_allclose(arr * 255.0 / 65535.0, depth, atol=255.0 / 65535.0)
    arr8, is16 = five_crop.encode_depth_crop(np.array([[0.0, 255.0]], np.float32))
    assert not is16 and arr8.dtype == np.uint8


def test_jpeg_crops_are_written_at_the_release_s_quality_75(tmp_path):
    import io

    root = str(tmp_path / "src")
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)
    os.makedirs(f"{root}/images/train")
    os.makedirs(f"{root}/depth/train")
    Image.fromarray(image).save(f"{root}/images/train/a.png")
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(f"{root}/depth/train/a_zoedepth.png")
    source = datasets.make_source("directory", root, "train", 3)
    five_crop.write_five_crops(source, str(tmp_path / "out"), "train")
    buf = io.BytesIO()
    Image.fromarray(image[:16, :24]).save(buf, format="JPEG", quality=75)
    with open(tmp_path / "out" / "images" / "train" / "a_0.jpg", "rb") as f:
        assert f.read() == buf.getvalue()
