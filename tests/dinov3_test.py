"""Dinov3ViT against transformers' DINOv3ViTModel; DINOv3 weight layouts and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel

from depthg_jax.models import convert
from depthg_jax.models.convert import (
    convert_state_dict,
    expected_shapes,
    load_state_dict,
    normalise_state_dict,
)
from depthg_jax.models.variants import VARIANTS, embed_dim, get_variant, patch_size
from depthg_jax.models.vit import Dinov3ViT, build_backbone, rope_periods

TOLERANCE = 1e-4  # fp32 parity bound (measured: below 3e-5)
# bf16 compute vs fp32, v3-S/16 (12 blocks, HF-random weights re-randomised), N(0, 1) images
# at 224, batch 2: max abs error 0.149, mean abs 0.023 on LayerNorm-ed features up to ~5 (CPU).
BF16_MAX = 0.3
BF16_MEAN = 0.04


def hf_model(variant: str, seed: int = 0, **extra):
    spec = get_variant(variant)
    torch.manual_seed(seed)
    config = DINOv3ViTConfig(
        hidden_size=spec.dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.heads,
        intermediate_size=spec.hidden or 4 * spec.dim,
        num_register_tokens=spec.registers,
        use_gated_mlp=spec.swiglu,
        hidden_act="silu" if spec.swiglu else "gelu",
        **extra,
    )
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def official_names(hf: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """transformers' in-memory DINOv3 names -> facebookresearch/dinov3 names, spelled out,
    with the buffers the official files hold: rope_embed.periods and qkv.bias_mask. The key
    bias is given junk values: the official mask zeroes it."""
    c = hf["norm.weight"].shape[0]
    head_dim = c // HEADS[c]
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "storage_tokens": hf["embeddings.register_tokens"],
        "mask_token": hf["embeddings.mask_token"].reshape(1, c),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
        "norm.weight": hf["norm.weight"],
        "norm.bias": hf["norm.bias"],
        "rope_embed.periods": 100.0 ** (2 * np.arange(head_dim // 4) / (head_dim // 2)),
    }
    for i in range(depth):
        h, o = f"model.layer.{i}.", f"blocks.{i}."
        out[o + "attn.qkv.weight"] = np.concatenate(
            [hf[h + f"attention.{x}_proj.weight"] for x in "qkv"]
        )
        junk = np.full(c, 7.0, np.float32)
        out[o + "attn.qkv.bias"] = np.concatenate(
            [hf[h + "attention.q_proj.bias"], junk, hf[h + "attention.v_proj.bias"]]
        )
        out[o + "attn.qkv.bias_mask"] = np.concatenate([np.ones(c), np.zeros(c), np.ones(c)])
        for kind in ("weight", "bias"):
            out[o + f"attn.proj.{kind}"] = hf[h + f"attention.o_proj.{kind}"]
            for norm in ("norm1", "norm2"):
                out[o + f"{norm}.{kind}"] = hf[h + f"{norm}.{kind}"]
            if h + "mlp.gate_proj.weight" in hf:  # SwiGLUFFN: w1 gate, w2 up, w3 down
                out[o + f"mlp.w1.{kind}"] = hf[h + f"mlp.gate_proj.{kind}"]
                out[o + f"mlp.w2.{kind}"] = hf[h + f"mlp.up_proj.{kind}"]
                out[o + f"mlp.w3.{kind}"] = hf[h + f"mlp.down_proj.{kind}"]
            else:
                out[o + f"mlp.fc1.{kind}"] = hf[h + f"mlp.up_proj.{kind}"]
                out[o + f"mlp.fc2.{kind}"] = hf[h + f"mlp.down_proj.{kind}"]
        out[o + "ls1.gamma"] = hf[h + "layer_scale1.lambda1"]
        out[o + "ls2.gamma"] = hf[h + "layer_scale2.lambda1"]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


HEADS = {32: 2, 384: 6, 768: 12, 1024: 16}


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def forward(variant, params, x, dtype=jnp.float32):
    model = Dinov3ViT(variant, dtype=dtype)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)


@torch.no_grad()
def hf_features(model, x, registers):
    hidden = model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
    b, h, w, _ = x.shape
    return hidden[:, 1 + registers :].reshape(b, h // 16, w // 16, -1).numpy()


def all_sources_params(model, variant, tmp_path):
    spec = get_variant(variant)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_file = tmp_path / "hf" / "model.safetensors"
    assert any(k.startswith("layer.0.") for k in load_file(hf_file))  # hub naming
    from_file = convert_state_dict(load_state_dict(hf_file), variant)
    memory = numpy_state(model)
    from_memory = convert_state_dict(normalise_state_dict(memory), variant)
    official = official_names(memory, spec.depth)
    torch.save({k: torch.from_numpy(v) for k, v in official.items()}, tmp_path / "official.pth")
    from_pth = convert_state_dict(load_state_dict(tmp_path / "official.pth"), variant)
    assert_trees_equal(from_file, from_memory)
    assert_trees_equal(from_file, from_pth)
    return from_file


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v3-S/16", "v3-S+/16"])
def test_matches_transformers_at_real_width(variant, tmp_path):
    """Full-depth ViT-S/16 and S+/16 (SwiGLU) at 224 and at 320 or a non-square 224 x 320."""
    spec = get_variant(variant)
    model = hf_model(variant)
    params = all_sources_params(model, variant, tmp_path)
    second = (1, 320, 320, 3) if variant == "v3-S/16" else (1, 224, 320, 3)
    for shape in [(2, 224, 224, 3), second]:
        x = images(shape)
        ours = forward(variant, params, x)
        ref = hf_features(model, x, spec.registers)
        assert ours.shape == ref.shape and ours.dtype == jnp.float32
        np.testing.assert_allclose(ours, ref, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("variant", ["v3-mu/16", "v3-mu+/16"])
def test_tiny_variants_match_transformers_and_attention(variant, tmp_path):
    spec = get_variant(variant)
    model = hf_model(variant, seed=1, attn_implementation="eager")
    params = all_sources_params(model, variant, tmp_path)
    for hw in ((224, 224), (96, 480)):
        x = images((2, *hw, 3), seed=hw[1])
        ours, attn = Dinov3ViT(variant).apply({"params": params}, x, return_attention=True)
        with torch.no_grad():
            out = model(torch.from_numpy(x).permute(0, 3, 1, 2), output_attentions=True)
        t = 1 + spec.registers + (hw[0] // 16) * (hw[1] // 16)
        np.testing.assert_allclose(
            ours, out.last_hidden_state[:, 1 + spec.registers :].reshape(ours.shape).numpy(),
            atol=TOLERANCE, rtol=0,
        )  # fmt: skip
        assert attn.shape == (2, spec.heads, t, t)
        np.testing.assert_allclose(attn, out.attentions[-1].numpy(), atol=1e-5, rtol=0)


def test_rope_periods_match_transformers():
    model = hf_model("v3-mu/16")
    np.testing.assert_allclose(1 / rope_periods(16), model.rope_embeddings.inv_freq.numpy())


@pytest.mark.slow
def test_bf16_forward_error():
    model = hf_model("v3-S/16")
    params = convert_state_dict(normalise_state_dict(numpy_state(model)), "v3-S/16")
    x = images((2, 224, 224, 3))
    f32 = forward("v3-S/16", params, x)
    bf16 = forward("v3-S/16", params, x, jnp.bfloat16)
    err = jnp.abs(f32 - bf16)
    print(f"v3-S/16 bf16 vs fp32 at 224: max {float(err.max()):.4f} mean {float(err.mean()):.5f}")
    assert bf16.dtype == jnp.float32
    assert 0 < float(err.max()) <= BF16_MAX
    assert float(err.mean()) <= BF16_MEAN


# The 7B's zero state dict alone would be 27 GB: its shapes follow the same code as v3-mu7B,
# and tests/convert_v2v3_test.py checks its full-size layout abstractly.
V3_VARIANTS = sorted(
    v for v in VARIANTS if get_variant(v).family == "v3" and "H+" not in v and "7B/" not in v
)


@pytest.mark.parametrize(
    "variant",  # the large widths take seconds each to initialise: slow
    [pytest.param(v, marks=pytest.mark.slow) if "L/" in v else v for v in V3_VARIANTS],
)
def test_init_params_mirror_checkpoint_shapes(variant):
    p = patch_size(variant)
    x = jax.ShapeDtypeStruct((1, 2 * p, 3 * p, 3), jnp.float32)
    backbone = build_backbone(variant)
    assert isinstance(backbone, Dinov3ViT)
    init = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x), x)
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(variant, 0).items()}
    shapes = jax.tree.map(lambda a: a.shape, init["params"])
    assert shapes == jax.tree.map(lambda a: a.shape, convert_state_dict(state, variant))
    out = jax.eval_shape(lambda v, x: backbone.apply(v, x), init, x)
    assert out.shape == (1, 2, 3, embed_dim(variant))


def test_registry_lookups():
    assert patch_size("v3-S/16") == 16 and embed_dim("v3-B/16") == 768
    assert embed_dim("v3-L/16") == 1024 and get_variant("v3-S+/16").swiglu


def test_bad_images_raise():
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes("v3-mu/16", 0).items()}
    params = convert_state_dict(state, "v3-mu/16")
    with pytest.raises(ValueError, match="image size 224x230 is not a positive multiple of the "
                       "patch size 16"):  # fmt: skip
        Dinov3ViT("v3-mu/16").apply({"params": params}, jnp.zeros((1, 224, 230, 3)))
    with pytest.raises(ValueError, match="'v2-mu/14' is a v2 variant"):
        Dinov3ViT("v2-mu/14").apply({"params": params}, jnp.zeros((1, 224, 224, 3)))


def test_wrong_rope_periods_and_bias_mask_raise():
    model = hf_model("v3-mu/16")
    official = official_names(numpy_state(model), 2)
    bad = dict(official, **{"rope_embed.periods": official["rope_embed.periods"] * 2})
    with pytest.raises(ValueError, match="rope_embed.periods .* differ from the base-100"):
        convert_state_dict(bad, "v3-mu/16")
    half_mask = np.full_like(official["blocks.0.attn.qkv.bias_mask"], 0.5)
    bad = dict(official, **{"blocks.0.attn.qkv.bias_mask": half_mask})
    with pytest.raises(ValueError, match="bias_mask holds values other than 0 and 1"):
        convert_state_dict(bad, "v3-mu/16")
    # A NaN mask is refused earlier, by the check every weight passes, naming the tensor.
    nan_mask = np.full_like(official["blocks.0.attn.qkv.bias_mask"], np.nan)
    bad = dict(official, **{"blocks.0.attn.qkv.bias_mask": nan_mask})
    with pytest.raises(ValueError, match=r"NaN/inf values: blocks\.0\.attn\.qkv\.bias_mask"):
        convert_state_dict(bad, "v3-mu/16")


def test_dinov3_weights_are_local_only(tmp_path, capsys):
    assert convert.main(["--variant=v3-S/16", f"--out={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "gated" in err and "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in err
    assert "facebook/dinov3-vits16-pretrain-lvd1689m" in err and "--weights=FILE" in err
    assert not (tmp_path / "out").exists()


def test_intermediate_tokens_match_transformers_backbone():
    """intermediate_tokens' patch tokens == DINOv3ViTBackbone's feature maps (stage i = block
    i's output, LayerNorm-ed, reshape_hidden_states=False); CLS and storage tokens lead."""
    spec = get_variant("v3-mu/16")
    torch.manual_seed(4)
    config = DINOv3ViTConfig(
        hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads,
        intermediate_size=spec.mlp_hidden, num_register_tokens=spec.registers,
        out_features=["stage1", "stage2"], apply_layernorm=True, reshape_hidden_states=False,
    )  # fmt: skip
    model = DINOv3ViTBackbone(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = convert_state_dict(normalise_state_dict(numpy_state(model)), "v3-mu/16")
    x = images((2, 96, 160, 3), seed=7)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).feature_maps
    ours = Dinov3ViT("v3-mu/16").apply(
        {"params": params}, x, layers=(1, 2), method="intermediate_tokens"
    )
    for got, exp in zip(ours, ref, strict=True):
        assert got.shape == (2, 1 + spec.registers + 6 * 10, spec.dim)
        np.testing.assert_allclose(got[:, 1 + spec.registers :], exp.numpy(), atol=1e-5, rtol=0)
