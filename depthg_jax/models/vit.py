"""DINO Vision Transformer in flax.linen, parameter names mirroring the DINO checkpoints.

The forward pass follows facebookresearch/dino's ``VisionTransformer``: patch embedding,
CLS token, position embeddings (resized bicubically with PyTorch semantics when the
input grid differs from the stored one), pre-norm blocks, final LayerNorm. It returns the
patch tokens of the last block after the final LayerNorm as an NHWC feature map.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's bicubic kernel uses this cubic coefficient (jax.image.resize uses -0.5).
TORCH_CUBIC_A = -0.75
# DINO adds this to the target grid before computing the interpolation scale factor.
DINO_SCALE_OFFSET = 0.1
# Official DINO weights are trained at 224 px; the stored position grid is 224 / patch.
PRETRAIN_IMAGE_SIZE = 224
LAYERNORM_EPS = 1e-6
MLP_RATIO = 4


class VariantSpec(NamedTuple):
    """Shape of one ViT variant (DINO v1, DINOv2 or DINOv3)."""

    patch: int
    dim: int
    depth: int
    heads: int
    family: str = "v1"  # "v1" (DinoViT), "v2" (dinov2.Dinov2ViT) or "v3" (dinov3.Dinov3ViT)
    registers: int = 0  # register tokens after CLS (DINOv3 calls them storage tokens)
    hidden: int = 0  # MLP hidden width; 0 means 4 * dim
    swiglu: bool = False  # SwiGLU feed-forward instead of fc1 -> GELU -> fc2


VARIANTS: dict[str, VariantSpec] = {
    "S/8": VariantSpec(8, 384, 12, 6),
    "S/16": VariantSpec(16, 384, 12, 6),
    "B/8": VariantSpec(8, 768, 12, 12),
    "B/16": VariantSpec(16, 768, 12, 12),
    "Ti/8": VariantSpec(8, 192, 12, 3),
    "Ti/16": VariantSpec(16, 192, 12, 3),
    # One-block, width-32 variants for tests and the CPU demo.
    "mu/8": VariantSpec(8, 32, 1, 2),
    "mu/16": VariantSpec(16, 32, 1, 2),
    # DINOv2 (facebookresearch/dinov2 hub models), with and without 4 registers. SwiGLU
    # widths follow the reference: (int(4 * dim * 2 / 3) + 7) // 8 * 8.
    "v2-S/14": VariantSpec(14, 384, 12, 6, "v2"),
    "v2-B/14": VariantSpec(14, 768, 12, 12, "v2"),
    "v2-L/14": VariantSpec(14, 1024, 24, 16, "v2"),
    "v2-g/14": VariantSpec(14, 1536, 40, 24, "v2", hidden=4096, swiglu=True),
    "v2reg-S/14": VariantSpec(14, 384, 12, 6, "v2", registers=4),
    "v2reg-B/14": VariantSpec(14, 768, 12, 12, "v2", registers=4),
    "v2reg-L/14": VariantSpec(14, 1024, 24, 16, "v2", registers=4),
    "v2reg-g/14": VariantSpec(14, 1536, 40, 24, "v2", registers=4, hidden=4096, swiglu=True),
    # DINOv3 ViTs (LVD-1689M): 4 storage tokens, RoPE; S+ and H+ use SwiGLU.
    "v3-S/16": VariantSpec(16, 384, 12, 6, "v3", registers=4),
    "v3-S+/16": VariantSpec(16, 384, 12, 6, "v3", registers=4, hidden=1536, swiglu=True),
    "v3-B/16": VariantSpec(16, 768, 12, 12, "v3", registers=4),
    "v3-L/16": VariantSpec(16, 1024, 24, 16, "v3", registers=4),
    "v3-H+/16": VariantSpec(16, 1280, 32, 20, "v3", registers=4, hidden=5120, swiglu=True),
    # Two-block, width-32 variants of each family for tests and the CPU demo.
    "v2-mu/14": VariantSpec(14, 32, 2, 2, "v2"),
    "v2-mug/14": VariantSpec(14, 32, 2, 2, "v2", hidden=88, swiglu=True),
    "v2reg-mu/14": VariantSpec(14, 32, 2, 2, "v2", registers=4),
    "v3-mu/16": VariantSpec(16, 32, 2, 2, "v3", registers=4),
    "v3-mu+/16": VariantSpec(16, 32, 2, 2, "v3", registers=4, hidden=128, swiglu=True),
}


def get_variant(variant: str) -> VariantSpec:
    """Returns the spec of a variant name, or raises a ValueError naming the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known variants: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def patch_size(variant: str) -> int:
    """Patch side in pixels of a variant ("S/8" -> 8)."""
    return get_variant(variant).patch


def embed_dim(variant: str) -> int:
    """Token width of a variant ("S/8" -> 384)."""
    return get_variant(variant).dim


def family(variant: str) -> str:
    """Backbone family of a variant: "v1" (DINO), "v2" (DINOv2) or "v3" (DINOv3)."""
    return get_variant(variant).family


def mlp_hidden(variant: str) -> int:
    """Hidden width of a variant's feed-forward layers."""
    spec = get_variant(variant)
    return spec.hidden or MLP_RATIO * spec.dim


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """PyTorch's 4-tap cubic convolution weights (A=-0.75) for fractional offsets t, float32."""
    a = np.float32(TORCH_CUBIC_A)
    one = np.float32(1.0)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far(2 * one - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """Matrix M (out_size, in_size) with M @ x == torch bicubic upsampling of x along one axis.

    Follows ATen's upsample_bicubic2d with align_corners=False and an explicit scale
    factor: source = (dst + 0.5) / scale_factor - 0.5 in float32 (not clamped at 0),
    index = min(floor(source), in - 1), offset clamped to [0, 1], taps clamped to the edge.
    """
    scale = np.float32(1.0 / scale_factor)
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - idx.astype(np.float32), 0.0, 1.0).astype(np.float32)
    weights = _cubic_weights(t)  # (out, 4)
    matrix = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        cols = np.clip(idx - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), cols), weights[:, tap])
    return matrix.astype(np.float32)


def stored_grid(pos_embed: jax.Array) -> int:
    """Side g0 of the square patch grid of position embeddings (1, 1+g0*g0, C)."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1+g0*g0, C), got shape {pos_embed.shape}")
    n = pos_embed.shape[1] - 1
    g0 = math.isqrt(n)
    if g0 * g0 != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    return g0


def resize_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Resizes DINO position embeddings (1, 1+g0*g0, C) to a (gh, gw) grid, as DINO does.

    DINO's ``interpolate_pos_encoding`` calls PyTorch bicubic interpolation with
    scale_factor (g + 0.1) / g0 per axis and align_corners False; the output grid is g.
    The CLS embedding is kept unchanged. Returns (1, 1+gh*gw, C).
    """
    g0 = stored_grid(pos_embed)
    gh, gw = grid_hw
    if (gh, gw) == (g0, g0):
        return pos_embed
    c = pos_embed.shape[2]
    rows = jnp.asarray(bicubic_matrix(g0, gh, (gh + DINO_SCALE_OFFSET) / g0))
    cols = jnp.asarray(bicubic_matrix(g0, gw, (gw + DINO_SCALE_OFFSET) / g0))
    grid = pos_embed[0, 1:].reshape(g0, g0, c)
    hp = jax.lax.Precision.HIGHEST
    resized = jnp.einsum(
        "hi,ijc,wj->hwc", rows.astype(grid.dtype), grid, cols.astype(grid.dtype), precision=hp
    )
    return jnp.concatenate([pos_embed[:, :1], resized.reshape(1, gh * gw, c)], axis=1)


def _trunc_normal_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """N(0, 0.02) truncated at +-2 (absolute), DINO's init of Linear weights and tokens."""
    return 0.02 * jax.random.truncated_normal(key, -2.0 / 0.02, 2.0 / 0.02, shape, dtype)


def _dense(features: int, name: str, dtype) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_trunc_normal_init,
        bias_init=nn.initializers.zeros,
        precision=None,
        name=name,
    )


def _layer_norm(name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, as DINO's ``Attention``."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, n, c = x.shape
        head_dim = c // self.heads
        qkv = _dense(3 * self.dim, "qkv", self.dtype)(x)
        qkv = qkv.reshape(b, n, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
        # Softmax in float32 so bf16 compute does not lose the normalisation.
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v).reshape(b, n, c)
        return _dense(self.dim, "proj", self.dtype)(out), attn


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.dim * MLP_RATIO, "fc1", self.dtype)(x)
        x = nn.gelu(x, approximate=False)
        return _dense(self.dim, "fc2", self.dtype)(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, attn = Attention(self.dim, self.heads, self.dtype, name="attn")(
            _layer_norm("norm1", self.dtype)(x)
        )
        x = x + y
        x = x + Mlp(self.dim, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
        return x, attn


def check_images(images: jax.Array, patch: int) -> tuple[int, int]:
    """Validates (B, H, W, 3) images for a patch size; returns the token grid (H/p, W/p)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if images.shape[-1] != 3:
        raise ValueError(
            f"images must have 3 channels (NHWC RGB), got {images.shape[-1]} in shape "
            f"{images.shape}"
        )
    h, w = images.shape[1:3]
    if h % patch or w % patch or h == 0 or w == 0:
        raise ValueError(f"image size {h}x{w} is not a positive multiple of the patch size {patch}")
    return h // patch, w // patch


class DinoViT(nn.Module):
    """DINO ViT backbone returning last-block patch features (B, H/p, W/p, C).

    Attributes:
      variant: one of ``VARIANTS`` ("S/8", "B/8", ..., "mu/8").
      dtype: compute dtype (bfloat16 on accelerators); parameters are always float32.
    """

    variant: str = "S/8"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Runs the backbone on ImageNet-normalised (B, H, W, 3) images.

        Returns float32 features (B, H/p, W/p, C); with ``return_attention`` also the
        last block's attention (B, heads, 1+N, 1+N), float32, CLS first as in DINO.
        """
        spec = get_variant(self.variant)
        if spec.family != "v1":
            raise ValueError(
                f"DinoViT runs DINO v1 variants; {self.variant!r} is a DINO{spec.family} variant: "
                "build it with backbones.build_backbone"
            )
        gh, gw = check_images(images, spec.patch)
        b = images.shape[0]
        x = _PatchEmbed(spec.dim, spec.patch, self.dtype, name="patch_embed")(images)
        cls = self.param("cls_token", _trunc_normal_init, (1, 1, spec.dim))
        pos_embed = self.param("pos_embed", _trunc_normal_init, self._pos_embed_shape(spec))
        patches = einops.rearrange(x, "b h w c -> b (h w) c")  # row-major, as DINO flattens
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, spec.dim)), patches], 1)
        tokens = tokens.astype(self.dtype) + resize_pos_embed(pos_embed, (gh, gw)).astype(
            self.dtype
        )
        attn = None
        for i in range(spec.depth):
            tokens, attn = Block(spec.dim, spec.heads, self.dtype, name=f"blocks_{i}")(tokens)
        tokens = _layer_norm("norm", self.dtype)(tokens)
        feats = einops.rearrange(tokens[:, 1:], "b (h w) c -> b h w c", h=gh, w=gw)
        feats = feats.astype(jnp.float32)
        if return_attention:
            return feats, attn
        return feats

    def _pos_embed_shape(self, spec: VariantSpec) -> tuple[int, int, int]:
        """The stored grid: the loaded checkpoint's if params exist, else 224 / patch."""
        if self.has_variable("params", "pos_embed"):
            return tuple(self.get_variable("params", "pos_embed").shape)
        g0 = PRETRAIN_IMAGE_SIZE // spec.patch
        return (1, 1 + g0 * g0, spec.dim)


class _PatchEmbed(nn.Module):
    """Non-overlapping p x p convolution; holds the checkpoint's ``patch_embed.proj``."""

    dim: int
    patch: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        return nn.Conv(
            self.dim,
            (self.patch, self.patch),
            strides=(self.patch, self.patch),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="proj",
        )(images.astype(self.dtype))
