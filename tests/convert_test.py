"""Weight import: file formats, the restricted unpickler, errors, and the CLI."""

import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch_safetensors

from depthg_jax.models import convert
from depthg_jax.models.convert import (
    convert_state_dict,
    expected_shapes,
    load_backbone,
    load_state_dict,
)
from depthg_jax.models.pth import UnsafePickleError, load_pth
from depthg_jax.models.vit import DinoViT

GOLDENS = Path(__file__).parent / "goldens"


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """A random mu/8 state dict with official DINO names (from the timm golden)."""
    data = np.load(GOLDENS / "vit_mu8.npz")
    return {k.removeprefix("sd/"): data[k] for k in data.files if k.startswith("sd/")}


def as_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in state.items()}


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def write_dino_formats(state: dict[str, np.ndarray], directory: Path) -> dict[str, Path]:
    """The same weights as torch writes them in each layout we accept."""
    tensors = as_torch(state)
    paths = {name: directory / name for name in ("plain.pth", "full.pth", "timm.bin")}
    torch.save(tensors, paths["plain.pth"])
    # A DINO training checkpoint: DDP + MultiCropWrapper prefixes, teacher and student, a
    # projection head and bookkeeping; the teacher's backbone is the one to load.
    teacher = {f"module.backbone.{k}": v for k, v in tensors.items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(8, 32)
    student = {k: v + 1 for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 7}, paths["full.pth"])
    torch.save(dict(tensors), paths["timm.bin"])
    paths["timm.safetensors"] = directory / "timm.safetensors"
    save_torch_safetensors(tensors, paths["timm.safetensors"])
    return paths


def test_pth_reader_matches_torch_load(tmp_path):
    """Strided, offset, shared-storage, bf16 and int tensors come back as torch.load sees them."""
    base = torch.randn(6, 5)
    obj = {
        "t": base.t(),
        "slice": base[2:4, 1:],
        "view": base.view(-1)[3:9],
        "bf16": torch.randn(3, 2).bfloat16(),
        "long": torch.arange(4),
        "meta": {"epoch": 3, "name": "x", "list": [1.5, None]},
    }
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    ours = load_pth(path)
    theirs = torch.load(path, weights_only=True)
    for key in ("t", "slice", "view", "long"):
        np.testing.assert_array_equal(ours[key], theirs[key].numpy())
    np.testing.assert_array_equal(ours["bf16"].astype(np.float32), theirs["bf16"].float().numpy())
    assert ours["meta"] == obj["meta"]


def test_all_formats_load_to_identical_params(state, tmp_path):
    expected = convert_state_dict(state, "mu/8")
    for name, path in write_dino_formats(state, tmp_path).items():
        loaded = load_state_dict(path)
        assert sorted(loaded) == sorted(state), name
        assert_trees_equal(convert_state_dict(loaded, "mu/8"), expected)


def test_hf_transformers_safetensors_match_hf_forward(tmp_path):
    """A transformers ViTModel's own save_pretrained file loads and computes its outputs."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        patch_size=8,
        image_size=32,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_act="gelu",
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # re-randomise so biases and LayerNorm affine matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_file = tmp_path / "hf" / "model.safetensors"
    state = load_state_dict(hf_file)
    params = convert_state_dict(state, "mu/8")
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        hidden = model(torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state
    ours = DinoViT("mu/8").apply({"params": params}, images)
    np.testing.assert_allclose(ours, hidden[:, 1:].reshape(2, 4, 4, 32).numpy(), atol=1e-5)
    # The same weights written in the DINO/timm layouts give identical params.
    for path in write_dino_formats(state, tmp_path).values():
        assert_trees_equal(convert_state_dict(load_state_dict(path), "mu/8"), params)


class Payload:
    """Pickles to a call of a dangerous global, as a malicious checkpoint would."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", [os.system, eval, exec, subprocess.getoutput])
def test_malicious_pickle_is_refused_without_running(func, state, tmp_path):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    arg = command if func in (os.system, subprocess.getoutput) else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pth"
    # A real torch file whose pickle also carries the payload next to genuine tensors.
    torch.save({**as_torch(state), "extra": Payload(func, arg)}, path)
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_state_dict(path)
    out = tmp_path / "out"
    assert convert.main(["--variant=mu/8", f"--weights={path}", f"--out={out}"]) == 1
    assert not marker.exists()
    assert not out.exists()


def test_hand_made_zip_with_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Payload(os.system, f"touch {marker}")))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        load_pth(path)
    assert not marker.exists()


def test_corrupt_and_truncated_files_raise(state, tmp_path):
    paths = write_dino_formats(state, tmp_path)
    raw = paths["plain.pth"].read_bytes()
    cases = {
        "truncated.pth": raw[: len(raw) // 2],
        "empty.pth": b"",
        "noise.pth": np.random.default_rng(0).bytes(4096),
        "truncated.safetensors": paths["timm.safetensors"].read_bytes()[:1000],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="corrupt|not a readable"):
            load_state_dict(tmp_path / name)
    # A storage cut short inside an otherwise valid archive.
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(paths["plain.pth"]) as src, zipfile.ZipFile(short, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:8] if "/data/" in info.filename else data)
    with pytest.raises(ValueError, match=r"holds 8 bytes"):
        load_state_dict(short)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pth")


def test_shape_mismatch_names_key_and_shapes(state):
    bad = dict(state)
    bad["blocks.0.mlp.fc1.bias"] = np.zeros(127, np.float32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.bias.*\(128,\).*\(127,\)"):
        convert_state_dict(bad, "mu/8")


def test_unknown_and_missing_keys_are_listed(state):
    bad = {k: v for k, v in state.items() if k != "norm.bias"}
    bad["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unknown keys \['blocks.0.attn.extra'\].*missing keys "):
        convert_state_dict(bad, "mu/8")
    with pytest.raises(ValueError, match=r"missing keys \['norm.bias'\]"):
        convert_state_dict({k: v for k, v in state.items() if k != "norm.bias"}, "mu/8")


def test_mismatched_variant_names_the_right_one(state):
    with pytest.raises(ValueError, match=r"do not match variant 'mu/16'.*variant 'mu/8'"):
        convert_state_dict(state, "mu/16")
    tiny16 = {k: np.zeros(s, np.float32) for k, s in expected_shapes("Ti/16", 196).items()}
    with pytest.raises(ValueError, match=r"do not match variant 'S/16'.*variant 'Ti/16'"):
        convert_state_dict(tiny16, "S/16")
    with pytest.raises(ValueError, match="unknown ViT variant"):
        convert_state_dict(state, "XL/8")


def test_cli_writes_orbax_checkpoint_that_loads(state, tmp_path):
    weights = write_dino_formats(state, tmp_path)["full.pth"]
    out = tmp_path / "converted"
    assert convert.main(["--variant=mu/8", f"--weights={weights}", f"--out={out}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    expected = convert_state_dict(state, "mu/8")
    assert_trees_equal(load_backbone(out, "mu/8"), expected)
    assert_trees_equal(load_backbone(weights, "mu/8"), expected)
    with pytest.raises(ValueError, match="holds a 'mu/8' backbone"):
        load_backbone(out, "mu/16")
    # An existing output is never overwritten.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert convert.main(["--variant=mu/8", f"--weights={weights}", f"--out={out}"]) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant=mu/16"], "do not match variant 'mu/16'"),
        (["--variant=Q/8"], "unknown ViT variant 'Q/8'"),
        (["--variant=mu/8", "--weights=NOFILE"], "does not exist"),
        (["--variant=mu/8", "--weights=TRUNCATED"], "not a readable torch.save zip archive"),
    ],
)
def test_cli_errors_write_nothing(args, message, state, tmp_path, capsys):
    weights = write_dino_formats(state, tmp_path)["plain.pth"]
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:5000])
    args = [a.replace("NOFILE", str(tmp_path / "nope.pth")) for a in args]
    args = [a.replace("TRUNCATED", str(truncated)) for a in args]
    if not any(a.startswith("--weights") for a in args):
        args.append(f"--weights={weights}")
    before = sorted(tmp_path.iterdir())
    assert convert.main([*args, f"--out={tmp_path / 'out'}"]) == 1
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_cli_without_weights_offline_says_how_to_pass_a_file(tmp_path, monkeypatch, capsys):
    def refuse(*_args, **_kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert convert.main(["--variant=S/8", f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "dino_deitsmall8_300ep_pretrain.pth" in err and "--weights=FILE" in err
    assert not (tmp_path / "out").exists()
    assert convert.main(["--variant=mu/8", f"--out={tmp_path / 'out'}"]) == 1
    assert "no official DINO weights for variant 'mu/8'" in capsys.readouterr().err


@pytest.mark.slow
def test_module_cli_runs_as_script_without_torch(state, tmp_path):
    weights = write_dino_formats(state, tmp_path)["full.pth"]
    # The package reads .pth files without torch: the converter never imports it.
    code = (
        "import sys; from depthg_jax.models import convert; "
        f"rc = convert.main(['--variant=mu/8', '--weights={weights}', "
        f"'--out={tmp_path / 'ok'}']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert_trees_equal(load_backbone(tmp_path / "ok", "mu/8"), convert_state_dict(state, "mu/8"))
    result = subprocess.run(
        [sys.executable, "-m", "depthg_jax.models.convert", "--variant=mu/8",
         f"--weights={tmp_path / 'absent.pth'}", f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "absent.pth does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
