"""DINOv2/DINOv3 weight import: cross-family and register mismatches, safety, URL table."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from depthg_jax.models import convert, convert_v2v3
from depthg_jax.models.convert import (
    OFFICIAL_URLS,
    convert_state_dict,
    expected_shapes,
    load_state_dict,
    normalise_state_dict,
)
from depthg_jax.models.pth import UnsafePickleError
from depthg_jax.models.variants import get_variant
from depthg_jax.models.vit import Dinov3ViT, build_backbone


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


# ----------------------------------------------------------------------------- DINOv3 7B

MU7B = "v3-mu7B/16"  # the 7B's layout (no qkv bias, SwiGLU 2 * dim, 4 storage tokens) at width 32


def hf_7b_structured(seed: int = 0):
    """transformers' DINOv3ViTModel with the 7B's flags (facebook/dinov3-vit7b16-*'s config:
    no query/key/value bias, proj and MLP biases, gated SiLU MLP) at the tiny variant's
    widths; every parameter perturbed so biases, norms, layer scales and tokens matter."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    spec = get_variant(MU7B)
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
        intermediate_size=spec.mlp_hidden, num_register_tokens=spec.registers,
        use_gated_mlp=True, hidden_act="silu", query_bias=False, key_bias=False,
        value_bias=False, proj_bias=True, mlp_bias=True, layerscale_value=1e-5,
        attn_implementation="eager",
    )  # fmt: skip
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def official_7b_layout(hf: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """transformers' in-memory names -> the official dinov3_vit7b16 file's names, with what
    that file holds besides: rope_embed.periods and the training-only local_cls_norm (random
    here: the converter must drop it)."""
    renames = [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.register_tokens$", "storage_tokens"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (r"^model\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (r"^model\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^model\.layer\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.w1."),
        (r"^model\.layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.w2."),
        (r"^model\.layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.w3."),
        (r"^model\.layer\.(\d+)\.(norm\d)\.", r"blocks.\1.\2."),
    ]
    out, c = {}, hf["norm.weight"].shape[0]
    for key, value in hf.items():
        if m := re.match(r"^model\.layer\.(\d+)\.attention\.q_proj\.weight$", key):
            parts = [hf[key.replace("q_proj", f"{x}_proj")] for x in "qkv"]
            out[f"blocks.{m.group(1)}.attn.qkv.weight"] = np.concatenate(parts)
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, c)
        elif not re.match(r"^model\.layer\.\d+\.attention\.[kv]_proj\.", key):
            out[functools.reduce(lambda k, r: re.sub(*r, k), renames, key)] = value
    rng = np.random.default_rng(seed)
    head_dim = c // get_variant(MU7B).heads
    out["rope_embed.periods"] = 100.0 ** (4 * np.arange(head_dim // 4) / head_dim)
    out["local_cls_norm.weight"] = rng.standard_normal(c)
    out["local_cls_norm.bias"] = rng.standard_normal(c)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def test_7b_layout_round_trips_and_matches_transformers(tmp_path):
    """HF safetensors, HF in-memory names and the official .pth layout convert to the same
    params, whose tree is the model's own; the forward equals DINOv3ViTModel (<= 1e-4)."""
    model = hf_7b_structured()
    memory = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert not any(re.search(r"\.[qkv]_proj\.bias$", k) for k in memory)  # the 7B's layout
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    from_file = convert_state_dict(load_state_dict(tmp_path / "hf" / "model.safetensors"), MU7B)
    from_memory = convert_state_dict(normalise_state_dict(memory), MU7B)
    official = official_7b_layout(memory)
    assert not any(k.startswith("blocks.0.attn.qkv.bias") for k in official)
    torch.save({k: torch.from_numpy(v) for k, v in official.items()}, tmp_path / "official.pth")
    from_pth = convert_state_dict(load_state_dict(tmp_path / "official.pth"), MU7B)
    for other in (from_memory, from_pth):
        for a, b in zip(_leaves(from_file), _leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)
    x0 = jax.ShapeDtypeStruct((1, 32, 48, 3), jnp.float32)
    init = jax.eval_shape(lambda x: build_backbone(MU7B).init(jax.random.key(0), x), x0)
    assert jax.tree.map(lambda a: a.shape, init["params"]) == jax.tree.map(
        lambda a: a.shape, from_file
    )
    assert sorted(from_file["blocks_0"]["attn"]["qkv"]) == ["kernel"]
    spec = get_variant(MU7B)
    for shape in [(2, 224, 224, 3), (1, 96, 160, 3)]:
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            out = model(torch.from_numpy(x).permute(0, 3, 1, 2), output_attentions=True)
        vit = Dinov3ViT(MU7B)
        feats, attn = vit.apply({"params": from_file}, x, return_attention=True)
        (tokens,) = vit.apply(
            {"params": from_file}, x, layers=(spec.depth,), method="intermediate_tokens"
        )
        ref = out.last_hidden_state.numpy()
        err = max(float(np.abs(feats.reshape(ref[:, 5:].shape) - ref[:, 5:]).max()),
                  float(np.abs(tokens - ref).max()))  # fmt: skip
        print(f"{MU7B} vs DINOv3ViTModel at {shape[1:3]}: max {err:.2e}")
        assert err <= 1e-4
        np.testing.assert_allclose(attn, out.attentions[-1].numpy(), atol=1e-5, rtol=0)


def test_7b_layout_mismatches_and_training_norm_checks():
    with pytest.raises(ValueError, match=r"'v3-mu\+/16' .*SwiGLU\): they are a DINOv3, .*SwiGLU, "
                       r"no qkv bias checkpoint, i\.e\. variant 'v3-mu7B/16'"):  # fmt: skip
        convert_state_dict(zeros(MU7B), "v3-mu+/16")
    with pytest.raises(ValueError, match=r"'v3-mu7B/16' \(DINOv3.*no qkv bias\): .*"
                       r"i\.e\. variant 'v3-mu\+/16'"):  # fmt: skip
        convert_state_dict(zeros("v3-mu+/16"), MU7B)
    bad = dict(zeros(MU7B), **{"local_cls_norm.weight": np.ones(31, np.float32)})
    with pytest.raises(ValueError, match=r"local_cls_norm\.weight: expected shape \(32,\)"):
        convert_state_dict(bad, MU7B)
    kept = dict(zeros(MU7B), **{"local_cls_norm.bias": np.ones(32, np.float32)})
    assert "local_cls_norm" not in convert_state_dict(kept, MU7B)


def test_7b_full_size_layout():
    """v3-7B/16's checkpoint keys and the model's own params agree at full size (abstractly:
    ~6.7B parameters), with the 7B's widths and no qkv bias."""
    shapes = expected_shapes("v3-7B/16", 0)
    assert shapes["blocks.39.mlp.w1.weight"] == (8192, 4096)
    assert shapes["blocks.0.attn.qkv.weight"] == (3 * 4096, 4096)
    assert "blocks.0.attn.qkv.bias" not in shapes and "blocks.40.norm1.weight" not in shapes
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    init = jax.eval_shape(lambda x: build_backbone("v3-7B/16").init(jax.random.key(0), x), x)
    n_model = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(init["params"]))
    assert n_model == sum(int(np.prod(s)) for s in shapes.values())
    assert 6.6e9 < n_model < 6.8e9, n_model
    assert len(jax.tree.leaves(init["params"])) == len(shapes)
    hint = convert_v2v3.dinov3_weights_hint("v3-7B/16")
    assert "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth" in hint
