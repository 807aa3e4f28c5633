"""Every backbone family behind one constructor: DINO (v1), DINOv2 (+ registers), DINOv3.

The variant registry (names, shapes, families) lives in `vit.py`; the families' modules
import it, and this module imports them, so imports run one way.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from depthg_jax.models import dinov2, dinov3, vit


def build_backbone(variant: str, dtype=jnp.float32) -> nn.Module:
    """The backbone module of any variant: DinoViT, Dinov2ViT or Dinov3ViT.

    All three take ImageNet-normalised (B, H, W, 3) images and return (B, H/p, W/p, C)
    float32 patch features after the final norm (CLS and register tokens dropped).
    """
    kind = vit.family(variant)
    if kind == "v2":
        return dinov2.Dinov2ViT(variant=variant, dtype=dtype)
    if kind == "v3":
        return dinov3.Dinov3ViT(variant=variant, dtype=dtype)
    return vit.DinoViT(variant=variant, dtype=dtype)
