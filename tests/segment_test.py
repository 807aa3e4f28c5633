"""The segment tool on a tiny export: real PNGs of the right sizes, and clear bad-input errors."""

import json

import jax
import numpy as np
import pytest
from cli import run_in_process
from PIL import Image

from depthg_jax import segment
from depthg_jax.data import palette
from depthg_jax.models import model as model_lib

N_CLASSES = 6


def make_export(path, params=None):
    from configs import demo
    from depthg_jax.runtime import checkpoint

    config = demo.get_config()
    assert config.data.n_classes == N_CLASSES and config.model.variant == "mu/8"
    if params is None:
        params = model_lib.init_params(
            model_lib.ModelSpec("mu/8", config.model.dim, N_CLASSES), jax.random.key(0)
        )
    checkpoint.save_export(str(path), config, params)
    return str(path)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("seg") / "export")


@pytest.fixture()
def images_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 20, 3), dtype=np.uint8)).save(root / "sub/b.png")
    Image.fromarray(rng.integers(0, 256, (25, 31, 4), dtype=np.uint8)).save(root / "c.PNG")
    Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8)).save(root / "sub/d.jpeg")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored")
    return root


EXPECTED = {"a": (56, 40), "sub/b": (20, 33), "c": (31, 25), "sub/d": (48, 64)}  # (W, H)


def run(args):
    return run_in_process(segment.define_flags, segment.run, args)


def test_segment_writes_real_pngs_of_the_input_size(export_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(
        ["--checkpoint", export_dir, "--images", images_dir, "--out", out, "--res", 32]
        + ["--batch_size", 3]
    )
    err = capsys.readouterr().err
    assert code == 1 and "broken.jpg" in err  # the unreadable image is named, others done
    colours = palette.palette_for("synthetic", N_CLASSES)  # the synthetic set's own colours
    np.testing.assert_array_equal(colours, palette.dataset_colours("synthetic")[:N_CLASSES])
    for name, (w, h) in EXPECTED.items():
        with Image.open(out / "labels" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == (w, h) and im.mode == "L"
            labels = np.asarray(im)
        assert labels.max() < N_CLASSES
        with Image.open(out / "color" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == (w, h) and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), palette.colorize(labels, colours))
        with Image.open(out / "overlay" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == (2 * w, h) and im.mode == "RGB"
    assert not (out / "labels" / "broken.png").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]


def test_segment_labels_follow_the_model_prediction(export_dir, images_dir, tmp_path):
    # An image already at the model size: the label PNG is the flip-averaged argmax itself.
    config_params = make_params_like_export(export_dir)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(image).save(folder / "x.png")
    assert (
        run(
            ["--checkpoint", export_dir, "--images", folder, "--out", tmp_path / "o"]
            + ["--res", 32, "--batch_size", 3, "--probe", "linear"]
        )
        == 0
    )
    out = model_lib.predict(
        config_params, np.stack([image] * 3), model_lib.ModelSpec("mu/8", 32, N_CLASSES), True
    )
    want = np.asarray(out["linear_logits"][0]).argmax(-1)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o/labels/x.png")), want)


def make_params_like_export(export_dir):
    from depthg_jax.runtime import checkpoint

    return checkpoint.load_export(export_dir)[1]


def test_assignment_recolours_clusters(export_dir, images_dir, tmp_path):
    perm = [5, 4, 3, 2, 1, 0]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"cluster": {"assignment": perm}}))
    base = ["--checkpoint", export_dir, "--images", images_dir, "--res", 32, "--batch_size", 3]
    run(base + ["--out", tmp_path / "raw"])
    run(base + ["--out", tmp_path / "mapped", "--assignment", results])
    raw = np.asarray(Image.open(tmp_path / "raw/labels/a.png"))
    mapped = np.asarray(Image.open(tmp_path / "mapped/labels/a.png"))
    np.testing.assert_array_equal(mapped, np.asarray(perm)[raw])


def test_bad_inputs_give_clear_messages(export_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["--checkpoint", export_dir, "--images", empty, "--out", tmp_path / "o"]) == 2
    assert "images or videos (.jpg/" in capsys.readouterr().err

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "z.png")
    params = make_params_like_export(export_dir)  # probes for 27 classes, config says 6
    params["cluster_probe"] = {"clusters": np.zeros((27, 32), np.float32)}
    params["linear_probe"]["linear"] = {"kernel": np.zeros((32, 27)), "bias": np.zeros(27)}
    mismatched = make_export(tmp_path / "bad_export", params)
    assert run(["--checkpoint", mismatched, "--images", folder, "--out", tmp_path / "o"]) == 2
    assert "cluster probe classes 27 (expected 6)" in capsys.readouterr().err

    assert run(["--checkpoint", tmp_path / "nope", "--images", folder, "--out", tmp_path]) == 2
    assert "not a depthg-jax export" in capsys.readouterr().err

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"cluster": {"assignment": list(range(27))}}))
    args = ["--checkpoint", export_dir, "--images", folder, "--out", tmp_path / "o"]
    assert run(args + ["--assignment", wrong]) == 2
    assert "maps 27 clusters, but the checkpoint has 6 classes" in capsys.readouterr().err

    assert run(args + ["--res", 30]) == 2
    assert "multiple of the patch size 8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- Videos, files and globs -------------------------------------------------------------------


def write_video(path, frames, rate=10, rotation=None):
    """An H.264 MP4 written with PyAV, the library segment reads and writes videos with."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def noisy_clip(n=12, seed=0):
    """A still scene with fresh noise on every frame: per-frame labels flicker."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(0, 256, (6, 8, 3)).repeat(8, 0).repeat(8, 1)
    return [
        np.clip(scene + rng.normal(0, 40, scene.shape), 0, 255).astype(np.uint8) for _ in range(n)
    ]


def read_video(path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate


def label_changes(folder):
    masks = [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]
    return sum(int((a != b).sum()) for a, b in zip(masks, masks[1:], strict=False)), len(masks)


def test_a_video_gives_an_overlay_video_and_masks_at_its_rate_and_smoothing_steadies_them(
    export_dir, tmp_path
):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "walk.mp4", noisy_clip(), rate=10)
    base = ["--checkpoint", export_dir, "--images", clips, "--res", 32, "--batch_size", 5]
    assert run(base + ["--out", tmp_path / "raw"]) == 0
    frames, rate = read_video(tmp_path / "raw/walk/overlay.mp4")
    assert len(frames) == 12 and rate == 10 and frames[0].shape == (48, 64, 3)
    changes_raw, masks = label_changes(tmp_path / "raw/walk/labels")
    assert masks == 12 and Image.open(tmp_path / "raw/walk/labels/000011.png").size == (64, 48)
    assert run(base + ["--out", tmp_path / "smooth", "--smooth", 0.8]) == 0
    changes_smooth, _ = label_changes(tmp_path / "smooth/walk/labels")
    assert changes_raw > 0 and changes_smooth < changes_raw, (changes_smooth, changes_raw)


def test_a_rotated_video_is_segmented_as_players_show_it(export_dir, tmp_path):
    frames = noisy_clip(3)  # stored 48 x 64 (H x W), shown turned a quarter counter-clockwise
    path = write_video(tmp_path / "phone.mp4", frames, rate=5, rotation=90)
    assert run(["--checkpoint", export_dir, "--images", path, "--out", tmp_path / "o"]
               + ["--res", 32]) == 0  # fmt: skip
    assert Image.open(tmp_path / "o/phone/labels/000000.png").size == (48, 64)  # (W, H) shown
    shown, _ = read_video(tmp_path / "o/phone/overlay.mp4")
    assert shown[0].shape == (64, 48, 3)


def test_a_video_that_cannot_be_decoded_is_named_before_any_work(export_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    (folder / "clip.webm").write_bytes(b"\x1a\x45\xdf\xa3" + b"not a video" * 50)
    out = tmp_path / "o"
    assert run(["--checkpoint", export_dir, "--images", folder, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "clip.webm" in err and err.startswith("error: Cannot")
    assert not out.exists()  # nothing was segmented


def test_a_single_file_and_a_glob_and_names_in_the_legend(export_dir, images_dir, tmp_path):
    base = ["--checkpoint", export_dir, "--res", 32]
    assert run(base + ["--images", images_dir / "a.jpg", "--out", tmp_path / "one"]) == 0
    assert [p.name for p in (tmp_path / "one/labels").iterdir()] == ["a.png"]
    pattern = str(images_dir / "**" / "*.png")  # not c.PNG: globs are case-sensitive
    assert run(base + ["--images", pattern, "--out", tmp_path / "glob"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "glob/labels")) for p in
                     (tmp_path / "glob/labels").rglob("*.png"))  # fmt: skip
    assert written == ["sub/b.png"]  # relative to the glob's folder
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing {i}" for i in range(N_CLASSES)) + "\n")
    out = tmp_path / "named"
    assert run(base + ["--images", images_dir / "a.jpg", "--out", out, "--names", names]) == 0
    overlay = Image.open(out / "overlay/a.png")
    assert overlay.size[0] == 2 * 56 and overlay.size[1] > 40  # the legend below the picture
    names.write_text("one\ntwo\n")
    assert run(base + ["--images", images_dir / "a.jpg", "--out", out, "--names", names]) == 2
