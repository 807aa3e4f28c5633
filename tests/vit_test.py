"""DinoViT against timm goldens and PyTorch bicubic; shapes, dtypes and bad input."""

from pathlib import Path

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg_jax.models.convert import convert_state_dict, expected_shapes
from depthg_jax.models.variants import VARIANTS, embed_dim, patch_size
from depthg_jax.models.vit import DinoViT, build_backbone, resize_pos_embed

GOLDENS = Path(__file__).parent / "goldens"
# fp32 agreement with timm measured at <= 1.7e-6 on these goldens (features up to ~3.8).
GOLDEN_ATOL = 1e-5
# bf16 compute vs fp32 on LayerNorm-ed features (values up to ~4), random_params and
# N(0, 1) inputs at 32 px, 3 seeds: max abs error 0.023-0.027 (mu/8), 0.051-0.066 (S/8);
# mean abs 0.0033-0.0037 and 0.0089-0.0090. Full size at 224/320: bench/RESULTS.md.
BF16_MAX_ATOL = {"mu/8": 0.05, "S/8": 0.12}
BF16_MEAN_ATOL = {"mu/8": 0.006, "S/8": 0.015}


def forward(variant, params, images, dtype=jnp.float32, return_attention=False):
    # Eager on purpose: op-by-op compiles are shared across blocks, a jit of 12 blocks is not.
    model = DinoViT(variant, dtype=dtype)
    return model.apply({"params": params}, images, return_attention=return_attention)


def random_params(variant: str, seed: int) -> dict:
    """DINO-like random weights built in numpy (cheaper than init): N(0, 0.02) weights and
    biases, LayerNorm scales 1 + N(0, 0.1), a 224 px position grid."""
    rng = np.random.default_rng(seed)
    g0 = 224 // patch_size(variant)
    state = {}
    for key, shape in expected_shapes(variant, g0 * g0).items():
        is_norm_scale = key.endswith(("norm1.weight", "norm2.weight")) or key == "norm.weight"
        value = (
            1 + 0.1 * rng.standard_normal(shape) if is_norm_scale else rng.standard_normal(shape)
        )
        state[key] = (value if is_norm_scale else 0.02 * value).astype(np.float32)
    return convert_state_dict(state, variant)


@pytest.fixture(scope="module")
def mu8_params():
    return random_params("mu/8", 0)


def load_golden(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    data = np.load(GOLDENS / f"vit_{name}.npz")
    state = {k.removeprefix("sd/"): data[k] for k in data.files if k.startswith("sd/")}
    return state, {k: data[k] for k in data.files if not k.startswith("sd/")}


def torch_dino_resize(pos_grid: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """DINO's interpolate_pos_encoding on a (1, g0, g0, C) grid, in torch."""
    g0 = pos_grid.shape[1]
    t = torch.from_numpy(pos_grid).permute(0, 3, 1, 2)
    out = F.interpolate(
        t, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic", align_corners=False
    )
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("g0", [28, 14, 4])
@pytest.mark.parametrize("grid", [(40, 40), (28, 40), (7, 13), (60, 30), (6, 5), (2, 3)])
def test_resize_pos_embed_matches_torch_bicubic(g0, grid):
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 1 + g0 * g0, 5)).astype(np.float32)
    ours = np.asarray(resize_pos_embed(jnp.asarray(pos), grid))
    expected = torch_dino_resize(pos[:, 1:].reshape(1, g0, g0, 5), *grid)
    assert ours.shape == (1, 1 + grid[0] * grid[1], 5)
    np.testing.assert_array_equal(ours[:, 0], pos[:, 0])  # CLS untouched
    np.testing.assert_allclose(ours[0, 1:].reshape(*grid, 5), expected[0], atol=1e-5, rtol=0)


def test_resize_pos_embed_keeps_native_grid_as_dino():
    # DINO returns the stored embeddings untouched when the grid is the stored square one.
    pos = jnp.asarray(np.random.default_rng(1).standard_normal((1, 17, 3)), jnp.float32)
    assert resize_pos_embed(pos, (4, 4)) is pos


def test_resize_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(jnp.zeros((1, 1 + 12, 4)), (3, 3))


@pytest.mark.parametrize("name,variant", [("mu8", "mu/8"), ("mu16", "mu/16")])
@pytest.mark.parametrize("prefix", ["", "other_"])
def test_forward_matches_timm_golden(name, variant, prefix):
    """timm's VisionTransformer (weights converted by convert_state_dict) at native and
    other sizes; at the other size the golden used DINO's torch pos-embed resize."""
    state, golden = load_golden(name)
    params = convert_state_dict(state, variant)
    feats, attn = forward(variant, params, golden[prefix + "images"], jnp.float32, True)
    assert feats.dtype == jnp.float32
    np.testing.assert_allclose(feats, golden[prefix + "feats"], atol=GOLDEN_ATOL, rtol=0)
    np.testing.assert_allclose(attn, golden[prefix + "attn"], atol=GOLDEN_ATOL, rtol=0)


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if VARIANTS[v].family == "v1"))
def test_init_params_mirror_checkpoint_shapes(variant):
    """init's params tree is exactly what convert_state_dict builds from a checkpoint."""
    p = patch_size(variant)
    images = jax.ShapeDtypeStruct((1, 2 * p, 3 * p, 3), jnp.float32)
    init = jax.eval_shape(lambda x: DinoViT(variant).init(jax.random.key(0), x), images)
    g0 = 224 // p
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(variant, g0 * g0).items()}
    converted = convert_state_dict(state, variant)
    shapes = jax.tree.map(lambda a: a.shape, init["params"])
    assert shapes == jax.tree.map(lambda a: a.shape, converted)
    assert jax.tree.leaves(init["params"])[0].dtype == jnp.float32
    out = jax.eval_shape(lambda v, x: DinoViT(variant).apply(v, x), init, images)
    assert out.shape == (1, 2, 3, embed_dim(variant))


def test_pos_embed_grid_follows_loaded_params():
    """A checkpoint stored at another grid (here 4x4, from the golden) applies as is."""
    state, golden = load_golden("mu8")
    params = convert_state_dict(state, "mu/8")
    assert params["pos_embed"].shape == (1, 17, 32)
    out = forward("mu/8", params, golden["images"][:1, :16, :24])
    assert out.shape == (1, 2, 3, 32)


@pytest.mark.parametrize(
    "variant",
    ["mu/8", pytest.param("S/8", marks=pytest.mark.slow)],  # S/8: real width
)
def test_bf16_forward_close_to_fp32(variant):
    p = patch_size(variant)
    x = np.random.default_rng(1).standard_normal((2, 4 * p, 4 * p, 3)).astype(np.float32)
    params = random_params(variant, 0)
    f32 = forward(variant, params, x)
    bf16 = forward(variant, params, x, jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    err = jnp.abs(f32 - bf16)
    assert float(err.max()) <= BF16_MAX_ATOL[variant], float(err.max())
    assert float(err.mean()) <= BF16_MEAN_ATOL[variant], float(err.mean())
    assert float(err.max()) > 0  # bf16 compute really happened


def test_attention_rows_are_distributions(mu8_params):
    x = np.random.default_rng(2).standard_normal((2, 16, 24, 3)).astype(np.float32)
    feats, attn = forward("mu/8", mu8_params, x, jnp.float32, True)
    assert feats.shape == (2, 2, 3, 32)
    assert attn.shape == (2, 2, 7, 7)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 16, 16, 1), "3 channels"),
        ((1, 16, 16, 4), "3 channels"),
        ((1, 3, 16, 16), "3 channels"),
        ((1, 20, 16, 3), "not a positive multiple of the patch size 8"),
        ((1, 16, 12, 3), "not a positive multiple of the patch size 8"),
        ((16, 16, 3), r"\(B, H, W, 3\)"),
    ],
)
def test_bad_images_raise(shape, match, mu8_params):
    with pytest.raises(ValueError, match=match):
        DinoViT("mu/8").apply({"params": mu8_params}, jnp.zeros(shape))


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="unknown ViT variant 'L/14'"):
        DinoViT("L/14").init(jax.random.key(0), jnp.zeros((1, 14, 14, 3)))
    with pytest.raises(ValueError, match="known variants"):
        patch_size("S8")


@pytest.mark.parametrize("variant", ["mu/8", "v2reg-mu/14", "v3-mu/16"])
def test_intermediate_tokens_last_block_is_the_forward(variant):
    """The last block's normed tokens are the forward's features (plus CLS and registers);
    norm=False gives the raw tokens, whose final LayerNorm is the normed ones."""
    spec = VARIANTS[variant]
    p = spec.patch
    x = np.random.default_rng(3).standard_normal((2, 3 * p, 2 * p, 3)).astype(np.float32)
    model = build_backbone(variant)
    params = model.init(jax.random.key(0), x)["params"]
    feats = model.apply({"params": params}, x)
    last, first = model.apply(
        {"params": params}, x, layers=(spec.depth, 1), method="intermediate_tokens"
    )
    assert last.shape == (2, 1 + spec.registers + 6, spec.dim) and last.dtype == jnp.float32
    np.testing.assert_array_equal(last[:, 1 + spec.registers :].reshape(feats.shape), feats)
    (raw,) = model.apply(
        {"params": params}, x, layers=(spec.depth,), norm=False, method="intermediate_tokens"
    )
    norm = flax.linen.LayerNorm(epsilon=spec.layernorm_eps)
    np.testing.assert_allclose(norm.apply({"params": params["norm"]}, raw), last, atol=1e-6)
    assert np.abs(first - last).max() > 1e-3 or spec.depth == 1


def test_intermediate_tokens_refuse_bad_layers():
    model = build_backbone("v2-mu/14")
    x = jnp.zeros((1, 28, 28, 3))
    params = model.init(jax.random.key(0), x)["params"]
    for layers in [(0,), (3,), ()]:
        with pytest.raises(ValueError, match=r"block numbers in 1\.\.2 for 'v2-mu/14'"):
            model.apply({"params": params}, x, layers=layers, method="intermediate_tokens")
