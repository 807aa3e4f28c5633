"""DINOv2 Vision Transformer (with or without registers) in flax.linen.

Follows facebookresearch/dinov2's ``DinoVisionTransformer`` as released on torch hub, with
parameter names mirroring its checkpoints (``blocks.N.ls1.gamma``, ``mlp.w12`` ...): patch
embedding, CLS token, learned position embeddings for a 37 x 37 grid (518 px), then the
register tokens (which get no position embedding), pre-norm blocks with LayerScale, GELU MLP
or fused SwiGLU (ViT-g), final LayerNorm. Returns the patch tokens after the final norm as
(B, H/p, W/p, C), CLS and registers dropped.

Other grids resize the stored position embeddings bicubically as the reference does (see
``resize_pos_embed_v2``). The two references differ for the models without registers:
facebookresearch/dinov2 passes a scale factor (g + 0.1) / g0, transformers' ``Dinov2Model``
an output size; both agree for the register models (output size, antialias=True). The
``pos_interpolation`` field picks one ("official", the default, or "transformers").

The building blocks here (LayerScale, SwiGLU, the attention with optional RoPE) are shared
with ``dinov3.py``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.models.vit import (
    DINO_SCALE_OFFSET,
    Mlp,
    _dense,
    _PatchEmbed,
    _trunc_normal_init,
    bicubic_matrix,
    check_images,
    get_variant,
    mlp_hidden,
    stored_grid,
)

# The hub models are trained at 518 px: a 37 x 37 stored position grid.
PRETRAIN_GRID = 37
LAYERNORM_EPS = 1e-6
POS_INTERPOLATIONS = ("official", "transformers")
# PyTorch's antialiased bicubic (ported from PIL) uses Keys' cubic with a = -0.5.
AA_CUBIC_A = -0.5


def check_family(variant: str, family: str, module: str) -> None:
    spec = get_variant(variant)
    if spec.family != family:
        raise ValueError(
            f"{module} runs DINO{family} variants; {variant!r} is a {spec.family} variant: "
            "build it with backbones.build_backbone"
        )


# ----------------------------------------------------------------------------- pos embed


def _aa_cubic(x: np.ndarray) -> np.ndarray:
    a = np.float32(AA_CUBIC_A)
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(np.float32)


def antialias_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix M (out, in) with M @ x == torch bicubic resize with antialias=True, size given.

    Follows ATen's separable antialiased interpolation (align_corners False): scale = in/out,
    support = 2 * max(scale, 1), centre = scale * (i + 0.5), taps from
    trunc(centre - support + 0.5) to trunc(centre + support + 0.5) clipped to the input,
    weights cubic((j - centre + 0.5) / max(scale, 1)) normalised to sum 1, all in float32.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    support = np.float32(2.0) * max(scale, np.float32(1.0))
    inv = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        centre = scale * np.float32(i + 0.5)
        lo = max(int(centre - support + np.float32(0.5)), 0)
        hi = min(int(centre + support + np.float32(0.5)), in_size)
        j = np.arange(lo, hi, dtype=np.float32)
        w = _aa_cubic((j - centre + np.float32(0.5)) * inv)
        total = w.sum(dtype=np.float32)
        matrix[i, lo:hi] = w / total if total != 0 else w
    return matrix


def pos_resize_matrix(in_size: int, out_size: int, mode: str, registers: int) -> np.ndarray:
    """The (out, in) resize matrix of one axis for a DINOv2 model and reference."""
    if registers:  # both references: size=(gh, gw), bicubic, antialias=True
        return antialias_bicubic_matrix(in_size, out_size)
    if mode == "official":  # scale_factor=(g + 0.1) / g0, as DINO v1
        return bicubic_matrix(in_size, out_size, (out_size + DINO_SCALE_OFFSET) / in_size)
    if mode == "transformers":  # size=(gh, gw): scale in/out
        return bicubic_matrix(in_size, out_size, out_size / in_size)
    raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {mode!r}")


def resize_pos_embed_v2(
    pos_embed: jax.Array, grid_hw: tuple[int, int], mode: str = "official", registers: int = 0
) -> jax.Array:
    """Resizes DINOv2 position embeddings (1, 1+g0*g0, C) to a (gh, gw) grid (1, 1+gh*gw, C).

    Both references return the stored embeddings unchanged when the grid is the stored square
    one; the CLS embedding is never resized. ``registers`` selects the register models'
    antialiased resize; ``mode`` the no-register models' reference (see the module doc).
    """
    g0 = stored_grid(pos_embed)
    gh, gw = grid_hw
    if (gh, gw) == (g0, g0):
        return pos_embed
    c = pos_embed.shape[2]
    rows = jnp.asarray(pos_resize_matrix(g0, gh, mode, registers))
    cols = jnp.asarray(pos_resize_matrix(g0, gw, mode, registers))
    grid = pos_embed[0, 1:].astype(jnp.float32).reshape(g0, g0, c)
    hp = jax.lax.Precision.HIGHEST
    resized = jnp.einsum("hi,ijc,wj->hwc", rows, grid, cols, precision=hp)
    resized = resized.astype(pos_embed.dtype).reshape(1, gh * gw, c)
    return jnp.concatenate([pos_embed[:, :1], resized], axis=1)


# ----------------------------------------------------------------------------- blocks


def layer_norm(name: str, dtype, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class LayerScale(nn.Module):
    """x * gamma (per channel), the checkpoints' ``lsN.gamma``."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.ones, (self.dim,), jnp.float32)
        return x * gamma.astype(self.dtype)


class SwiGLU(nn.Module):
    """silu(x W1) * (x W2) -> W3. ``fused``: W1 and W2 stacked in one ``w12`` (DINOv2's
    SwiGLUFFNFused); otherwise separate ``w1``/``w2`` (DINOv3's SwiGLUFFN)."""

    dim: int
    hidden: int
    fused: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fused:
            x12 = _dense(2 * self.hidden, "w12", self.dtype)(x)
            x1, x2 = x12[..., : self.hidden], x12[..., self.hidden :]
        else:
            x1 = _dense(self.hidden, "w1", self.dtype)(x)
            x2 = _dense(self.hidden, "w2", self.dtype)(x)
        return _dense(self.dim, "w3", self.dtype)(nn.silu(x1) * x2)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Attention(nn.Module):
    """Multi-head self-attention, fused ``qkv`` and ``proj``; optional RoPE on the last
    ``rope[0].shape[0]`` tokens (DINOv3: the patch tokens), applied in float32."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array]:
        b, n, c = x.shape
        head_dim = c // self.heads
        qkv = _dense(3 * self.dim, "qkv", self.dtype)(x).reshape(b, n, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd)
        if rope is not None:
            cos, sin = rope  # (P, hd) float32
            prefix = n - cos.shape[0]

            def apply(t):
                patches = t[:, prefix:].astype(jnp.float32)
                patches = patches * cos[:, None] + rotate_half(patches) * sin[:, None]
                return jnp.concatenate([t[:, :prefix], patches.astype(t.dtype)], axis=1)

            q, k = apply(q), apply(k)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * (head_dim**-0.5), k)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(self.dtype), v).reshape(b, n, c)
        return _dense(self.dim, "proj", self.dtype)(out), attn


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    dim: int
    heads: int
    hidden: int
    swiglu: bool
    fused_swiglu: bool
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, rope=None) -> tuple[jax.Array, jax.Array]:
        y, attn = Attention(self.dim, self.heads, self.dtype, name="attn")(
            layer_norm("norm1", self.dtype, self.eps)(x), rope
        )
        x = x + LayerScale(self.dim, self.dtype, name="ls1")(y)
        h = layer_norm("norm2", self.dtype, self.eps)(x)
        if self.swiglu:
            h = SwiGLU(self.dim, self.hidden, self.fused_swiglu, self.dtype, name="mlp")(h)
        else:
            assert self.hidden == 4 * self.dim, "vit.Mlp has ratio 4"
            h = Mlp(self.dim, self.dtype, name="mlp")(h)
        return x + LayerScale(self.dim, self.dtype, name="ls2")(h), attn


# ----------------------------------------------------------------------------- model


class Dinov2ViT(nn.Module):
    """DINOv2 ViT backbone returning last-block patch features (B, H/p, W/p, C).

    Attributes:
      variant: a "v2-..." or "v2reg-..." name of ``vit.VARIANTS`` ("v2-S/14", "v2reg-B/14").
      dtype: compute dtype (bfloat16 on accelerators); parameters are always float32.
      pos_interpolation: "official" (facebookresearch/dinov2) or "transformers"
        (``Dinov2Model``); only the models without registers differ.
    """

    variant: str = "v2-S/14"
    dtype: jnp.dtype = jnp.float32
    pos_interpolation: str = "official"

    @nn.compact
    def __call__(
        self, images: jax.Array, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Runs the backbone on ImageNet-normalised (B, H, W, 3) images.

        Returns float32 features (B, H/p, W/p, C); with ``return_attention`` also the last
        block's attention (B, heads, T, T), float32, tokens ordered CLS, registers, patches.
        """
        check_family(self.variant, "v2", "Dinov2ViT")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got "
                f"{self.pos_interpolation!r}"
            )
        spec = get_variant(self.variant)
        gh, gw = check_images(images, spec.patch)
        b, c = images.shape[0], spec.dim
        x = _PatchEmbed(c, spec.patch, self.dtype, name="patch_embed")(images)
        cls = self.param("cls_token", _trunc_normal_init, (1, 1, c))
        pos_embed = self.param("pos_embed", _trunc_normal_init, self._pos_embed_shape(c))
        # Unused at inference (it replaces masked patches in DINOv2 training); kept so the
        # params mirror the checkpoints.
        self.param("mask_token", nn.initializers.zeros, (1, c))
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)), x.reshape(b, -1, c)], 1)
        pos = resize_pos_embed_v2(pos_embed, (gh, gw), self.pos_interpolation, spec.registers)
        tokens = tokens.astype(self.dtype) + pos.astype(self.dtype)
        if spec.registers:
            reg = self.param("register_tokens", _trunc_normal_init, (1, spec.registers, c))
            reg = jnp.broadcast_to(reg, (b, spec.registers, c)).astype(self.dtype)
            tokens = jnp.concatenate([tokens[:, :1], reg, tokens[:, 1:]], axis=1)
        attn = None
        for i in range(spec.depth):
            tokens, attn = Block(
                c, spec.heads, mlp_hidden(self.variant), spec.swiglu, True, LAYERNORM_EPS,
                self.dtype, name=f"blocks_{i}",
            )(tokens)  # fmt: skip
        tokens = layer_norm("norm", self.dtype, LAYERNORM_EPS)(tokens)
        feats = tokens[:, 1 + spec.registers :].reshape(b, gh, gw, c).astype(jnp.float32)
        if return_attention:
            return feats, attn
        return feats

    def _pos_embed_shape(self, dim: int) -> tuple[int, int, int]:
        """The stored grid: the loaded checkpoint's if params exist, else 37 x 37."""
        if self.has_variable("params", "pos_embed"):
            return tuple(self.get_variable("params", "pos_embed").shape)
        return (1, 1 + PRETRAIN_GRID * PRETRAIN_GRID, dim)
