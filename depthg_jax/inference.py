"""The inference forward pass: image -> code -> probe outputs at the input resolution.

Follows STEGO's released evaluation (eval_segmentation.py): the code (optionally averaged with
the horizontally flipped image's flipped code) is upsampled bilinearly (align_corners False)
to the image size first, and the probes are applied to the upsampled code. The cluster probe's
cosine similarities are not linear in the code, so the order matters for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from depthg_jax import xla
from depthg_jax.data.transforms import normalize_images
from depthg_jax.models import head, vit
from depthg_jax.sampling import resize_bilinear

PARAM_KEYS = ("backbone", "head", "cluster_probe", "linear_probe")


def compute_code(params: dict, images: jax.Array, *, variant: str, dim: int, dtype) -> jax.Array:
    """uint8 (B, H, W, 3) -> code (B, H/p, W/p, dim), deterministic (no dropout)."""
    feats = vit.DinoViT(variant=variant, dtype=jnp.dtype(dtype)).apply(
        {"params": params["backbone"]}, normalize_images(images)
    )
    return head.SegmentationHead(dim=dim, dropout=0.0).apply(
        {"params": params["head"]}, feats, deterministic=True
    )


@xla.jit(static_argnames=("variant", "dim", "n_classes", "dtype", "flip"))
def predict(
    params: dict,
    images: jax.Array,
    *,
    variant: str,
    dim: int,
    n_classes: int,
    dtype,
    flip: bool,
) -> dict:
    """Runs backbone, head and both probes on uint8 images.

    Args:
      params: {"backbone", "head", "cluster_probe", "linear_probe"}, each a flax "params" tree.
      images: (B, H, W, 3) uint8 RGB, H and W multiples of the patch size.
      variant, dim, n_classes, dtype: the model (ViT variant, code dim K, probe classes,
        backbone compute dtype).
      flip: average the code with the flipped code of the horizontally flipped image.
    Returns:
      dict with "code" (B, h, w, K) float32 at the feature grid, "cluster_log_probs"
      (B, H, W, n) = log_softmax(2 * cosine to centroids), and "linear_logits" (B, H, W, n),
      both computed from the code upsampled to the image size.
    """
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params miss {missing}; expected keys {list(PARAM_KEYS)}")
    b, h, w = images.shape[:3]
    if flip:
        # One backbone pass over [images, flipped images]; un-flip the second half's code.
        both = compute_code(
            params,
            jnp.concatenate([images, images[:, :, ::-1]]),
            variant=variant,
            dim=dim,
            dtype=dtype,
        )
        code = (both[:b] + both[b:, :, ::-1]) / 2
    else:
        code = compute_code(params, images, variant=variant, dim=dim, dtype=dtype)
    code = code.astype(jnp.float32)
    code_up = resize_bilinear(code, (h, w), align_corners=False)
    inner = head.ClusterProbe(n_classes).apply({"params": params["cluster_probe"]}, code_up)
    logits = head.LinearProbe(n_classes).apply({"params": params["linear_probe"]}, code_up)
    return {
        "code": code,
        "cluster_log_probs": head.cluster_log_probs(inner, alpha=2.0),
        "linear_logits": logits,
    }


def check_params(params: dict, *, variant: str, dim: int, n_classes: int, where: str = "") -> None:
    """Raises a ValueError naming both sides if params do not fit the described model."""
    where = f" in {where}" if where else ""
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params{where} miss {missing}; expected keys {list(PARAM_KEYS)}")
    spec = vit.get_variant(variant)
    backbone = params["backbone"]
    found = {
        "backbone width": (backbone["cls_token"].shape[-1], spec.dim),
        "backbone blocks": (sum(k.startswith("blocks_") for k in backbone), spec.depth),
        "patch size": (backbone["patch_embed"]["proj"]["kernel"].shape[0], spec.patch),
        "code dim": (params["head"]["linear"]["kernel"].shape[-1], dim),
        "cluster probe classes": (params["cluster_probe"]["clusters"].shape[0], n_classes),
        "linear probe classes": (params["linear_probe"]["linear"]["kernel"].shape[-1], n_classes),
    }
    bad = [f"{name} {got} (expected {want})" for name, (got, want) in found.items() if got != want]
    if bad:
        raise ValueError(
            f"params{where} do not fit variant {variant!r}, dim {dim}, {n_classes} classes: "
            + "; ".join(bad)
        )


def init_params(key: jax.Array, *, variant: str, dim: int, n_classes: int, res: int = 32) -> dict:
    """Randomly initialised params of the whole model (tests, demos without weights)."""
    return _init_params(key, variant=variant, dim=dim, n_classes=n_classes, res=res)


@xla.jit(static_argnames=("variant", "dim", "n_classes", "res"))
def _init_params(key: jax.Array, *, variant: str, dim: int, n_classes: int, res: int) -> dict:
    k_vit, k_head, k_cluster, k_linear = jax.random.split(key, 4)
    images = jnp.zeros((1, res, res, 3), jnp.float32)
    feats, bparams = vit.DinoViT(variant=variant).init_with_output(k_vit, images)
    hparams = head.SegmentationHead(dim=dim).init(k_head, feats, deterministic=True)
    code = jnp.zeros(feats.shape[:3] + (dim,), jnp.float32)
    return {
        "backbone": bparams["params"],
        "head": hparams["params"],
        "cluster_probe": head.ClusterProbe(n_classes).init(k_cluster, code)["params"],
        "linear_probe": head.LinearProbe(n_classes).init(k_linear, code)["params"],
    }
