"""Input pipeline: transform, per-host sharding, KNN positives, resume, eval padding."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from depthg_jax.data import datasets, knn, pipeline
from depthg_jax.data.transforms import resize_center_crop

N = 8  # Examples in the train split.
R = 16  # Train and eval resolution in these tests.


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def make_dataset(root, split, n, h=24, w=32):
    """Example i has image channel 0 == depth == label == i everywhere (identifies it)."""
    for i in range(n):
        save(f"{root}/images/{split}/{i:03d}.png", np.full((h, w, 3), i, np.uint8))
        save(f"{root}/depth/{split}/{i:03d}_zoedepth.png", np.full((h, w), i, np.uint8))
        save(f"{root}/labels/{split}/{i:03d}.png", np.full((h, w), i, np.uint8))


def make_config(root, **overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            name="directory",
            root=root,
            n_classes=32,
            train_split="train",
            eval_split="val",
            train_res=R,
            eval_res=R,
            num_neighbors=3,
            worker_count=0,
            prefetch=2,
        )
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds"))
    make_dataset(root, "train", N)
    make_dataset(root, "val", 7)
    src = datasets.make_source("directory", root, "train", 32)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(N, 5)).astype(np.float32)
    feature_fn = lambda images: feats[images_to_ids(images)]
    path = knn.knn_table_path(root, "train", "S/8", R)
    knn.build_knn_table(src, feature_fn, res=R, global_batch_size=4, k=6, path=path)
    return root


def images_to_ids(normalized_images):
    """Inverse of the ImageNet normalisation on channel 0 -> the example id."""
    ch0 = normalized_images[:, 0, 0, 0] * 0.229 + 0.485
    return np.rint(ch0 * 255).astype(int)


def ids_of(batch, key="image"):
    return batch[key][:, 0, 0, 0].astype(int)


def take(it, n):
    return [next(it) for _ in range(n)]


# --- Transform -------------------------------------------------------------------------------


# (16, 16) -> 12 puts some pixel centres exactly on source pixel edges: PIL's 16.16 fixed point
# rounds those down, we take the exact value, so it is checked against exact fractions only.
@pytest.mark.parametrize("h,w", [(24, 32), (32, 24), (37, 53), (30, 50)])
def test_transform_matches_pil_nearest_resize_then_centre_crop(h, w):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    res = 12
    new_h, new_w = (res, int(res * w / h)) if h <= w else (int(res * h / w), res)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.NEAREST))
    top, left = int(round((new_h - res) / 2)), int(round((new_w - res) / 2))
    expected = resized[top : top + res, left : left + res]
    ex = {"image": image, "depth": image[..., 0].astype(np.float32), "label": image[..., 1]}
    out = resize_center_crop(ex, res)
    np.testing.assert_array_equal(out["image"], expected)
    np.testing.assert_array_equal(out["depth"], expected[..., 0].astype(np.float32))
    np.testing.assert_array_equal(out["label"], expected[..., 1])


def test_transform_samples_exact_pixel_centres_on_ties():
    from fractions import Fraction

    image = np.arange(16 * 16 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    out = resize_center_crop({"image": image, "depth": image[..., 0], "label": image[..., 0]}, 12)
    idx = [int((Fraction(2 * i + 1, 2) * Fraction(16, 12)).__floor__()) for i in range(12)]
    np.testing.assert_array_equal(out["image"], image[np.ix_(idx, idx)])


# --- Train loader ----------------------------------------------------------------------------


def make_train(root, index, count=2, seed=0, global_batch=4, **cfg):
    return pipeline.make_train_loader(
        make_config(root, **cfg),
        global_batch_size=global_batch,
        seed=seed,
        process_index=index,
        process_count=count,
    )


def test_train_batches_have_the_contract_shapes_and_dtypes(root):
    batch = next(make_train(root, 0))
    b = 2
    assert batch["image"].shape == (b, R, R, 3) and batch["image"].dtype == np.uint8
    assert batch["image_pos"].shape == (b, R, R, 3) and batch["image_pos"].dtype == np.uint8
    for k in ("depth", "depth_pos"):
        assert batch[k].shape == (b, R, R) and batch[k].dtype == np.float32
    for k in ("label", "label_pos"):
        assert batch[k].shape == (b, R, R) and batch[k].dtype == np.int32
    assert set(batch) == {"image", "depth", "label", "image_pos", "depth_pos", "label_pos"}


def test_two_hosts_cover_every_epoch_exactly_once_and_reshuffle(root):
    its = [make_train(root, p) for p in range(2)]
    epochs = []
    for _ in range(3):  # 3 epochs of N = 8 examples, 2 global batches of 4 each.
        seen = []
        for _ in range(N // 4):
            seen += [ids_of(next(it)) for it in its]
        seen = np.concatenate(seen)
        assert sorted(seen) == list(range(N))
        epochs.append(seen)
    assert not all((e == epochs[0]).all() for e in epochs[1:])


def test_image_depth_and_label_stay_paired(root):
    batch = next(make_train(root, 0, count=1))
    for s in ("", "_pos"):
        ids = ids_of(batch, "image" + s)
        assert (batch["depth" + s] == ids[:, None, None]).all()
        assert (batch["label" + s] == ids[:, None, None]).all()


def test_positive_is_one_of_the_first_neighbours_never_itself(root):
    table = knn.load_knn_table(knn.knn_table_path(root, "train", "S/8", R))
    it = make_train(root, 0, count=1)
    ranks = []
    for batch in take(it, 30):
        for a, p in zip(ids_of(batch), ids_of(batch, "image_pos"), strict=True):
            assert p != a
            rank = list(table[a]).index(p)
            assert 1 <= rank <= 3
            ranks.append(rank)
    assert set(ranks) == {1, 2, 3}  # Uniform over ranks 1..num_neighbors: all appear.


def test_same_seed_same_stream_other_seed_other_stream(root):
    a = [ids_of(b) for b in take(make_train(root, 1, seed=3), 4)]
    b = [ids_of(b) for b in take(make_train(root, 1, seed=3), 4)]
    c = [ids_of(b) for b in take(make_train(root, 1, seed=4), 4)]
    assert all((x == y).all() for x, y in zip(a, b, strict=True))
    assert not all((x == y).all() for x, y in zip(a, c, strict=True))


def test_resume_from_state_yields_the_uninterrupted_batches(root):
    it = make_train(root, 1, prefetch=3)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 5)
    resumed = make_train(root, 1, prefetch=3)
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 5), strict=True):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_missing_knn_table_says_which_command_makes_it(root):
    with pytest.raises(FileNotFoundError, match=r"nns_B-8_train_16\.npz.*python -m depthg_jax"):
        make_train(root, 0, knn_variant="B/8")


def test_knn_table_is_found_without_a_variant_unless_ambiguous(root, tmp_path):
    assert pipeline.knn_path(make_config(root)).endswith("nns_S-8_train_16.npz")
    other = str(tmp_path / "ds")
    make_dataset(other, "train", 2)
    with pytest.raises(
        FileNotFoundError, match=r"nns_<variant>_train_16\.npz.*depthg_jax.data.knn"
    ):
        make_train(other, 0)
    for variant in ("S/8", "B/8"):
        knn.save_knn_table(knn.knn_table_path(other, "train", variant, R), np.zeros((2, 2)), [])
    with pytest.raises(ValueError, match="Several KNN tables.*knn_variant"):
        make_train(other, 0)


def test_knn_table_of_another_split_is_rejected(root, tmp_path):
    path = str(tmp_path / "t.npz")
    knn.save_knn_table(path, np.zeros((N, 5), np.int32), [f"x{i}" for i in range(N)])
    with pytest.raises(ValueError, match="another list"):
        make_train(root, 0, knn_path=path)


def test_batch_not_divisible_by_processes_is_an_error(root):
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_train(root, 0, count=2, global_batch=5)


# --- Eval loader -----------------------------------------------------------------------------


def make_eval(root, index, count=2, global_batch=4, max_batches=0):
    return pipeline.make_eval_loader(
        make_config(root),
        global_batch_size=global_batch,
        process_index=index,
        process_count=count,
        max_batches=max_batches,
    )


def test_eval_two_hosts_cover_the_split_once_with_padding_marked_invalid(root):
    loaders = [make_eval(root, p) for p in range(2)]
    assert [len(x) for x in loaders] == [2, 2] and loaders[0].num_examples == 7
    valid_ids, invalid = [], 0
    for loader in loaders:
        for batch in loader:
            assert batch["image"].shape == (2, R, R, 3) and batch["valid"].dtype == np.bool_
            assert batch["label"].dtype == np.int32 and batch["depth"].dtype == np.float32
            valid_ids += list(ids_of(batch)[batch["valid"]])
            invalid += int((~batch["valid"]).sum())
            assert (batch["label"][~batch["valid"]] == -1).all()
    assert sorted(valid_ids) == list(range(7)) and invalid == 1


def test_eval_is_reiterable_and_max_batches_is_the_same_on_every_host(root):
    loader = make_eval(root, 1, max_batches=1)
    first = [ids_of(b) for b in loader]
    second = [ids_of(b) for b in loader]
    assert len(first) == 1 and (first[0] == second[0]).all()
    assert len(make_eval(root, 0, max_batches=1)) == 1
