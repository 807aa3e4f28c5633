"""Dinov2ViT against transformers' Dinov2Model / Dinov2WithRegistersModel and torch resizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import (
    Dinov2Backbone,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from depthg_jax.models.convert import (
    convert_state_dict,
    expected_shapes,
    load_state_dict,
    normalise_state_dict,
)
from depthg_jax.models.variants import VARIANTS, embed_dim, get_variant, patch_size
from depthg_jax.models.vit import Dinov2ViT, build_backbone
from depthg_jax.models.vit import resize_pos_embed as resize_pos_embed_v2

TOLERANCE = 1e-4  # fp32 parity bound asked of every family (measured: below 3e-5)
# bf16 compute vs fp32, v2-S/14 and v2reg-S/14 (12 blocks, HF-random weights re-randomised),
# N(0, 1) images at 224, batch 2: max abs error 0.162 (v2-S/14) and 0.134 (v2reg-S/14), mean
# abs 0.020 and 0.018, on LayerNorm-ed features up to ~5 (one run, CPU).
BF16_MAX = 0.25
BF16_MEAN = 0.03


def hf_config(variant: str, **extra):
    spec = get_variant(variant)
    kwargs = dict(
        hidden_size=spec.dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.heads,
        image_size=518,
        patch_size=14,
        use_swiglu_ffn=spec.swiglu,
        **extra,
    )
    if spec.registers:
        kwargs.pop("use_swiglu_ffn")
        return Dinov2WithRegistersModel, Dinov2WithRegistersConfig(
            num_register_tokens=spec.registers, **kwargs
        )
    return Dinov2Model, Dinov2Config(**kwargs)


def hf_model(variant: str, seed: int = 0, **extra):
    """A random transformers model; every parameter perturbed so biases, LayerNorm affine,
    LayerScale and tokens all matter."""
    torch.manual_seed(seed)
    cls, config = hf_config(variant, **extra)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def official_names(hf: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """transformers' in-memory DINOv2 names -> facebookresearch/dinov2 names, spelled out."""
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "mask_token": hf["embeddings.mask_token"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    if "embeddings.register_tokens" in hf:
        out["register_tokens"] = hf["embeddings.register_tokens"]
    for i in range(depth):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[o + f"attn.qkv.{kind}"] = np.concatenate(
                [hf[h + f"attention.{x}_proj.{kind}"] for x in "qkv"]
            )
            out[o + f"attn.proj.{kind}"] = hf[h + f"attention.o_proj.{kind}"]
            for norm in ("norm1", "norm2"):
                out[o + f"{norm}.{kind}"] = hf[h + f"{norm}.{kind}"]
            if h + "mlp.fc1.weight" in hf:
                out[o + f"mlp.fc1.{kind}"] = hf[h + f"mlp.fc1.{kind}"]
                out[o + f"mlp.fc2.{kind}"] = hf[h + f"mlp.fc2.{kind}"]
            else:  # SwiGLUFFNFused: w12 = [w1; w2], w3
                out[o + f"mlp.w12.{kind}"] = np.concatenate(
                    [hf[h + f"mlp.gate_proj.{kind}"], hf[h + f"mlp.up_proj.{kind}"]]
                )
                out[o + f"mlp.w3.{kind}"] = hf[h + f"mlp.down_proj.{kind}"]
        out[o + "ls1.gamma"] = hf[h + "layer_scale1.lambda1"]
        out[o + "ls2.gamma"] = hf[h + "layer_scale2.lambda1"]
    return out


def numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@torch.no_grad()
def hf_features(model, x: np.ndarray, registers: int) -> np.ndarray:
    hidden = model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
    b, h, w, _ = x.shape
    return hidden[:, 1 + registers :].reshape(b, h // 14, w // 14, -1).numpy()


def forward(variant, params, x, mode="official", dtype=jnp.float32):
    model = Dinov2ViT(variant, dtype=dtype, pos_interpolation=mode)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)


def all_sources_params(model, variant, tmp_path):
    """Params converted from the HF file, HF in-memory names and an official-named .pth
    written by torch.save: all must be identical."""
    spec = get_variant(variant)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_file = tmp_path / "hf" / "model.safetensors"
    assert any(".attention.attention.query." in k for k in load_file(hf_file))  # hub naming
    from_file = convert_state_dict(load_state_dict(hf_file), variant)
    memory = numpy_state(model)
    from_memory = convert_state_dict(normalise_state_dict(memory), variant)
    official = official_names(memory, spec.depth)
    torch.save({k: torch.from_numpy(v) for k, v in official.items()}, tmp_path / "official.pth")
    from_pth = convert_state_dict(load_state_dict(tmp_path / "official.pth"), variant)
    assert_trees_equal(from_file, from_memory)
    assert_trees_equal(from_file, from_pth)
    assert_trees_equal(from_file, convert_state_dict(official, variant))
    return from_file


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v2-S/14", "v2reg-S/14"])
def test_matches_transformers_at_real_width(variant, tmp_path):
    """Full-depth ViT-S/14 (with and without registers) at 224 (pos-embed resized from 37 to
    16) and at 448 (37 -> 32) or a non-square 224 x 336, from four weight sources. (The
    register models resize alike in both references: test_resize_pos_embed_matches_torch.)"""
    spec = get_variant(variant)
    model = hf_model(variant)
    params = all_sources_params(model, variant, tmp_path)
    second = (1, 224, 336, 3) if spec.registers else (1, 448, 448, 3)
    for shape in [(2, 224, 224, 3), second]:
        x = images(shape)
        ours = forward(variant, params, x, mode="transformers")
        ref = hf_features(model, x, spec.registers)
        assert ours.shape == ref.shape and ours.dtype == jnp.float32
        np.testing.assert_allclose(ours, ref, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("variant", ["v2-mu/14", "v2-mug/14", "v2reg-mu/14"])
def test_tiny_variants_match_transformers_and_attention(variant, tmp_path):
    """Tiny variants (incl. the fused SwiGLU of ViT-g) and the last block's attention."""
    spec = get_variant(variant)
    model = hf_model(variant, seed=1, attn_implementation="eager")
    params = all_sources_params(model, variant, tmp_path)
    for size in (322, 518):  # a resized grid (23 x 23) and the stored one
        x = images((2, size, size, 3), seed=size)
        ours, attn = Dinov2ViT(variant, pos_interpolation="transformers").apply(
            {"params": params}, x, return_attention=True
        )
        with torch.no_grad():
            out = model(torch.from_numpy(x).permute(0, 3, 1, 2), output_attentions=True)
        n = (size // 14) ** 2
        np.testing.assert_allclose(
            ours, out.last_hidden_state[:, 1 + spec.registers :].reshape(ours.shape).numpy(),
            atol=TOLERANCE, rtol=0,
        )  # fmt: skip
        assert attn.shape == (2, spec.heads, 1 + spec.registers + n, 1 + spec.registers + n)
        np.testing.assert_allclose(attn, out.attentions[-1].numpy(), atol=1e-5, rtol=0)


def test_official_interpolation_matches_reference_composition(tmp_path):
    """facebookresearch/dinov2 (no registers) resizes with scale_factor (g + 0.1) / 37. The
    reference: torch's F.interpolate with those arguments, fed to transformers' model as its
    stored embeddings (so transformers does not resize again)."""
    variant = "v2-mu/14"
    model = hf_model(variant, seed=2)
    params = convert_state_dict(normalise_state_dict(numpy_state(model)), variant)
    pos = model.embeddings.position_embeddings.detach()
    for g in (16, 23):
        grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(
            grid, scale_factor=((g + 0.1) / 37, (g + 0.1) / 37), mode="bicubic",
            antialias=False,
        )  # fmt: skip
        assert resized.shape[-2:] == (g, g)
        ref_model = hf_model(variant, seed=2)
        ref_model.config.image_size = 14 * g
        with torch.no_grad():
            new = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1)
            ref_model.embeddings.position_embeddings = torch.nn.Parameter(new)
        x = images((2, 14 * g, 14 * g, 3), seed=g)
        ours = forward(variant, params, x, mode="official")
        np.testing.assert_allclose(ours, hf_features(ref_model, x, 0), atol=TOLERANCE, rtol=0)
        # The two references really differ here, so the option matters.
        assert np.abs(ours - forward(variant, params, x, mode="transformers")).max() > 1e-3


@pytest.mark.parametrize("g0", [37, 16])
@pytest.mark.parametrize("grid", [(16, 16), (32, 32), (23, 46), (8, 5), (40, 37), (1, 2)])
def test_resize_pos_embed_matches_torch(g0, grid):
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + g0 * g0, 6)).astype(np.float32)
    t = torch.from_numpy(pos[:, 1:]).reshape(1, g0, g0, 6).permute(0, 3, 1, 2)
    gh, gw = grid
    cases = {
        ("official", 0): dict(scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), antialias=False),
        ("transformers", 0): dict(size=grid, antialias=False),
        ("official", 4): dict(size=grid, antialias=True),
        ("transformers", 4): dict(size=grid, antialias=True),
    }
    for (mode, registers), kwargs in cases.items():
        ref = F.interpolate(t, mode="bicubic", align_corners=False, **kwargs)
        ref = ref.permute(0, 2, 3, 1).reshape(gh * gw, 6).numpy()
        ours = np.asarray(resize_pos_embed_v2(jnp.asarray(pos), grid, mode, registers))
        np.testing.assert_array_equal(ours[0, 0], pos[0, 0])
        if grid == (g0, g0):  # both references keep the stored grid as it is
            np.testing.assert_array_equal(ours, pos)
        else:
            np.testing.assert_allclose(ours[0, 1:], ref, atol=1e-5, rtol=0, err_msg=str(kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v2-S/14", "v2reg-S/14"])
def test_bf16_forward_error(variant):
    model = hf_model(variant)
    params = convert_state_dict(normalise_state_dict(numpy_state(model)), variant)
    x = images((2, 224, 224, 3))
    f32 = forward(variant, params, x)
    bf16 = forward(variant, params, x, dtype=jnp.bfloat16)
    err = jnp.abs(f32 - bf16)
    print(f"{variant} bf16 vs fp32 at 224: max {float(err.max()):.4f} mean {float(err.mean()):.5f}")
    assert bf16.dtype == jnp.float32
    assert 0 < float(err.max()) <= BF16_MAX
    assert float(err.mean()) <= BF16_MEAN


# ViT-g's zero state dict alone would be 4.5 GB: its shapes follow the same code as v2-mug.
V2_VARIANTS = sorted(v for v in VARIANTS if get_variant(v).family == "v2" and "-g/" not in v)


@pytest.mark.parametrize(
    "variant",  # the large widths take seconds each to initialise: slow
    [pytest.param(v, marks=pytest.mark.slow) if "L/" in v else v for v in V2_VARIANTS],
)
def test_init_params_mirror_checkpoint_shapes(variant):
    p = patch_size(variant)
    x = jax.ShapeDtypeStruct((1, 2 * p, 3 * p, 3), jnp.float32)
    backbone = build_backbone(variant)
    assert isinstance(backbone, Dinov2ViT)
    init = jax.eval_shape(lambda x: backbone.init(jax.random.key(0), x), x)
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(variant, 37 * 37).items()}
    converted = jax.eval_shape(lambda: convert_state_dict(state, variant))
    shapes = jax.tree.map(lambda a: a.shape, init["params"])
    assert shapes == jax.tree.map(lambda a: a.shape, converted)
    out = jax.eval_shape(lambda v, x: backbone.apply(v, x), init, x)
    assert out.shape == (1, 2, 3, embed_dim(variant))


def test_registry_lookups():
    assert patch_size("v2-S/14") == 14 and patch_size("v2reg-L/14") == 14
    assert embed_dim("v2-B/14") == 768 and embed_dim("v2-g/14") == 1536
    assert get_variant("v2reg-S/14").registers == 4


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 224, 225, 3), "image size 224x225 is not a positive multiple of the patch size 14"),
        ((1, 16, 16, 3), "image size 16x16 is not a positive multiple of the patch size 14"),
        ((1, 28, 28, 4), "3 channels"),
    ],
)
def test_bad_images_raise(shape, match):
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes("v2-mu/14", 4).items()}
    params = convert_state_dict(state, "v2-mu/14")
    with pytest.raises(ValueError, match=match):
        Dinov2ViT("v2-mu/14").apply({"params": params}, jnp.zeros(shape))


def test_wrong_module_or_option_raises():
    x = jnp.zeros((1, 28, 28, 3))
    with pytest.raises(ValueError, match="'v3-mu/16' is a v3 variant"):
        Dinov2ViT("v3-mu/16").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="build it with vit.build_backbone"):
        from depthg_jax.models.vit import DinoViT

        DinoViT("v2-mu/14").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="pos_interpolation must be one of"):
        Dinov2ViT("v2-mu/14", pos_interpolation="timm").init(jax.random.key(0), x)


@pytest.mark.parametrize("variant", ["v2-mu/14", "v2reg-mu/14"])
@pytest.mark.parametrize("norm", [True, False])
def test_intermediate_tokens_match_transformers_backbone(variant, norm):
    """intermediate_tokens(layers) == Dinov2Backbone / Dinov2WithRegistersBackbone feature
    maps (out_features "stage{i}", reshape_hidden_states=False): every token, CLS first."""
    spec = get_variant(variant)
    cls, config = hf_config(
        variant, out_features=["stage1", "stage2"], apply_layernorm=norm,
        reshape_hidden_states=False,
    )  # fmt: skip
    backbone = {Dinov2Model: Dinov2Backbone, Dinov2WithRegistersModel: Dinov2WithRegistersBackbone}
    torch.manual_seed(3)
    model = backbone[cls](config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = convert_state_dict(normalise_state_dict(numpy_state(model)), variant)
    x = images((2, 322, 280, 3), seed=5)  # a resized, non-square grid (23 x 20)
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).feature_maps
    vit = Dinov2ViT(variant, pos_interpolation="transformers")
    for layers, want in [((1, 2), ref), ((2,), ref[1:]), ((2, 1), ref[::-1])]:
        ours = jax.jit(
            lambda p, x, layers=layers: vit.apply(
                {"params": p}, x, layers=layers, norm=norm, method="intermediate_tokens"
            )
        )(params, x)
        assert isinstance(ours, tuple) and len(ours) == len(layers)
        for got, exp in zip(ours, want, strict=True):
            assert got.shape == (2, 1 + spec.registers + 23 * 20, spec.dim)
            assert got.dtype == jnp.float32
            # 1e-5 on LayerNorm-ed tokens; the raw ones (up to ~10 here) relative to their size
            scale = 1.0 if norm else float(np.abs(exp.numpy()).max())
            np.testing.assert_allclose(got, exp.numpy(), atol=1e-5 * scale, rtol=0)
