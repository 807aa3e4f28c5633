"""The portable inference artifact (runtime/portable.py, `export --format=portable`).

- From an export: the artifact's labels equal `segment`'s for the same images (exactly), its
  code `predict`'s within 1e-5, for a batch size it was not traced with; the sidecar carries
  the classes, palette, resolution and the source export's checksum.
- Slow: a fresh virtual environment holding only jax (the version of this one), numpy and
  flatbuffers (no depthg_jax importable) runs the README's lines on it with the same results,
  and refuses a damaged artifact naming the file; the `--workdir` route of the command bakes
  in exactly the weights of the regular export of the same checkpoint, exporting in a
  one-device process a run trained on eight (simulated) devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from cli import run_cli, run_in_process
from PIL import Image

from depthg_jax import segment
from depthg_jax.data import palette
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import checkpoint, integrity, portable
from depthg_jax.training import exports

REPO = Path(__file__).resolve().parents[1]
RES = 64


def demo_config():
    from depthg_jax import config as config_lib

    config = config_lib.sibling_config(str(REPO / "configs" / "demo.py"), "demo")
    config.data.eval_res = RES
    return config


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    config = demo_config()
    spec = model_lib.ModelSpec.from_config(config)
    params = model_lib.init_params(spec, jax.random.key(3))
    path = tmp_path_factory.mktemp("portable") / "export"
    checkpoint.save_export(str(path), config, params, selection={"checkpoint": "final", "step": 7})
    return str(path)


@pytest.fixture(scope="module")
def artifact(export_dir):
    out = Path(export_dir).parent / "artifact"
    exports.portable_from_export(export_dir, str(out))
    return str(out)


@pytest.fixture(scope="module")
def images():
    """Five 64 x 64 RGB images: noise, two smooth gradients, flat colours."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, RES, dtype=np.float32)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128 + 0 * ramp), -1)
    return np.stack([
        rng.integers(0, 256, (RES, RES, 3)),
        rng.integers(0, 256, (RES, RES, 3)),
        smooth,
        smooth[::-1, ::-1],
        np.full((RES, RES, 3), (30, 160, 90)),
    ]).astype(np.uint8)  # fmt: skip


@pytest.fixture(scope="module")
def segmented(export_dir, images, tmp_path_factory):
    """segment's label maps of `images` by probe (PNG files at the export's resolution)."""
    root = tmp_path_factory.mktemp("segment")
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"im{i}.png")
    labels = {}
    for probe in ("cluster", "linear"):
        out = root.parent / f"{root.name}-{probe}"
        written, errors = segment.segment_folder(
            export_dir, str(root), str(out), res=RES, probe=probe, progress=False
        )
        assert written == len(images) and not errors
        labels[probe] = np.stack(
            [np.asarray(Image.open(out / "labels" / f"im{i}.png")) for i in range(len(images))]
        )
    return labels


def expected_code(export_dir, images):
    config, params = checkpoint.load_export(export_dir)
    spec = model_lib.ModelSpec.from_config(config)
    return np.asarray(model_lib.predict(params, images, spec, True)["code"])


def check_outputs(out: dict, segmented: dict, code: np.ndarray) -> None:
    np.testing.assert_array_equal(out["cluster"], segmented["cluster"])
    np.testing.assert_array_equal(out["linear"], segmented["linear"])
    np.testing.assert_allclose(out["code"], code, atol=1e-5, rtol=0)


def test_the_artifact_gives_segments_labels_and_predicts_code(
    artifact, export_dir, images, segmented
):
    exported, sidecar = portable.load_portable(artifact)
    assert exported.platforms == portable.PLATFORMS == tuple(sidecar["platforms"])
    out = jax.device_get(exported.call(images))  # 5 images: the batch size is symbolic
    assert out["cluster"].dtype == np.int32 and out["cluster"].shape == (5, RES, RES)
    assert len(np.unique(out["cluster"])) > 1 and len(np.unique(out["linear"])) > 1
    check_outputs(out, segmented, expected_code(export_dir, images))
    two = jax.device_get(exported.call(images[:2]))
    np.testing.assert_array_equal(two["cluster"], out["cluster"][:2])


def test_the_sidecar_names_classes_palette_resolution_and_source(artifact, export_dir):
    sidecar = portable.verify_portable(artifact)
    config, params = checkpoint.load_export(export_dir)
    n = config.data.n_classes
    assert sidecar["resolution"] == RES and sidecar["flip"] is True
    assert sidecar["classes"] == palette.class_names("synthetic", n)
    assert sidecar["palette"] == palette.palette_for("synthetic", n).tolist()
    assert sidecar["outputs"]["code"]["shape"] == ["batch", RES // 8, RES // 8, config.model.dim]
    source = sidecar["source"]
    assert source["kind"] == "export" and source["path"] == export_dir
    manifest = os.path.join(export_dir, integrity.MANIFEST)
    assert source["manifest_sha256"] == integrity.file_digest(manifest)
    assert source["selection"] == {"checkpoint": "final", "step": 7}
    assert sidecar["params_sha256"] == portable.params_digest(params)
    assert sidecar["model"]["attention"] == "xla"
    assert sorted(os.listdir(artifact)) == ["MANIFEST.json", "model.jax", "portable.json"]


def test_noflip_and_another_resolution_are_baked_in(export_dir, images, tmp_path):
    out = tmp_path / "noflip"
    sidecar = exports.portable_from_export(export_dir, str(out), res=32, flip=False)
    assert sidecar["resolution"] == 32 and sidecar["flip"] is False
    exported, _ = portable.load_portable(str(out))
    small = images[:, ::2, ::2]
    config, params = checkpoint.load_export(export_dir)
    spec = model_lib.ModelSpec.from_config(config)
    want = model_lib.predict(params, small, spec, False)
    got = jax.device_get(exported.call(small))
    np.testing.assert_allclose(got["code"], want["code"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="resolution 36 must be a positive multiple of the patch "
                       "size 8"):  # fmt: skip
        exports.portable_from_export(export_dir, str(tmp_path / "bad"), res=36)
    assert not (tmp_path / "bad").exists()


def test_cudnn_attention_is_never_baked_in(export_dir, monkeypatch):
    """On a CUDA host a bfloat16 backbone would trace cuDNN attention, which lowers for CUDA
    only: the artifact takes XLA's attention instead and still lowers for every platform."""
    from depthg_jax.models import vit

    config, params = checkpoint.load_export(export_dir)
    spec = dataclasses.replace(model_lib.ModelSpec.from_config(config), dtype="bfloat16")
    assert spec.backbone.resolved_attention() == "xla"  # on this CPU
    monkeypatch.setattr(vit, "backend_platform", lambda: "cuda")
    assert spec.backbone.resolved_attention() == "cudnn"
    assert portable.portable_spec(spec).backbone.resolved_attention() == "xla"
    exported = portable.export_inference(spec, params, res=RES, flip=True)
    assert set(exported.platforms) == set(portable.PLATFORMS)
    from depthg_jax import programs

    assert programs.custom_calls(exported.mlir_module()) <= programs.ALLOWED_CUSTOM_CALLS


def damage(artifact: str, tmp_path: Path, name: str) -> str:
    """A copy of the artifact with one byte of `name` flipped."""
    copy = tmp_path / f"damaged-{name}"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    return str(copy)


@pytest.mark.parametrize("name", [portable.MODEL_FILE, portable.SIDECAR])
def test_a_damaged_artifact_is_refused_naming_the_file(artifact, tmp_path, name):
    damaged = damage(artifact, tmp_path, name)
    with pytest.raises(integrity.IntegrityError, match=rf"{re.escape(name)} fails its SHA-256"):
        portable.load_portable(damaged)
    os.remove(os.path.join(damaged, name))
    with pytest.raises(integrity.IntegrityError, match=rf"{re.escape(name)} is missing"):
        portable.load_portable(damaged)


def test_the_command_converts_an_export_and_verifies_the_artifact(export_dir, tmp_path, capsys):
    from absl import app

    from depthg_jax import export as command

    def run(args):
        return run_in_process(command.define_flags, command.run, args)

    assert command.FORMATS == exports.FORMATS  # the command names them without importing JAX
    out = tmp_path / "by-command"
    for args, message in (
        ([f"--export={export_dir}", f"--out={out}"], "add --format=portable"),
        ([f"--export={export_dir}", "--format=portable", f"--out={out}", "--best"],
         "give one or the other"),
        ([f"--workdir={tmp_path}", f"--out={out}", "--res=64"], "apply to --format=portable"),
    ):  # fmt: skip
        with pytest.raises(app.UsageError, match=message):
            run(args)
    assert run([f"--export={export_dir}", "--format=portable", f"--out={out}", "--noflip"]) == 0
    assert f"to {out}: 64 x 64 px, for cpu, cuda, tpu" in capsys.readouterr().out
    assert run([f"--verify={out}"]) == 0
    assert "portable artifact intact (for cpu, cuda, tpu" in capsys.readouterr().out
    assert run([f"--export={export_dir}", "--format=portable", f"--out={out}"]) == 1
    assert f"--out={out} exists; choose a new folder" in capsys.readouterr().err
    damaged = damage(str(out), tmp_path, portable.MODEL_FILE)
    assert run([f"--verify={damaged}"]) == 1
    assert f"{damaged}/{portable.MODEL_FILE} fails its SHA-256" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Without depthg_jax: a fresh virtual environment with jax, numpy and flatbuffers only
# --------------------------------------------------------------------------------------

ALLOWED_DISTRIBUTIONS = {
    # what `pip install jax jaxlib numpy flatbuffers` brings, and the venv's own tools
    "jax", "jaxlib", "numpy", "flatbuffers", "ml-dtypes", "opt-einsum", "scipy", "pip",
    "setuptools", "wheel",
}  # fmt: skip


def readme_lines() -> str:
    """The README's lines that run an artifact without this package."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Portable inference", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)\n```", section, flags=re.S)
    return code


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    """The python of a fresh venv with jax==this jax, numpy and flatbuffers from the registry
    (made once per test session)."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    version = jax.__version__
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         f"jax=={version}", f"jaxlib=={version}", "numpy", "flatbuffers"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return python


def run_bare(python: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    return subprocess.run(
        [python, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_a_bare_environment_runs_the_readme_lines_with_segments_labels(
    bare_python, artifact, export_dir, images, segmented, tmp_path
):
    listed = run_bare(bare_python, "-m", "pip", "list", "--format=json", cwd=tmp_path)
    names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert names <= ALLOWED_DISTRIBUTIONS, names - ALLOWED_DISTRIBUTIONS
    probe = run_bare(bare_python, "-c", "import depthg_jax", cwd=tmp_path)
    assert probe.returncode != 0 and "No module named 'depthg_jax'" in probe.stderr
    version = run_bare(bare_python, "-c", "import jax; print(jax.__version__)", cwd=tmp_path)
    assert version.stdout.strip() == jax.__version__

    script = tmp_path / "run_portable.py"
    script.write_text(readme_lines())
    np.save(tmp_path / "images.npy", images)
    done = run_bare(
        bare_python, script, artifact, tmp_path / "images.npy", tmp_path / "out.npz", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as out:
        check_outputs(dict(out), segmented, expected_code(export_dir, images))

    for name in (portable.MODEL_FILE, portable.SIDECAR):
        damaged = damage(artifact, tmp_path, name)
        refused = run_bare(bare_python, script, damaged, tmp_path / "images.npy",
                           tmp_path / f"never-{name}.npz", cwd=tmp_path)  # fmt: skip
        assert refused.returncode != 0
        assert f"{damaged}/{name} does not match MANIFEST.json: damaged" in refused.stderr
        assert not (tmp_path / f"never-{name}.npz").exists()


@pytest.mark.slow
def test_the_workdir_route_bakes_in_the_weights_of_the_same_checkpoint(tmp_path):
    from support import tiny_config

    from depthg_jax.training import trainer

    workdir = tmp_path / "run"
    trainer.train_and_evaluate(tiny_config(**{"train.num_steps": 2}), str(workdir))
    out = tmp_path / "artifact"
    done = run_cli("depthg_jax.export",
                   [f"--workdir={workdir}", "--format=portable", f"--out={out}"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as a portable artifact" in done.stdout
    sidecar = portable.verify_portable(str(out))
    source = sidecar["source"]
    assert source["kind"] == "checkpoint" and source["selection"]["step"] == 2
    step_dir = Path(source["path"])
    assert step_dir == workdir / "checkpoints" / "2"
    assert source["manifest_sha256"] == integrity.file_digest(str(step_dir / integrity.MANIFEST))
    _, params = checkpoint.load_export(str(workdir / "export"))  # the final export: step 2
    assert sidecar["params_sha256"] == portable.params_digest(params)
    verified = run_cli("depthg_jax.export", [f"--verify={out}"])
    assert verified.returncode == 0 and "portable artifact intact" in verified.stdout
