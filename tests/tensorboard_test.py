"""TensorBoard worth opening: a run's event files hold its resolved config as text, picture
grids and confusion pictures at each validation, and its hyperparameters for the HParams
dashboard (one session per sweep member), read back with TensorBoard's own event reader."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from support import tiny_config
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from depthg_jax import config as config_lib
from depthg_jax.runtime import metric_writer
from depthg_jax.training import population, summaries, trainer


def read_run(path):
    reader = event_accumulator.EventAccumulator(
        path,
        size_guidance={
            event_accumulator.IMAGES: 0,
            event_accumulator.TENSORS: 0,
            event_accumulator.SCALARS: 0,
        },
    )
    reader.Reload()
    return reader


def decode(image_event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


def hparams_data(reader, kind):
    metadata = reader.SummaryMetadata(f"_hparams_/{kind}")
    assert metadata.plugin_data.plugin_name == "hparams"
    return plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content)


def session_values(reader) -> dict:
    start = hparams_data(reader, "session_start_info").session_start_info
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def expected_values(config, settings=None) -> dict:
    values = summaries.run_hparams(config, settings)
    return {
        k: v if isinstance(v, (str, bool)) else pytest.approx(float(v)) for k, v in values.items()
    }


@pytest.mark.slow
def test_a_run_logs_config_text_pictures_confusions_and_hparams(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(**{"train.eval_every": 2, "train.image_every": 2})
    trainer.train_and_evaluate(config, workdir)
    reader = read_run(os.path.join(workdir, "tensorboard"))
    tags = reader.Tags()

    # The resolved config, as the run wrote it to config.json.
    assert "config/text_summary" in tags["tensors"]
    (text,) = [e.tensor_proto.string_val[0].decode() for e in reader.Tensors("config/text_summary")]
    resolved = json.load(open(os.path.join(workdir, "config.json")))
    assert json.loads("\n".join(line[4:] for line in text.splitlines())) == resolved

    # At each validation (steps 2 and 4): the picture grid and both confusion pictures.
    for tag in ("pictures", "confusion/cluster", "confusion/linear"):
        assert [e.step for e in reader.Images(tag)] == [2, 4], tag
    grid = decode(reader.Images("pictures")[-1])
    on_disk = np.asarray(Image.open(os.path.join(workdir, "images", "step_000004.png")))
    np.testing.assert_array_equal(grid, on_disk)  # the same grid as images/
    confusion = decode(reader.Images("confusion/cluster")[-1])
    assert confusion.shape[0] > 6 * 28 and confusion.shape[1] > 6 * 28

    # The HParams dashboard: the run is one session with its hyperparameters, and the
    # experiment names them and the validation metrics.
    resolved_config = config_lib.resolve(config, workdir)
    assert session_values(reader) == expected_values(resolved_config)
    experiment = hparams_data(reader, "experiment").experiment
    assert {h.name for h in experiment.hparam_infos} == set(summaries.run_hparams(config))
    assert not any(h.differs for h in experiment.hparam_infos)  # one session
    assert [m.name.tag for m in experiment.metric_infos] == list(summaries.HPARAM_METRICS)
    for metric in summaries.HPARAM_METRICS:  # each metric is a scalar of the session's run
        assert metric in tags["scalars"], metric
    assert {e.step for e in reader.Scalars("val/cluster_miou")} == {2, 4}


@pytest.mark.slow
def test_a_sweep_logs_one_hparams_session_and_run_per_member(tmp_path):
    from sweep_test import sweep_config

    workdir = str(tmp_path / "sweep")
    config = sweep_config()
    population.train_and_evaluate(config, workdir)
    logdir = os.path.join(workdir, "tensorboard")
    table = json.load(open(os.path.join(workdir, "sweep_members.json")))
    resolved = config_lib.resolve(config, workdir)
    main = read_run(logdir)
    assert "config/text_summary" in main.Tags()["tensors"]
    experiment = hparams_data(main, "experiment").experiment
    infos = {h.name: h for h in experiment.hparam_infos}
    assert set(infos) == set(summaries.run_hparams(resolved))
    # What differs between members (the dashboard shows it first), with the values seen.
    assert {name for name, h in infos.items() if h.differs} == {
        "loss.depth_weight", "loss.sampling"
    }  # fmt: skip
    weight = infos["loss.depth_weight"].domain_interval
    assert (weight.min_value, weight.max_value) == (0.0, pytest.approx(0.3))
    sampling = infos["loss.sampling"].domain_discrete.values
    assert [v.string_value for v in sampling] == ["fps", "random"]
    seen = set()
    for member in table:
        run = os.path.join(logdir, metric_writer.run_directory(member["name"]))
        reader = read_run(run)
        assert session_values(reader) == expected_values(resolved, member["settings"])
        seen.add((member["settings"]["loss.depth_weight"], member["settings"]["loss.sampling"]))
        tags = reader.Tags()
        for metric in summaries.HPARAM_METRICS:  # the member's own scalars, in its run
            assert metric in tags["scalars"], (member["name"], metric)
        assert [e.step for e in reader.Scalars("val/cluster_miou")][:2] == [3, 6]
        assert [e.step for e in reader.Images("confusion/cluster")] == [3, 6]
    assert len(seen) == 4  # the grid's four members, each with its own settings
    saved = json.load(open(os.path.join(workdir, "sweep.json")))
    for row in saved["members"]:  # the final score in each member's run is the table's
        reader = read_run(os.path.join(logdir, metric_writer.run_directory(row["member"])))
        last = reader.Scalars("val/cluster_miou")[-1]
        assert last.step == 6 and last.value == pytest.approx(row["val/cluster_miou"], abs=1e-6)


def test_member_runs_get_safe_distinct_folders(tmp_path):
    assert metric_writer.run_directory("depth0.1") == "depth0.1"
    assert metric_writer.run_directory("a/b") == "a_b"
    assert metric_writer.run_directory("..") == "__"
    with pytest.raises(ValueError, match="clashing TensorBoard run folders"):
        metric_writer.MetricWriter(str(tmp_path), members=["a/b", "a_b"])
    writer = metric_writer.MetricWriter(str(tmp_path), members=["m0", "m1"])
    writer.write(1, {"m0/loss": 1.0, "m1/loss": 2.0, "steps_per_s": 3.0})
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "m0/loss": 1.0, "m1/loss": 2.0, "steps_per_s": 3.0}]
    assert read_run(str(tmp_path / "tensorboard" / "m1")).Scalars("loss")[0].value == 2.0
    assert read_run(str(tmp_path / "tensorboard")).Tags()["scalars"] == ["steps_per_s"]


def test_a_label_free_run_shows_its_monitoring_scalars_beside_the_hyperparameters(tmp_path):
    config = tiny_config()
    writer = metric_writer.MetricWriter(str(tmp_path))
    summaries.log_run_start(writer, config, 0, labelled=False)
    writer.close()
    reader = read_run(str(tmp_path / "tensorboard"))
    experiment = hparams_data(reader, "experiment").experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(summaries.LABEL_FREE_METRICS)
    assert session_values(reader) == expected_values(config)
