"""DINOv3 Vision Transformer in flax.linen.

Follows facebookresearch/dinov3's ``DinoVisionTransformer`` (the LVD-1689M ViT-S/S+/B/L/H+
releases), parameter names mirroring its checkpoints: patch embedding, CLS token, 4 storage
(register) tokens, no learned position embeddings but 2-D rotary embeddings (RoPE) on the
patch tokens' queries and keys, pre-norm blocks with LayerScale, GELU MLP or SwiGLU (S+, H+),
final LayerNorm (eps 1e-5). Returns the patch tokens after the final norm as
(B, H/p, W/p, C), CLS and storage tokens dropped.

RoPE ("separate" coordinate normalisation, base 100): patch centres (i + 0.5) / n per axis,
mapped to [-1, 1]; angles 2 pi * coord / period with periods base ** (4k / head_dim),
k < head_dim / 4, y then x, tiled twice; computed in float32 at any grid, so no
interpolation is needed. The training-time coordinate augmentations are not implemented
(the backbone is frozen).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.models.dinov2 import Block, check_family, layer_norm
from depthg_jax.models.vit import (
    _PatchEmbed,
    _trunc_normal_init,
    check_images,
    get_variant,
    mlp_hidden,
)

LAYERNORM_EPS = 1e-5
ROPE_BASE = 100.0


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> np.ndarray:
    """The reference's RoPE periods (head_dim / 4,), float32: base ** (4k / head_dim)."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
    return (np.float32(base) ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)).astype(
        np.float32
    )


def rope_tables(gh: int, gw: int, head_dim: int, base: float = ROPE_BASE):
    """(cos, sin), each (gh * gw, head_dim) float32, for a row-major patch grid."""
    coords_h = np.arange(0.5, gh, dtype=np.float32) / np.float32(gh)
    coords_w = np.arange(0.5, gw, dtype=np.float32) / np.float32(gw)
    coords = np.stack(np.meshgrid(coords_h, coords_w, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = np.float32(2.0) * coords - np.float32(1.0)
    inv_freq = np.float32(1.0) / rope_periods(head_dim, base)
    angles = np.float32(2 * math.pi) * coords[:, :, None] * inv_freq[None, None, :]
    angles = np.tile(angles.reshape(gh * gw, -1), 2).astype(np.float32)
    return np.cos(angles), np.sin(angles)


class Dinov3ViT(nn.Module):
    """DINOv3 ViT backbone returning last-block patch features (B, H/p, W/p, C).

    Attributes:
      variant: a "v3-..." name of ``vit.VARIANTS`` ("v3-S/16", "v3-B/16", "v3-mu/16").
      dtype: compute dtype (bfloat16 on accelerators); parameters are always float32,
        RoPE is applied in float32 as in the reference.
    """

    variant: str = "v3-S/16"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Runs the backbone on ImageNet-normalised (B, H, W, 3) images.

        Returns float32 features (B, H/p, W/p, C); with ``return_attention`` also the last
        block's attention (B, heads, T, T), float32, tokens ordered CLS, storage, patches.
        """
        check_family(self.variant, "v3", "Dinov3ViT")
        spec = get_variant(self.variant)
        gh, gw = check_images(images, spec.patch)
        b, c = images.shape[0], spec.dim
        x = _PatchEmbed(c, spec.patch, self.dtype, name="patch_embed")(images)
        cls = self.param("cls_token", _trunc_normal_init, (1, 1, c))
        storage = self.param("storage_tokens", _trunc_normal_init, (1, spec.registers, c))
        # Unused at inference (it replaces masked patches in training); kept so the params
        # mirror the checkpoints.
        self.param("mask_token", nn.initializers.zeros, (1, c))
        tokens = jnp.concatenate(
            [
                jnp.broadcast_to(cls, (b, 1, c)).astype(self.dtype),
                jnp.broadcast_to(storage, (b, spec.registers, c)).astype(self.dtype),
                x.reshape(b, -1, c).astype(self.dtype),
            ],
            axis=1,
        )
        cos, sin = rope_tables(gh, gw, c // spec.heads)
        rope = (jnp.asarray(cos), jnp.asarray(sin))
        attn = None
        for i in range(spec.depth):
            tokens, attn = Block(
                c, spec.heads, mlp_hidden(self.variant), spec.swiglu, False, LAYERNORM_EPS,
                self.dtype, name=f"blocks_{i}",
            )(tokens, rope)  # fmt: skip
        tokens = layer_norm("norm", self.dtype, LAYERNORM_EPS)(tokens)
        feats = tokens[:, 1 + spec.registers :].reshape(b, gh, gw, c).astype(jnp.float32)
        if return_attention:
            return feats, attn
        return feats
