"""TFDS builders on miniature copies of each real layout: prepared end to end, read back
bit-exactly against the loose-file path (labels, five-crop geometry), and bad input."""

import os

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from depthg_jax.data import assets, datasets, five_crop, prepare, records

H, W = 21, 30  # Odd height: the five-crop centre is rounded.


def save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def noise(rng, shape, hi=256):
    return rng.integers(0, hi, shape, dtype=np.uint8)


def make_coco(root, rng):
    lists = {
        "train2017": ["000000000285", "000000000009", "000000000139"],
        "val2017": ["000000000724", "000000000632"],
    }
    for split, ids in lists.items():
        os.makedirs(f"{root}/curated/{split}", exist_ok=True)
        with open(f"{root}/curated/{split}/{datasets.COCO_CURATED_LISTS[split]}", "w") as f:
            f.write("\n".join(ids) + "\n")
        for n, i in enumerate(ids):
            image = noise(rng, (H, W, 3))
            if n == 1:  # A grayscale JPEG, as COCO has: read as RGB by both paths.
                save(f"{root}/images/{split}/{i}.jpg", image[..., 0], quality=90)
            else:
                save(f"{root}/images/{split}/{i}.jpg", image, quality=90)
            fine = rng.integers(0, 182, (H, W)).astype(np.uint8)
            fine[:3] = 255
            save(f"{root}/annotations/{split}/{i}.png", fine)
            save(f"{root}/depth/{split}/{i}_zoedepth.png", noise(rng, (H, W)))
    return "train", "val", 27


def make_cityscapes(root, rng):
    for split, cities in {"train": ["aachen", "bochum"], "val": ["frankfurt"]}.items():
        for city in cities:
            for k in range(2):
                name = f"{city}_{k:06d}_000019"
                save(
                    f"{root}/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png",
                    noise(rng, (H, W, 3)),
                )
                save(
                    f"{root}/gtFine/{split}/{city}/{name}_gtFine_labelIds.png",
                    rng.integers(0, 34, (H, W)).astype(np.uint8),
                )
                save(
                    f"{root}/depth/{split}/{city}/{name}_leftImg8bit_zoedepth.png",
                    noise(rng, (H, W)),
                )
    return "train", "val", 27


def make_potsdam(root, rng):
    lists = {"labelled_train.txt": ["2_10_0", "3_11_4"], "labelled_test.txt": ["1_2_0"]}
    os.makedirs(root, exist_ok=True)
    for fn, ids in lists.items():
        with open(f"{root}/{fn}", "w") as f:
            f.write("\n".join(ids) + "\n")
        for i in ids:
            os.makedirs(f"{root}/imgs", exist_ok=True)
            os.makedirs(f"{root}/gt", exist_ok=True)
            savemat(f"{root}/imgs/{i}.mat", {"img": rng.uniform(0, 1, (H, W, 4))})
            gt = rng.integers(0, 6, (H, W)).astype(np.uint8)
            gt[0] = 255
            savemat(f"{root}/gt/{i}.mat", {"gt": gt})
            save(f"{root}/depth/{i}_zoedepth.png", noise(rng, (H, W)))
    return "train", "val", 3


def make_directory(root, rng):
    for split, ids in {"train": ["b", "a", "sub/c", "a10"], "val": ["v1", "v0"]}.items():
        for i in ids:
            ext = ".jpg" if i == "b" else ".png"
            save(f"{root}/images/{split}/{i}{ext}", noise(rng, (H, W, 3)))
            save(f"{root}/labels/{split}/{i}.png", noise(rng, (H, W), 5))
            save(f"{root}/depth/{split}/{i}_zoedepth.png", noise(rng, (H, W)))
    return "train", "val", 4


LAYOUTS = {
    "cocostuff27": make_coco,
    "cityscapes27": make_cityscapes,
    "potsdam3": make_potsdam,
    "directory": make_directory,
}


def assert_same_examples(got, want):
    assert got.ids == want.ids and len(got) == len(want)
    for i in range(len(want)):
        a, b = got[i], want[i]
        assert a["id"] == b["id"]
        for key in ("image", "depth", "label"):
            assert a[key].dtype == b[key].dtype, (key, a[key].dtype, b[key].dtype)
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} of {a['id']}")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_prepared_records_equal_the_loose_files(tmp_path, name):
    root, data_dir = str(tmp_path / "download"), str(tmp_path / "records")
    train, val, n = LAYOUTS[name](root, np.random.default_rng(0))
    dirs = prepare.prepare(name, root, data_dir)
    assert dirs == [f"{data_dir}/{name}/{c}/1.0.0" for c in ("train", "eval")]

    # eval = the original images, in the loose order, bit-exact.
    loose_val = datasets.make_source(name, root, val, n)
    rec_val = records.make_source(name, data_dir, val, n, role="eval")
    assert_same_examples(rec_val, loose_val)
    assert (rec_val[0]["label"] == -1).any()

    # train = the five-crops as five_crop.py writes them (Potsdam: uncropped).
    loose_train = datasets.make_source(name, root, train, n)
    rec_train = records.make_source(name, data_dir, train, n, role="train")
    if name == "potsdam3":
        assert_same_examples(rec_train, loose_train)
    else:
        out = str(tmp_path / "five_crops")
        five_crop.write_five_crops(loose_train, out, train)
        assert_same_examples(rec_train, datasets.make_source("directory", out, train, n))
        # Geometry against the original: depth and label are stored losslessly.
        crops = {rec_train.ids[i]: rec_train[i] for i in range(len(rec_train))}
        for j in range(len(loose_train)):
            ex = loose_train[j]
            boxes = five_crop.five_crop_boxes(H, W)
            assert boxes[4][:2] == (round((H - H // 2) / 2), round((W - W // 2) / 2))
            for k, (t, left, ch, cw) in enumerate(boxes):
                crop = crops[f"{ex['id']}_{k}"]
                assert crop["image"].shape == (ch, cw, 3) == (H // 2, W // 2, 3)
                window = (slice(t, t + ch), slice(left, left + cw))
                np.testing.assert_array_equal(crop["depth"], ex["depth"][window])
                np.testing.assert_array_equal(crop["label"], ex["label"][window])

    info = records.open_builder(name, data_dir, "eval").info
    if name != "directory":
        assert info.metadata["class_names"] == assets.dataset_info(name)["classes"]
    assert info.splits[val].num_examples == len(loose_val)
    assert info.metadata["depth_model"] == "zoedepth"


def test_coco_labels_are_the_coarse_classes(tmp_path):
    root, data_dir = str(tmp_path / "download"), str(tmp_path / "records")
    make_coco(root, np.random.default_rng(1))
    prepare.prepare("cocostuff27", root, data_dir, configs=["eval"])
    src = records.make_source("cocostuff27", data_dir, "val", 27, role="eval")
    fine = np.asarray(Image.open(f"{root}/annotations/val2017/{src.ids[0]}.png"))
    coarse = np.asarray(assets.dataset_info("cocostuff27")["fine_to_coarse"])
    want = np.where(fine == 255, -1, coarse[np.minimum(fine, 181)])
    np.testing.assert_array_equal(src[0]["label"], want)


def test_missing_download_says_what_goes_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"images/train2017/<image id>\.jpg") as e:
        prepare.prepare("cocostuff27", str(tmp_path / "nothing"), str(tmp_path / "records"))
    assert "Coco164kFull_Stuff_Coarse_7.txt" in str(e.value)
    partial = tmp_path / "partial"
    (partial / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"gtFine/train .*gtFine_labelIds\.png"):
        prepare.prepare("cityscapes27", str(partial), str(tmp_path / "records"))
    assert not (tmp_path / "records").exists() or not list((tmp_path / "records").rglob("*.json"))


def test_corrupt_image_stops_without_a_finished_version_then_resumes(tmp_path, capsys):
    root, data_dir = str(tmp_path / "download"), str(tmp_path / "records")
    make_directory(root, np.random.default_rng(2))
    bad = f"{root}/images/val/v1.png"
    good = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(good[:40])  # A truncated PNG.
    with pytest.raises(ValueError, match=f"Cannot read image {bad}"):
        prepare.prepare("directory", root, data_dir)
    # train was finished before eval failed; eval left nothing that looks complete.
    assert records.make_source("directory", data_dir, "train", 4)
    assert not list((tmp_path / "records" / "directory" / "eval").rglob("dataset_info.json"))
    with pytest.raises(FileNotFoundError, match="No prepared directory/eval version 1.0.0"):
        records.make_source("directory", data_dir, "val", 4, role="eval")
    with open(bad, "wb") as f:
        f.write(good)
    train_info = tmp_path / "records/directory/train/1.0.0/dataset_info.json"
    before = train_info.stat().st_mtime_ns
    capsys.readouterr()
    prepare.prepare("directory", root, data_dir)
    assert "train/1.0.0: already prepared" in capsys.readouterr().out
    assert train_info.stat().st_mtime_ns == before  # Not overwritten.
    assert len(records.make_source("directory", data_dir, "val", 4, role="eval")) == 2


def test_records_of_another_builder_version_are_refused(tmp_path):
    root, data_dir = str(tmp_path / "download"), str(tmp_path / "records")
    make_directory(root, np.random.default_rng(3))
    prepare.prepare("directory", root, data_dir, configs=["eval"])
    os.rename(f"{data_dir}/directory/eval/1.0.0", f"{data_dir}/directory/eval/0.9.0")
    with pytest.raises(
        ValueError,
        match=r"builder version\(s\) 0\.9\.0, but this code reads "
        r"version 1\.0\.0",
    ):
        records.make_source("directory", data_dir, "val", 4, role="eval")
