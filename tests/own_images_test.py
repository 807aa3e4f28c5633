"""Your own images, labels optional: the label scan at start, the validation plan, label-free
monitoring and reports, and the README's recipe end to end on generated photos (with no
labels, and with 2 of 8 evaluation images labelled)."""

import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli import REPO, run_cli, run_in_process
from PIL import Image
from support import tiny_config

from depthg_jax import config as config_lib
from depthg_jax import evaluate, segment
from depthg_jax.data import datasets, five_crop, label_check, synthetic
from depthg_jax.evaluation import evaluator, reports
from depthg_jax.method import losses
from depthg_jax.models import model as model_lib
from depthg_jax.runtime.metric_writer import MetricWriter
from depthg_jax.training import loop, summaries

N = 6  # clusters asked for (the synthetic scenes have 6 classes, which the labelled case uses)


def make_photos(root, *, n_train=4, n_val=8, size=64, labelled=None):
    """A `directory` dataset of generated photos with depth; training images unlabelled; of the
    evaluation images, the first `labelled` keep their labels and the others get all-255 label
    files (None: no labels folder at all)."""
    synthetic.generate_dataset(str(root), num_train=n_train, num_val=n_val, size=size, seed=0)
    os.remove(root / synthetic.MANIFEST)
    shutil.rmtree(root / "labels" / "train")
    val = sorted((root / "labels" / "val").iterdir())
    if labelled is None:
        shutil.rmtree(root / "labels")
    for path in val[labelled or 0 :] if labelled is not None else []:
        Image.fromarray(np.full((size, size), 255, np.uint8)).save(path)
    return root


def photos_config(root, **overrides):
    return tiny_config(
        **{"data.name": "directory", "data.root": str(root), "data.eval_res": 32, **overrides}
    )


def plan(root, tmp_path, **overrides):
    return loop.plan_validation(config_lib.resolve(photos_config(root, **overrides), tmp_path))


# --- The label scan and the validation plan (before any work) ----------------------------------


def test_unlabelled_evaluation_data_is_monitored_label_free_and_labels_can_be_required(tmp_path):
    root = make_photos(tmp_path / "photos", labelled=None)
    found = plan(root, tmp_path / "w")
    assert found.mode == loop.LABEL_FREE and "has no labels" in found.message
    assert "export_best/ is not written" in found.message
    with pytest.raises(ValueError, match="train.validate='labels', but the evaluation split"):
        plan(root, tmp_path / "w", **{"train.validate": "labels"})
    with pytest.raises(ValueError, match="a population, which picks its best member on labels"):
        plan(root, tmp_path / "w", **{"sweep.grid": "loss.depth_weight=0.1,0.2"})


def test_two_of_eight_labelled_images_are_validated_on_and_said(tmp_path):
    root = make_photos(tmp_path / "photos", labelled=2)
    found = plan(root, tmp_path / "w")
    assert found.mode == loop.LABELS
    assert "2 of 8 images of 'val' are labelled (6 labelled only with ignore (255))" in (
        found.message
    )
    none = plan(root, tmp_path / "w", **{"train.validate": "none"})
    assert none.mode == loop.LABEL_FREE and "train.validate='none'" in none.message


def test_all_ignore_labels_and_ids_beyond_the_classes_are_named_before_any_work(
    tmp_path, monkeypatch
):
    root = make_photos(tmp_path / "photos", labelled=0)
    said = r"no class at all: every one of its 8 label files is ignore \(255\) everywhere, e\.g\. "
    with pytest.raises(ValueError, match=said + r".*labels/val/000000\.png"):
        plan(root, tmp_path / "w")
    bad = root / "labels" / "val" / "000003.png"
    label = np.full((64, 64), 255, np.uint8)
    label[:3, :4] = 9  # 12 pixels of id 9 >= 6 classes
    Image.fromarray(label).save(bad)
    message = (
        r"1 of 8 label files .* hold values outside the 6 classes.*000003\.png \(id '000003'\)"
    )
    with pytest.raises(ValueError, match=message + r": 12 pixels of \[9\]"):
        plan(root, tmp_path / "w")
    # evaluate refuses them too, before it computes anything
    config = config_lib.resolve(photos_config(root), tmp_path / "w")
    export = tmp_path / "export"
    spec = model_lib.ModelSpec.from_config(config)
    from depthg_jax.runtime import checkpoint

    checkpoint.save_export(str(export), config, model_lib.init_params(spec, jax.random.key(0)))
    monkeypatch.setattr(evaluate, "evaluate_loader", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(ValueError, match=message):
        evaluate.run(str(export), out_dir=str(tmp_path / "eval"))


def test_evaluate_without_labels_writes_maps_usage_and_a_sheet_and_says_why(tmp_path):
    from depthg_jax.runtime import checkpoint

    root = make_photos(tmp_path / "photos", n_train=1, n_val=5, size=48, labelled=None)
    (root / "depth").rename(tmp_path / "no_depth")  # evaluating needs the images only
    config = config_lib.resolve(photos_config(root, **{"eval.crf": True}), tmp_path / "w")
    spec = model_lib.ModelSpec.from_config(config)
    export = str(tmp_path / "export")
    checkpoint.save_export(export, config, model_lib.init_params(spec, jax.random.key(0)))
    results, names, paths, _ = evaluate.run(export, out_dir=str(tmp_path / "eval"))
    assert "cluster" not in results and results["num_images"] == 5
    for key in ("cluster", "cluster_crf"):  # before and after the CRF: every crop pixel
        assert results["usage"][key].sum() == 5 * 32 * 32
    said = evaluate.describe(results, names)
    assert said.startswith("No scores are possible: the evaluation split 'val' of directory")
    assert "Cluster usage after the CRF" in said and "of 6 clusters used" in said
    maps = sorted(os.listdir(paths["cluster_maps"]))
    assert maps == [f"{i:06d}.png" for i in range(5)]
    written = [np.asarray(Image.open(os.path.join(paths["cluster_maps"], m))) for m in maps]
    crf_ids = sum(np.bincount(ids.ravel(), minlength=N) for ids in written)
    np.testing.assert_array_equal(crf_ids, results["usage"]["cluster_crf"])
    report = json.loads(open(paths["results"]).read())
    assert (report["kind"], report["labels"], report["num_labelled_images"]) == (
        "evaluation report", "none", 0,
    )  # fmt: skip
    assert report["usage"]["cluster_crf"]["pixels"] == results["usage"]["cluster_crf"].tolist()
    assert Image.open(paths["sheet"]).size[0] > 4 * 2 * 32 and os.path.isfile(paths["usage"])


def test_the_scan_counts_labelled_and_ignore_only_files(tmp_path):
    Image.fromarray(np.array([[0, 2], [255, 2]], np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((2, 2), 255, np.uint8)).save(tmp_path / "c.png")
    records = [
        datasets.Record(i, f"{i}.jpg", i, None if i == "b" else str(tmp_path / f"{i}.png"))
        for i in "abc"
    ]
    source = datasets.ExampleSource(
        records, n_classes=3, label_lut=datasets.identity_lut(3), name="toy:val"
    )
    scan = label_check.scan_split(source, 3)
    assert scan == {
        "total": 3, "labelled": 2, "all_ignore": 1, "all_ignore_files": [str(tmp_path / "c.png")],
        "usable": 1, "class_pixels": [1, 0, 2],
    }  # fmt: skip
    assert label_check.describe(scan, "val") == (
        "1 of 3 images of 'val' are labelled (1 without a label file, 1 labelled only with "
        "ignore (255))"
    )


# --- Label-free pieces -------------------------------------------------------------------------


def test_the_linear_probe_loss_without_labels_is_zero_with_a_zero_gradient():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 4, N))
    labels = np.full((2, 8, 8), -1, np.int32)
    value, grad = jax.value_and_grad(losses.linear_probe_loss)(logits, labels)
    assert float(value) == 0.0 and not np.any(np.asarray(grad))  # no NaN reaches the checks


def test_the_evaluator_counts_usage_and_scores_only_labelled_pixels():
    spec = model_lib.ModelSpec("mu/8", 32, N)
    params = model_lib.init_params(spec, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    unlabelled = np.full((8, 32, 32), -1, np.int32)
    valid = np.arange(8) < 7  # the last one is padding
    score = evaluator.Evaluator(evaluator.head_predictor(spec, flip=False), N, progress=False)
    batch = {"image": images, "label": unlabelled, "valid": valid}
    result = score(params, [batch])
    assert "cluster" not in result and result["num_labelled_images"] == 0
    ids = np.asarray(model_lib.predict(params, images, spec, False)["cluster_log_probs"]).argmax(-1)
    np.testing.assert_array_equal(
        result["usage"]["cluster"], np.bincount(ids[:7].ravel(), minlength=N)
    )
    labelled = unlabelled.copy()
    labelled[1, :4] = rng.integers(0, N, (4, 32))
    labelled[7] = 0  # padding: never counted
    partly = score(params, [{**batch, "label": labelled}])
    assert partly["num_labelled_images"] == 1 and partly["confusion"]["cluster"].sum() == 128
    assert 0 <= partly["cluster"]["accuracy"] <= 1
    np.testing.assert_array_equal(partly["usage"]["cluster"], result["usage"]["cluster"])


def test_usage_summary_and_the_histogram_row(tmp_path):
    summary = reports.usage_summary([30, 0, 10, 0])
    assert summary["dead"] == 2 and summary["dead_ids"] == [1, 3] and summary["largest"] == 0.75
    assert summary["entropy"] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert summary["entropy_normalised"] == pytest.approx(summary["entropy"] / np.log(4))
    writer = MetricWriter(str(tmp_path))
    writer.write_histogram(3, "monitor/cluster_usage", np.array([30, 0, 10, 0]))
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 3, "monitor/cluster_usage": [30, 0, 10, 0]}]
    histograms = [
        (event.step, value.histo)
        for event in read_events(tmp_path / "tensorboard")
        for value in event.summary.value
        if value.tag == "monitor/cluster_usage"
    ]
    assert len(histograms) == 1 and histograms[0][0] == 3
    histo = histograms[0][1]
    assert list(histo.bucket) == [30, 0, 10, 0] and histo.num == 40 and histo.max == 2


def read_events(folder):
    """The events of every TensorBoard file in a folder (TFRecord framing, no TensorFlow)."""
    from tensorboardX.proto import event_pb2

    for path in sorted(folder.iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            yield event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            i += 12 + length + 4


def test_the_custom_config_loads_from_any_directory_without_jax(tmp_path):
    check = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(REPO / 'configs/custom.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "for c in (module.get_config(), module.get_config('mu/8'), module.get_config('B/8')):\n"
        "    assert c.data.name == 'directory' and c.train.validate == 'auto', c\n"
        "assert not [m for m in ('jax', 'flax', 'PIL') if m in sys.modules]\n"
        "print(module.get_config('mu/8').model.variant)\n"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "mu/8", out.stderr


def test_five_crop_of_unlabelled_photos_writes_no_labels(tmp_path):
    root = make_photos(tmp_path / "photos", n_train=2, n_val=1, labelled=None)
    source = datasets.make_source("directory", str(root), "train", N)
    assert five_crop.write_five_crops(source, str(tmp_path / "crops"), "train") == 2
    assert len(os.listdir(tmp_path / "crops/images/train")) == 10
    assert not (tmp_path / "crops/labels").exists()


# --- The README recipe, end to end -------------------------------------------------------------


def recipe_flags(photos, crops, workdir):
    return [
        "--config=configs/custom.py:mu/8", f"--workdir={workdir}",
        f"--config.data.root={crops}", f"--config.data.eval_root={photos}",
        f"--config.data.n_classes={N}", "--config.data.train_res=64",
        "--config.data.eval_res=64", "--config.loss.feature_samples=3",
        "--config.train.batch_size=8", "--config.train.num_steps=4",
        "--config.train.eval_every=2", "--config.train.image_every=2",
        "--config.train.checkpoint_every=2", "--config.train.log_every=2",
    ]  # fmt: skip


@pytest.mark.slow
def test_unlabelled_photos_five_crop_knn_train_export_segment_evaluate(tmp_path):
    photos = make_photos(tmp_path / "photos", n_train=4, n_val=8, size=128, labelled=None)
    crops, work = tmp_path / "crops", tmp_path / "run"
    run_cli("depthg_jax.data.five_crop", ["--dataset=directory", f"--root={photos}",
            "--split=train", f"--out={crops}"], check=True)  # fmt: skip
    flags = recipe_flags(photos, crops, work)
    run_cli("depthg_jax.data.knn", [f for f in flags if not f.startswith("--workdir")],
            check=True)  # fmt: skip
    trained = run_cli("depthg_jax.main", flags, check=True)
    assert "Validation: label-free" in trained.stdout
    assert "export_best/ not written: the run validated without labels" in trained.stdout
    assert (work / "export" / "MANIFEST.json").is_file() and not (work / "export_best").exists()
    summary = json.loads((work / "results.json").read_text())
    assert summary["kind"] == "training summary" and summary["validation"] == "label-free"
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    monitored = [r for r in rows if "heldout/loss_inter" in r]
    assert [r["step"] for r in monitored][:2] == [2, 4]
    assert all(np.isfinite(v) for r in monitored for v in r.values())
    assert any(len(r.get("monitor/cluster_usage", [])) == N for r in rows)
    assert any(r.get("loss_linear") == 0.0 for r in rows)  # nothing to learn from
    from depthg_jax.runtime import checkpoint, seeds

    config, params = checkpoint.load_export(str(work / "export"))
    initial = model_lib.init_trainable(
        model_lib.ModelSpec.from_config(config), seeds.run_keys(config.seed)[1]
    )
    jax.tree.map(np.testing.assert_array_equal, params["linear_probe"], initial["linear_probe"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), params["head"], initial["head"])
    assert any(jax.tree.leaves(changed))  # the head trained; the linear probe kept its init
    grid = Image.open(work / "images" / "step_000004.png")
    tile = 64 * -(-summaries.MIN_TILE // 64)  # small tiles are enlarged so titles fit
    assert grid.size[0] == 3 * tile + 4 * 2  # image | depth | clusters: no label column

    val = photos / "images" / "val"
    segmented = run_cli("depthg_jax.segment", [f"--checkpoint={work / 'export'}",
                        f"--images={val}", f"--out={tmp_path / 'seg'}"])  # fmt: skip
    assert segmented.returncode == 0, segmented.stderr
    assert len(list((tmp_path / "seg" / "labels").iterdir())) == 8
    refused = run_cli("depthg_jax.segment", [f"--checkpoint={work / 'export'}",
                      f"--images={val}", f"--out={tmp_path / 'seg2'}",
                      f"--assignment={work / 'results.json'}"])  # fmt: skip
    assert refused.returncode == 2 and "validated without labels" in refused.stderr

    evaluated = run_cli("depthg_jax.evaluate", [f"--checkpoint={work / 'export'}"])
    assert evaluated.returncode == 0, evaluated.stderr
    assert "No scores are possible" in evaluated.stdout and "clusters used" in evaluated.stdout
    report = json.loads((work / "export" / "eval" / "results.json").read_text())
    assert report["kind"] == "evaluation report" and report["labels"] == "none"
    assert report["num_images"] == 8 and len(report["usage"]["cluster"]["pixels"]) == N
    assert len(os.listdir(work / "export" / "eval" / "clusters")) == 8
    assert (work / "export" / "eval" / "sheet.png").is_file()


@pytest.mark.slow
def test_two_of_eight_labelled_photos_are_scored_over_those_two(tmp_path, capsys):
    from depthg_jax.data import knn
    from depthg_jax.training import trainer

    photos = make_photos(tmp_path / "photos", n_train=4, n_val=8, size=128, labelled=2)
    crops, work = tmp_path / "crops", tmp_path / "run"
    five_crop.write_five_crops(
        datasets.make_source("directory", str(photos), "train", N), str(crops), "train"
    )
    config = tiny_config(**{"data.name": "directory", "data.root": str(crops),
                            "data.eval_root": str(photos), "train.eval_every": 2})  # fmt: skip
    knn.make_knn_table(config_lib.resolve(config, str(work)))
    results = trainer.train_and_evaluate(config, str(work))
    printed = capsys.readouterr().out
    assert "Validation: on labels (2 of 8 images of 'val' are labelled" in printed
    assert results["validation"] == "labels" and (work / "export_best").is_dir()
    assert results["assignment"]["step"] == 4 and len(results["assignment"]["assignment"]) == N

    evaluated, names, paths, _ = evaluate.run(str(work / "export"))
    assert evaluated["num_images"] == 8 and evaluated["num_labelled_images"] == 2
    said = evaluate.describe(evaluated, names)
    assert said.startswith("Scored over the 2 of 8 images with labels (6 have no labelled pixel)")
    report = json.loads(open(paths["results"]).read())
    assert report["labels"] == "some" and report["num_labelled_images"] == 2
    counted = sum(map(sum, report["cluster"]["confusion"]))
    assert 0 < counted <= 2 * 64 * 64 and counted == evaluated["confusion"]["cluster"].sum()

    # segment takes what training wrote (the final head's assignment) and evaluate's report
    args = ["--checkpoint", work / "export", "--images", photos / "images" / "val", "--res", 32]
    for assignment in (work / "results.json", paths["results"]):
        out = tmp_path / f"seg_{len(str(assignment))}"
        assert run_in_process(segment.define_flags, segment.run,
                              args + ["--out", out, "--assignment", assignment]) == 0  # fmt: skip
        assert len(list((out / "overlay").iterdir())) == 8
