"""KNN tables: exact cosine top-k against brute force, tables from sources, the sharded backbone."""

import os

import numpy as np
import pytest
from PIL import Image

from depthg_jax.data import datasets, knn


def brute_force_knn(features, k):
    """Full float32 cosine matrix; self first, then by similarity, ties by lower index."""
    f = features.astype(np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-10)
    sims = f @ f.T
    np.fill_diagonal(sims, np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_compute_knn_equals_brute_force_top_k(chunk_size):
    feats = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    got = knn.compute_knn(feats, k=30, chunk_size=chunk_size)
    assert got.shape == (300, 30) and got.dtype == np.int32
    np.testing.assert_array_equal(got, brute_force_knn(feats, 30))
    assert (got[:, 0] == np.arange(300)).all()
    assert all(len(set(row)) == 30 for row in got)


def test_compute_knn_ties_put_self_first_then_lower_index():
    base = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    feats = np.concatenate([base, base[[2]], 3.0 * base[[2]]])  # Rows 2, 6, 7 point alike.
    got = knn.compute_knn(feats, k=3, chunk_size=3)
    assert list(got[2]) == [2, 6, 7] and list(got[6]) == [6, 2, 7] and list(got[7]) == [7, 2, 6]
    np.testing.assert_array_equal(got, brute_force_knn(feats, 3))


def test_compute_knn_rejects_k_larger_than_n():
    with pytest.raises(ValueError, match="k=5.*N=3"):
        knn.compute_knn(np.ones((3, 2), np.float32), k=5)


def test_table_path_names_variant_split_and_resolution():
    path = knn.knn_table_path("/data/coco", "train", "B/8", 224)
    assert path == "/data/coco/knn/nns_B-8_train_224.npz"


def make_dataset(root, n, h=20, w=28):
    rng = np.random.default_rng(2)
    for i in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for sub, arr, ext in [("images", img, ".png"), ("depth", img[..., 0], "_zoedepth.png")]:
            os.makedirs(f"{root}/{sub}/train", exist_ok=True)
            Image.fromarray(arr).save(f"{root}/{sub}/train/{i:02d}{ext}")
    return datasets.make_source("directory", root, "train", 3)


def test_build_knn_table_uses_the_train_crop_and_saves_a_loadable_table(tmp_path):
    from depthg_jax.data.transforms import resize_center_crop
    from depthg_jax.method.image_ops import normalize_images

    src = make_dataset(str(tmp_path), 11)
    pool = lambda images: images.reshape(len(images), -1)  # Every pixel a feature.
    path = knn.knn_table_path(str(tmp_path), "train", "S/8", 16)
    table = knn.build_knn_table(src, pool, res=16, global_batch_size=4, k=5, path=path)
    crops = np.stack([resize_center_crop(src[i], 16)["image"] for i in range(11)])
    expected = brute_force_knn(pool(normalize_images(crops)), 5)
    np.testing.assert_array_equal(table, expected)
    np.testing.assert_array_equal(knn.load_knn_table(path, src.ids), expected)
    small = knn.build_knn_table(src, pool, res=16, global_batch_size=4, k=30)
    assert small.shape == (11, 11)  # k capped at the split size.


def test_sharded_backbone_features_match_a_plain_apply(tmp_path):
    import jax
    import jax.numpy as jnp

    from depthg_jax.data.transforms import resize_center_crop
    from depthg_jax.method.image_ops import normalize_images
    from depthg_jax.models.vit import DinoViT

    assert jax.device_count() == 8
    src = make_dataset(str(tmp_path), 10, h=16, w=24)
    model = DinoViT("mu/8")
    # Random params from the init's shapes (compiling the init itself takes seconds on CPU).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes["params"]
    )
    table = knn.build_knn_table(
        src,
        knn.make_sharded_feature_fn(lambda p, x: model.apply({"params": p}, x), params),
        res=16,
        global_batch_size=8,
        k=4,
    )
    crops = np.stack([resize_center_crop(src[i], 16)["image"] for i in range(10)])
    apply = jax.jit(model.apply)
    feats = np.asarray(apply({"params": params}, normalize_images(crops))).mean((1, 2))
    np.testing.assert_array_equal(table, brute_force_knn(feats, 4))


def test_knn_feature_dropout_is_the_release_s_seeded_channel_dropout():
    import jax
    import jax.numpy as jnp

    from depthg_jax.models.head import channel_dropout

    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 2, 2, 16)).astype(np.float32)  # one per simulated device
    identity = lambda p, x: x  # noqa: E731  (the "backbone": features are the input)
    key = jax.random.key(3)
    plain = knn.make_sharded_feature_fn(identity, {})(images)
    dropped = knn.make_sharded_feature_fn(identity, {}, dropout=0.5, dropout_key=key)
    first, second = dropped(images), dropped(images)
    want = channel_dropout(jax.random.fold_in(key, 0), jnp.asarray(images), 0.5).mean((1, 2))
    want = np.asarray(want / jnp.linalg.norm(want, axis=-1, keepdims=True))
    np.testing.assert_allclose(first, want, atol=1e-6)
    expected_plain = images.mean((1, 2))
    expected_plain /= np.linalg.norm(expected_plain, axis=-1, keepdims=True)
    np.testing.assert_allclose(plain, expected_plain, atol=1e-6)
    assert np.any(first == 0) and not np.allclose(first, second)  # a fresh mask per batch
    with pytest.raises(ValueError, match="dropout_key"):
        knn.make_sharded_feature_fn(identity, {}, dropout=0.1)


def test_the_knn_command_uses_the_trainer_s_backbone_on_imagenet_normalised_crops(tmp_path):
    """The table `make_knn_table` writes equals brute force over a plain DinoViT apply of the
    normalised train crops with the backbone the trainer seeds (normalised exactly once)."""
    import jax

    from depthg_jax import config as config_lib
    from depthg_jax.data.transforms import resize_center_crop
    from depthg_jax.method.image_ops import normalize_images
    from depthg_jax.models import model as model_lib
    from depthg_jax.models.vit import DinoViT
    from depthg_jax.runtime import seeds

    src = make_dataset(str(tmp_path), 10, h=16, w=24)
    config = config_lib.get_config()
    config.model.variant, config.model.allow_random_backbone = "mu/8", True
    config.data.name, config.data.root, config.data.train_res = "directory", str(tmp_path), 16
    config.data.num_neighbors = 3  # k=4 columns: the example itself and 3 neighbours
    path = knn.make_knn_table(config, per_device_batch=1, k=4)
    params = model_lib.init_backbone(config.model, seeds.run_keys(config.seed)[0])
    crops = np.stack([resize_center_crop(src[i], 16)["image"] for i in range(10)])
    feats = jax.jit(DinoViT("mu/8").apply)({"params": params}, normalize_images(crops))
    expected = brute_force_knn(np.asarray(feats).mean((1, 2)), 4)
    np.testing.assert_array_equal(knn.load_knn_table(path, src.ids), expected)
