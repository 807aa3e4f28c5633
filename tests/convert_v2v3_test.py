"""DINOv2/DINOv3 weight import: cross-family and register mismatches, safety, URL table."""

import os

import numpy as np
import pytest
import torch

from depthg_jax.models import convert
from depthg_jax.models.convert import (
    OFFICIAL_URLS,
    convert_state_dict,
    expected_shapes,
    load_state_dict,
)
from depthg_jax.models.pth import UnsafePickleError


def zeros(variant: str, positions: int = 37 * 37) -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in expected_shapes(variant, positions).items()}


@pytest.mark.parametrize(
    "weights,variant,message",
    [
        ("S/8", "v2-S/14", r"variant 'v2-S/14' \(DINOv2, .*they are a DINO \(v1\), patch 8, dim "
         r"384, depth 12.*i\.e\. variant 'S/8'"),
        ("mu/8", "v3-mu/16", r"'v3-mu/16' \(DINOv3.*a DINO \(v1\).*variant 'mu/8'"),
        ("v2reg-mu/14", "v2-mu/14", r"variant 'v2-mu/14' \(DINOv2, .* 0 register tokens\): they "
         r"are a DINOv2 registers checkpoint \(4 register tokens\), i\.e\. variant 'v2reg-mu/14'"),
        ("v2-mu/14", "v2reg-mu/14", r"a DINOv2 checkpoint without registers \(0 register "
         r"tokens\), i\.e\. variant 'v2-mu/14'"),
        ("v3-mu/16", "v2reg-mu/14", r"they are a DINOv3, patch 16.*variant 'v3-mu/16'"),
        ("v2-mu/14", "v3-mu/16", r"'v3-mu/16' \(DINOv3.*they are a DINOv2, patch 14"),
        ("v2-S/14", "S/16", r"'S/16' \(DINO \(v1\).*they are a DINOv2, patch 14, dim 384.*"
         r"'v2-S/14'"),
        ("v3-S/16", "v3-S+/16", r"'v3-S\+/16' .*SwiGLU\): they are a DINOv3, patch 16, dim "
         r"384, depth 12, 4 register tokens checkpoint, i\.e\. variant 'v3-S/16'"),
        ("v2-mug/14", "v2-mu/14", r"they are a DINOv2, .*SwiGLU checkpoint, i\.e\. variant "
         r"'v2-mug/14'"),
    ],
)  # fmt: skip
def test_family_and_register_mismatches_name_both_sides(weights, variant, message):
    with pytest.raises(ValueError, match=message):
        convert_state_dict(zeros(weights), variant)


def test_key_and_shape_errors():
    state = zeros("v2-mu/14")
    bad = dict(state, **{"blocks.1.ls2.gamma": np.zeros(31, np.float32)})
    with pytest.raises(ValueError, match=r"blocks\.1\.ls2\.gamma: expected shape \(32,\) for "
                       r"variant 'v2-mu/14', got \(31,\)"):  # fmt: skip
        convert_state_dict(bad, "v2-mu/14")
    bad = {k: v for k, v in state.items() if k != "mask_token"}
    bad["blocks.0.attn.extra"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"unknown keys \['blocks\.0\.attn\.extra'\], missing "
                       r"keys \['mask_token'\]"):  # fmt: skip
        convert_state_dict(bad, "v2-mu/14")
    bad = dict(state, pos_embed=np.zeros((1, 1 + 12, 32), np.float32))
    with pytest.raises(ValueError, match="not a square grid"):
        convert_state_dict(bad, "v2-mu/14")


def test_training_checkpoint_layouts_load(tmp_path):
    """A DINOv2 training checkpoint: teacher/student, DDP + backbone prefixes, block chunks."""
    state = {k: np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
             for k, v in zeros("v2-mu/14", 16).items()}  # fmt: skip
    chunked = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = k.replace(f"blocks.{i}.", f"blocks.{i // 1}.{i}.", 1)  # one block per chunk
        chunked[f"module.backbone.{k}"] = torch.from_numpy(v)
    chunked["module.dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "teacher.pth"
    torch.save({"teacher": chunked, "student": {}, "iteration": 5}, path)
    loaded = load_state_dict(path)
    assert sorted(loaded) == sorted(state)
    expected = convert_state_dict(state, "v2-mu/14")
    got = convert_state_dict(loaded, "v2-mu/14")
    for a, b in zip(_leaves(expected), _leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k])]
    return [tree]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_dinov2_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = Payload()
    payload.marker = marker
    state = {k: torch.from_numpy(v) for k, v in zeros("v2-mu/14", 16).items()}
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**state, "extra": payload}, path)
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_state_dict(path)
    out = tmp_path / "out"
    assert convert.main(["--variant=v2-mu/14", f"--weights={path}", f"--out={out}"]) == 1
    assert not marker.exists() and not out.exists()


def test_cli_converts_dinov2_and_dinov3_files(tmp_path):
    for variant in ("v2reg-mu/14", "v3-mu/16"):
        state = {k: torch.from_numpy(v) for k, v in zeros(variant, 16).items()}
        path = tmp_path / f"{variant.replace('/', '_')}.pth"
        torch.save(state, path)
        out = tmp_path / f"out_{variant.replace('/', '_')}"
        assert convert.main([f"--variant={variant}", f"--weights={path}", f"--out={out}"]) == 0
        loaded = convert.load_backbone(out, variant)
        expected = convert_state_dict({k: v.numpy() for k, v in state.items()}, variant)
        for a, b in zip(_leaves(expected), _leaves(loaded), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_official_url_table_has_the_dinov2_hub_files():
    base = "https://dl.fbaipublicfiles.com/dinov2/"
    assert OFFICIAL_URLS["v2-S/14"] == base + "dinov2_vits14/dinov2_vits14_pretrain.pth"
    assert OFFICIAL_URLS["v2reg-B/14"] == base + "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    assert OFFICIAL_URLS["v2-g/14"] == base + "dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    assert OFFICIAL_URLS["v2reg-L/14"] == base + "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    assert not any(k.startswith("v3") for k in OFFICIAL_URLS)
