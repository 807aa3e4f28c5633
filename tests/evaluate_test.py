"""Inference forward and evaluation loop against direct computations, and the CLI on an export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from depthg_jax import evaluate
from depthg_jax.evaluation import crf, evaluator, metrics, reports
from depthg_jax.method import image_ops
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import sharding

N_CLASSES = 6  # the synthetic set's, so the export test reuses the compiled step
SPEC = model_lib.ModelSpec("mu/8", 32, N_CLASSES)


@pytest.fixture(scope="module")
def params():
    return model_lib.init_params(SPEC, jax.random.key(0))


def predict(params, images, flip):
    return model_lib.predict(params, images, SPEC, flip)


def make_batches(num_batches=2, batch=8, size=32, num_valid=13, seed=0):
    """Smooth random images (so the CRF has edges to use) and labels; tail padded invalid."""
    rng = np.random.default_rng(seed)
    batches = []
    for b in range(num_batches):
        low = rng.integers(0, 256, (batch, size // 8, size // 8, 3))
        images = low.repeat(8, 1).repeat(8, 2).astype(np.uint8)
        labels = rng.integers(-1, N_CLASSES, (batch, size, size)).astype(np.int32)
        valid = np.arange(b * batch, (b + 1) * batch) < num_valid
        batches.append({"image": images, "label": labels, "valid": valid})
    return batches


def test_normalize_images_matches_imagenet_statistics():
    images = np.array([[[[0, 128, 255]]]], np.uint8)
    want = (np.array([0, 128, 255]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(image_ops.normalize_images(images)[0, 0, 0], want, rtol=1e-6)


def test_upsample_matches_torch_bilinear():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    got = np.asarray(image_ops.resize_bilinear(jnp.asarray(x), (40, 32), align_corners=False))
    t = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), (40, 32), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(got, t.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_probes_act_on_the_upsampled_code(params):
    images = make_batches(1)[0]["image"]
    out = predict(params, images, flip=False)
    assert out["code"].shape == (8, 4, 4, 32)
    assert out["cluster_log_probs"].shape == out["linear_logits"].shape == (8, 32, 32, N_CLASSES)
    # Reference in torch: upsample the code, then cosine to centroids, log_softmax(2 x).
    code = torch.from_numpy(np.array(out["code"])).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(code, (32, 32), mode="bilinear", align_corners=False)
    centroids = torch.from_numpy(np.array(params["cluster_probe"]["clusters"]))
    inner = torch.einsum(
        "bchw,nc->bnhw",
        torch.nn.functional.normalize(up, dim=1),
        torch.nn.functional.normalize(centroids, dim=1),
    )
    want = torch.log_softmax(2 * inner, dim=1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out["cluster_log_probs"], want, atol=2e-5)
    w = np.asarray(params["linear_probe"]["linear"]["kernel"])
    bias = np.asarray(params["linear_probe"]["linear"]["bias"])
    linear = up.permute(0, 2, 3, 1).numpy() @ w + bias
    np.testing.assert_allclose(out["linear_logits"], linear, atol=2e-5)


def test_flip_averaging_is_flip_equivariant(params):
    images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    flipped = images[:, :, ::-1]
    a, b = predict(params, images, True), predict(params, flipped, True)
    np.testing.assert_allclose(a["code"], b["code"][:, :, ::-1], atol=1e-5)
    unflipped = b["cluster_log_probs"][:, :, ::-1]
    np.testing.assert_allclose(a["cluster_log_probs"], unflipped, atol=1e-5)
    # ... which the plain forward is not, and the average is of the two codes.
    plain, plain_f = predict(params, images, False), predict(params, flipped, False)
    assert np.abs(plain["code"] - plain_f["code"][:, :, ::-1]).max() > 1e-3
    np.testing.assert_allclose(
        a["code"], (plain["code"] + plain_f["code"][:, :, ::-1]) / 2, atol=1e-5
    )


def direct_confusions(params, batches, flip, use_crf):
    """Per batch on one device, argmax (optionally after the CRF), NumPy counting."""
    keys = ("cluster", "linear")
    totals = {k: np.zeros((N_CLASSES, N_CLASSES), np.int64) for k in keys}
    for batch in batches:
        out = predict(params, batch["image"], flip)
        scores = {
            "cluster": np.asarray(out["cluster_log_probs"]),
            "linear": np.asarray(out["linear_logits"]),
        }
        for k in keys:
            if use_crf:
                preds = np.stack(
                    [
                        crf.dense_crf(im, s).argmax(-1)
                        for im, s in zip(batch["image"], scores[k], strict=True)
                    ]
                )
            else:
                preds = scores[k].argmax(-1)
            keep = batch["valid"][:, None, None] & (batch["label"] >= 0)
            np.add.at(totals[k], (preds[keep], batch["label"][keep]), 1)
    return totals


def test_evaluate_loader_equals_direct_computation_on_eight_devices(params):
    batches = make_batches()
    mesh = sharding.make_mesh()
    assert mesh.devices.size == 8
    with crf.make_crf_pool(2) as pool:
        got = evaluator.evaluate_loader(
            params,
            SPEC,
            batches,
            flip=True,
            crf=True,
            mesh=mesh,
            progress=False,
            crf_pool=pool,
        )
    assert got["num_images"] == 13
    want = direct_confusions(params, batches, flip=True, use_crf=False)
    want_crf = direct_confusions(params, batches, flip=True, use_crf=True)
    for k in ("cluster", "linear"):
        np.testing.assert_array_equal(got["confusion"][k], want[k])
        np.testing.assert_array_equal(got["confusion"][f"{k}_crf"], want_crf[k])
        ref = metrics.scores(want_crf[k], hungarian=k == "cluster")
        assert got[f"{k}_crf"]["miou"] == ref["miou"]
    assert got["confusion"]["cluster"].sum() == sum(
        ((b["label"] >= 0) & b["valid"][:, None, None]).sum() for b in batches
    )
    assert 0 < got["crf_time_s"] < got["time_s"]


def test_evaluate_loader_same_on_one_device(params):
    batches = make_batches(num_batches=1, num_valid=5)
    one = sharding.make_mesh(jax.devices()[:1])
    single = evaluator.evaluate_loader(
        params, SPEC, batches, flip=False, crf=False, mesh=one, progress=False
    )
    want = direct_confusions(params, batches, flip=False, use_crf=False)
    for k in ("cluster", "linear"):
        np.testing.assert_array_equal(single["confusion"][k], want[k])
    assert "cluster_crf" not in single and single["crf_time_s"] == 0


def test_check_params_names_the_mismatch(params):
    with pytest.raises(ValueError, match=r"cluster probe classes 6 \(expected 27\)"):
        model_lib.check_params(params, model_lib.ModelSpec("mu/8", 32, 27))
    with pytest.raises(ValueError, match=r"backbone width 32 \(expected 384\)"):
        model_lib.check_params(params, model_lib.ModelSpec("S/8", 32, N_CLASSES))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, params):
    """A tiny export on a generated synthetic split (6 classes, 32 px evaluation, CRF on)."""
    from support import synthetic_export

    return synthetic_export(tmp_path_factory.mktemp("eval"), params, crf=True)


def test_cli_run_writes_report(export_dir, tmp_path):
    results, names, paths, _ = evaluate.run(export_dir, out_dir=str(tmp_path / "report"))
    assert results["num_images"] == 5 and len(names) == 6
    with open(paths["results"]) as f:
        saved = json.load(f)
    for key in ("cluster", "linear", "cluster_crf", "linear_crf"):
        assert 0 <= saved[key]["accuracy"] <= 100
        assert saved[key]["accuracy"] == pytest.approx(100 * results[key]["accuracy"], abs=1e-4)
        assert set(saved[key]["iou"]) == set(names)
    table = open(paths["per_class"]).read()
    assert all(n in table for n in names) and "CRF" in table
    with Image.open(paths["confusion_cluster_crf"]) as im:
        assert im.format == "PNG" and im.mode == "RGB" and min(im.size) > 6 * 28
    assert not [f for f in os.listdir(tmp_path / "report") if f.startswith(".tmp")]
    table = reports.format_table(results)
    assert "cluster" in table and "linear" in table and "with CRF" in table


def test_cli_rejects_config_for_another_model(export_dir):
    from configs import demo

    other = demo.get_config()
    other.data.n_classes = 27
    with pytest.raises(ValueError, match=r"data.n_classes: checkpoint 6, config 27"):
        evaluate.run(export_dir, config_override=other)


def test_release_crf_image_equals_the_torch_round_trip():
    # The release: to_pil_image(unnormalise(normalise(to_tensor(x)))), i.e. floor(255 * y).
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(image_ops.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(image_ops.IMAGENET_STD).view(1, 3, 1, 1)
    round_trip = ((t - mean) / std) * std + mean
    want = round_trip.mul(255).byte().permute(0, 2, 3, 1).numpy()
    got = image_ops.release_crf_image(images)
    np.testing.assert_array_equal(got, want)
    lower = np.mean(got.astype(int) == images.astype(int) - 1)
    assert 0.05 < lower < 0.5  # a real share of levels comes back one lower
    assert np.all((images.astype(int) - got) >= 0) and np.all((images.astype(int) - got) <= 1)


def test_matmul_precision_reaches_the_backbone_program():
    x = jnp.ones((1, 16, 16, 3), jnp.uint8)
    params = model_lib.init_params(model_lib.ModelSpec("mu/8", 8, 3), jax.random.key(0), res=16)

    def code(precision):
        spec = model_lib.ModelSpec("mu/8", 8, 3, matmul_precision=precision)
        return jax.jit(lambda p, im: model_lib.compute_code(spec, p, im)).lower(params, x).as_text()

    # The position-embedding resize asks for HIGHEST itself; every other dot follows the scope.
    default, highest = code("default"), code("highest")
    dots = highest.count("stablehlo.dot_general")
    assert default.count("HIGHEST") < dots and highest.count("precision = [HIGHEST") == dots
    with pytest.raises(ValueError, match="matmul precision"):
        model_lib.precision_scope("low")
