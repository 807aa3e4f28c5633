"""Datasets from miniature copies of their real on-disk layouts: mapping, depth, pairing, errors."""

import hashlib
import logging
import os

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from depthg_jax.data import assets, datasets


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".npy"):
        np.save(path, array)
    else:
        Image.fromarray(array).save(path)


def unique_image(i, h, w):
    """An image whose pixels identify it (channel 0 = i) and its position (channels 1, 2)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = i
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = np.arange(w)[None, :]
    return img


def unique_depth(i, h, w):
    return ((np.arange(h * w).reshape(h, w) + 7 * i) % 256).astype(np.uint8)


def class_names(name):
    return assets.dataset_info(name)["classes"]


# --- directory -------------------------------------------------------------------------------


def make_directory(root, ids, h=32, w=48, labels=None, split="train"):
    for n, i in enumerate(ids):
        save(f"{root}/images/{split}/{i}.png", unique_image(n, h, w))
        save(f"{root}/depth/{split}/{i}_zoedepth.png", unique_depth(n, h, w))
        if labels is not None:
            save(f"{root}/labels/{split}/{i}.png", labels[n])


def test_directory_pairs_image_depth_label_by_id_including_subfolders(tmp_path):
    root = str(tmp_path)
    labels = [np.full((32, 48), n, np.uint8) for n in range(3)]
    make_directory(root, ["b", "a", "sub/c"], labels=labels)
    src = datasets.make_source("directory", root, "train", n_classes=5)
    assert src.ids == ["a", "b", "sub/c"]  # Sorted by id.
    written_order = {"b": 0, "a": 1, "sub/c": 2}
    for k, image_id in enumerate(src.ids):
        ex = src[k]
        n = written_order[image_id]
        assert ex["id"] == image_id
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 48, 3)
        np.testing.assert_array_equal(ex["image"], unique_image(n, 32, 48))
        assert ex["depth"].dtype == np.float32
        np.testing.assert_array_equal(ex["depth"], unique_depth(n, 32, 48).astype(np.float32))
        assert ex["label"].dtype == np.int32
        np.testing.assert_array_equal(ex["label"], np.full((32, 48), n))


def test_directory_without_labels_gives_all_ignore(tmp_path):
    make_directory(str(tmp_path), ["x"])
    ex = datasets.make_source("directory", str(tmp_path), "train", 5)[0]
    assert (ex["label"] == -1).all() and ex["label"].shape == (32, 48)


def test_out_of_range_labels_are_ignored_counted_and_reported(tmp_path, caplog):
    lab = np.zeros((32, 48), np.uint8)
    lab[0, :5] = 9  # >= n_classes
    lab[1, :3] = 255  # ignore, not an error
    lab[2, :2] = 4
    make_directory(str(tmp_path), ["x"], labels=[lab])
    src = datasets.make_source("directory", str(tmp_path), "train", n_classes=4)
    with caplog.at_level(logging.WARNING):
        label = src[0]["label"]
    assert (label[0, :5] == -1).all() and (label[1, :3] == -1).all() and (label[2, :2] == -1).all()
    assert (label[3:] == 0).all()
    assert "7 label pixels" in caplog.text and "outside the 4 classes" in caplog.text
    mapped, n_bad = datasets.map_labels(lab, datasets.identity_lut(4), 4)
    assert n_bad == 7 and (mapped == label).all()


def test_depth_formats_are_normalised_to_0_255(tmp_path):
    root = str(tmp_path)
    make_directory(root, ["a", "b", "c"], h=8, w=8)
    os.remove(f"{root}/depth/train/b_zoedepth.png")
    os.remove(f"{root}/depth/train/c_zoedepth.png")
    d16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    save(f"{root}/depth/train/b_zoedepth_16.png", d16)
    metric = np.linspace(2.0, 10.0, 64).reshape(8, 8)
    save(f"{root}/depth/train/c_depth.npy", metric)
    src = datasets.make_source("directory", root, "train", 3)
    np.testing.assert_allclose(src[1]["depth"], d16 * 255.0 / 65535.0, rtol=1e-6)
    np.testing.assert_allclose(src[2]["depth"], (metric - 2.0) / 8.0 * 255.0, rtol=1e-5, atol=1e-4)
    assert src[2]["depth"].min() == 0.0 and src[2]["depth"].max() == pytest.approx(255.0)


def test_missing_depth_names_the_image_and_expected_paths(tmp_path):
    root = str(tmp_path)
    make_directory(root, ["a"])
    os.remove(f"{root}/depth/train/a_zoedepth.png")
    with pytest.raises(FileNotFoundError, match="'a'.*a_zoedepth.png.*a_zoedepth_16.png"):
        datasets.make_source("directory", root, "train", 3)[0]


def test_depth_of_another_size_names_both_sizes(tmp_path):
    root = str(tmp_path)
    make_directory(root, ["a"])
    save(f"{root}/depth/train/a_zoedepth.png", np.zeros((16, 24), np.uint8))
    with pytest.raises(ValueError, match="16x24.*32x48"):
        datasets.make_source("directory", root, "train", 3)[0]


def test_corrupt_image_names_the_file(tmp_path):
    root = str(tmp_path)
    make_directory(root, ["a"])
    with open(f"{root}/images/train/a.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="Cannot read image .*a.png"):
        datasets.make_source("directory", root, "train", 3)[0]


def test_empty_split_is_an_error(tmp_path):
    os.makedirs(tmp_path / "images" / "train")
    with pytest.raises(ValueError, match="Empty split"):
        datasets.make_source("directory", str(tmp_path), "train", 3)
    with pytest.raises(FileNotFoundError, match="images/val"):
        datasets.make_source("directory", str(tmp_path), "val", 3)


# --- COCO-Stuff ------------------------------------------------------------------------------


def test_cocostuff_uses_curated_list_and_maps_fine_to_coarse(tmp_path, caplog):
    root = str(tmp_path)
    ids = ["000000000009", "000000000025", "000000000030"]
    # Fine ids (stuffthingmaps, 0-based COCO category id - 1): 0 person, 2 car, 15 bird,
    # 123 grass, 156 sky-other; 255 unlabelled; 200 is not a COCO-Stuff id.
    fine = np.array([[0, 2, 15, 123], [156, 255, 200, 0]], np.uint8).repeat(8, 0).repeat(8, 1)
    for n, i in enumerate(ids):
        save(f"{root}/images/train2017/{i}.jpg", unique_image(n, 16, 32))
        save(f"{root}/annotations/train2017/{i}.png", fine)
        save(f"{root}/depth/train2017/{i}_zoedepth.png", unique_depth(n, 16, 32))
    os.makedirs(f"{root}/curated/train2017")
    with open(f"{root}/curated/train2017/{datasets.COCO_CURATED_LISTS['train2017']}", "w") as f:
        f.write(f"{ids[2]}\n{ids[0]}\n")  # The list decides membership and order.
    src = datasets.make_source("cocostuff27", root, "train", 27)
    assert src.ids == [ids[2], ids[0]]
    names = class_names("cocostuff27")
    with caplog.at_level(logging.WARNING):
        ex = src[0]
    np.testing.assert_array_equal(ex["depth"], unique_depth(2, 16, 32))
    assert np.abs(ex["image"].astype(int)[..., 1:] - unique_image(2, 16, 32)[..., 1:]).max() < 12
    got = ex["label"][::8, ::8]
    expect = [["person", "vehicle", "animal", "plant"], ["sky", None, None, "person"]]
    for r in range(2):
        for c in range(4):
            want = expect[r][c]
            assert (got[r, c] == -1) if want is None else names[got[r, c]] == want
    assert "64 label pixels" in caplog.text  # The block of 200s (8x8) is counted.
    # Two ids are not the published split: said, with both counts.
    assert "has 2 ids, the published split has 97702" in caplog.text


def make_coco_layout(root, split_dir, ids):
    """Empty stand-ins for every listed image (only the listing is under test)."""
    os.makedirs(f"{root}/images/{split_dir}", exist_ok=True)
    for i in ids:
        open(f"{root}/images/{split_dir}/{i}.jpg", "wb").close()


def test_the_shipped_curated_lists_are_iic_s_byte_for_byte():
    want = {
        ("train2017", "Coco164kFull_Stuff_Coarse.txt"): (
            97702,
            "277a78bf32835ab0c3f5f009bb93cda0d71300527fc6a2e738e9b20fe756acda",
        ),
        ("train2017", "Coco164kFull_Stuff_Coarse_7.txt"): (
            49629,
            "3b837594a81880a70f177afab906fc45147d8b9c2c4f51132f784e41941812f9",
        ),
        ("val2017", "Coco164kFull_Stuff_Coarse_7.txt"): (
            2175,
            "7c629734c88f1a74bba6311e01d4d9fe976df84f07cb4fc86452ce5116e51655",
        ),
        ("val2017", "Coco164kFull_Stuff_Coarse.txt"): (
            4172,
            "5d8ff03b25dfa5c3c8ae66a4a40894eedb51347c48692cd91ec37f7d5958d2be",
        ),
    }
    for (split, name), (count, digest) in want.items():
        data = assets.asset("cocostuff27", "curated", split, name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
        assert len(assets.read_lines("cocostuff27", "curated", split, name)) == count


def test_coco_trains_on_the_coarse_list_and_evaluates_on_coarse_7(tmp_path):
    root = str(tmp_path)
    train_ids = assets.read_lines(
        "cocostuff27", "curated", "train2017", "Coco164kFull_Stuff_Coarse.txt"
    )
    val_ids = assets.read_lines(
        "cocostuff27", "curated", "val2017", "Coco164kFull_Stuff_Coarse_7.txt"
    )
    make_coco_layout(root, "train2017", train_ids)
    make_coco_layout(root, "val2017", val_ids)
    train = datasets.list_coco_records(root, "train")
    val = datasets.list_coco_records(root, "val")
    assert (len(train), len(val)) == (97702, 2175)
    assert [r.id for r in train] == train_ids and [r.id for r in val] == val_ids
    assert 5 * len(train) == 488510  # five-crops of the training split


def test_a_curated_image_missing_on_disk_names_the_list_and_the_image(tmp_path):
    val_ids = assets.read_lines(
        "cocostuff27", "curated", "val2017", "Coco164kFull_Stuff_Coarse_7.txt"
    )
    make_coco_layout(str(tmp_path), "val2017", val_ids[1:])
    with pytest.raises(FileNotFoundError) as e:
        datasets.make_source("cocostuff27", str(tmp_path), "val", 27)
    assert "Coco164kFull_Stuff_Coarse_7.txt" in str(e.value)
    assert f"{val_ids[0]}.jpg" in str(e.value)


# --- Cityscapes ------------------------------------------------------------------------------


def test_cityscapes_maps_label_ids_and_pairs_city_folders(tmp_path):
    root = str(tmp_path)
    names = ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]
    ids_raw = np.array([[7, 26, 24, 33], [0, 6, 8, 255]], np.uint8).repeat(4, 0).repeat(4, 1)
    for n, name in enumerate(names):
        save(f"{root}/leftImg8bit/train/{name}_leftImg8bit.png", unique_image(n, 8, 16))
        save(f"{root}/gtFine/train/{name}_gtFine_labelIds.png", ids_raw)
        save(f"{root}/depth/train/{name}_leftImg8bit_zoedepth.png", unique_depth(n, 8, 16))
    src = datasets.make_source("cityscapes27", root, "train", 27)
    assert src.ids == names
    cls = class_names("cityscapes27")
    for n in range(2):
        ex = src[n]
        np.testing.assert_array_equal(ex["image"], unique_image(n, 8, 16))
        np.testing.assert_array_equal(ex["depth"], unique_depth(n, 8, 16))
        got = ex["label"][::4, ::4]
        assert [cls[v] for v in got[0]] == ["road", "car", "person", "bicycle"]
        assert got[1, 0] == -1 and got[1, 1] == -1 and got[1, 3] == -1
        assert cls[got[1, 2]] == "sidewalk"


# --- Potsdam ---------------------------------------------------------------------------------


def test_potsdam_reads_mat_files_split_lists_and_coarse_mapping(tmp_path):
    root = str(tmp_path)
    gt = np.array([[0, 4, 1, 5], [2, 3, 255, 0]], np.uint8).repeat(4, 0).repeat(4, 1)
    for n, i in enumerate(["1_2", "3_4", "5_6"]):
        img = np.concatenate([unique_image(n, 8, 16), np.full((8, 16, 1), 99, np.uint8)], -1)
        savemat(f"{root}/imgs_{i}.mat", {"img": img})
        os.makedirs(f"{root}/imgs", exist_ok=True)
        os.replace(f"{root}/imgs_{i}.mat", f"{root}/imgs/{i}.mat")
        if i != "5_6":  # 5_6 is unlabelled.
            os.makedirs(f"{root}/gt", exist_ok=True)
            savemat(f"{root}/gt/{i}.mat", {"gt": gt})
        save(f"{root}/depth/{i}_zoedepth.png", unique_depth(n, 8, 16))
    for fn, lines in [
        ("labelled_train.txt", "3_4\n1_2\n"),
        ("labelled_test.txt", "1_2\n"),
        ("unlabelled_train.txt", "5_6\n"),
    ]:
        with open(f"{root}/{fn}", "w") as f:
            f.write(lines)
    train = datasets.make_source("potsdam3", root, "train", 3)
    assert train.ids == ["3_4", "1_2"]
    ex = train[0]
    np.testing.assert_array_equal(ex["image"], unique_image(1, 8, 16))  # IR band dropped.
    np.testing.assert_array_equal(ex["depth"], unique_depth(1, 8, 16))
    cls = class_names("potsdam3")
    got = ex["label"][::4, ::4]
    roads, buildings, trees = "roads and cars", "buildings and clutter", "trees and vegetation"
    assert [cls[v] for v in got[0]] == [roads, roads, buildings, buildings]
    assert [cls[v] for v in got[1, [0, 1, 3]]] == [trees, trees, roads] and got[1, 2] == -1
    assert datasets.make_source("potsdam3", root, "val", 3).ids == ["1_2"]
    unl = datasets.make_source("potsdam3", root, "unlabelled_train", 3)[0]
    assert (unl["label"] == -1).all()


def test_potsdam_float_images_scale_like_to_pil_image():
    # torchvision's to_pil_image on a float tensor does pic.mul(255).byte(): scale, truncate.
    import torch

    from depthg_jax.data.images import potsdam_to_uint8

    img = np.random.default_rng(0).uniform(0, 1, (5, 7, 3)).astype(np.float32)
    expected = torch.from_numpy(img).mul(255).byte().numpy()
    np.testing.assert_array_equal(potsdam_to_uint8(img), expected)
    as_uint8 = (img * 200).astype(np.uint8)
    np.testing.assert_array_equal(potsdam_to_uint8(as_uint8), as_uint8)


def test_potsdam_reference_depth_is_the_release_s_0_1_cast(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/imgs")
    savemat(f"{root}/imgs/t0.mat", {"img": np.zeros((8, 8, 4), np.uint8)})
    with open(f"{root}/labelled_train.txt", "w") as f:
        f.write("t0\n")
    depth = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    depth[0, :3] = 255
    save(f"{root}/depth/t0_zoedepth.png", depth)
    plain = datasets.make_source("potsdam3", root, "train", 3)[0]["depth"]
    cast = datasets.make_source("potsdam3", root, "train", 3, release_depth_cast=True)[0]["depth"]
    np.testing.assert_array_equal(plain, depth.astype(np.float32))
    assert set(np.unique(cast)) == {0.0, 1.0}
    np.testing.assert_array_equal(cast, (depth == 255).astype(np.float32))


def test_fps_on_the_release_s_potsdam_depth_takes_the_all_ties_raster_start():
    """Depth 0 lifts every point to the origin (X, Y scale with depth): an all-equal cloud,
    on which FPS (first index on ties) takes the lowest raster indices."""
    import jax.numpy as jnp

    from depthg_jax.method import sampling

    zeros = jnp.zeros((1, 32, 32), jnp.float32)
    got = sampling.depth_fps_coords(zeros, feature_hw=(4, 4), num_side=2, mode="reference")
    # Indices 0..3 of the 4x4 grid (first row), as (row/H, col/W)*2-1 used as (x, y).
    rows, cols = np.divmod(np.arange(4), 4)
    want = np.stack([rows / 4, cols / 4], -1).reshape(2, 2, 2) * 2 - 1
    np.testing.assert_allclose(np.asarray(got)[0], want, atol=1e-6)
