"""The whole DepthG model in one place: backbone + head + probes, built from the config.

This module owns the parameter keys ({"backbone", "head", "cluster_probe", "linear_probe"}),
builds the modules, loads or seeds the backbone, checks params against a model, and runs the
inference forward.

Inference follows STEGO's released evaluation: the code (optionally averaged with the
horizontally flipped image's flipped code) is upsampled bilinearly (align_corners False) to
the image size first, and the probes are applied to the upsampled code. The cluster probe's
cosine similarities are not linear in the code, so the order matters for it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthg_jax.method.image_ops import normalize_images, resize_bilinear
from depthg_jax.models import head, variants, vit
from depthg_jax.runtime import xla

PARAM_KEYS = ("backbone", "head", "cluster_probe", "linear_probe")
TRAINABLE_KEYS = ("head", "cluster_probe", "linear_probe")
MATMUL_PRECISIONS = ("default", "high", "highest")


@dataclasses.dataclass(frozen=True)
class Model:
    """The modules of one DepthG model (no params: those are plain pytrees)."""

    backbone: nn.Module
    head: head.SegmentationHead
    cluster_probe: head.ClusterProbe
    linear_probe: head.LinearProbe
    matmul_precision: str = "default"

    def precision(self):
        """Context for tracing backbone and head at the configured f32 matmul precision."""
        return precision_scope(self.matmul_precision)


def precision_scope(name: str):
    """jax.default_matmul_precision(name), or no change for "default"."""
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {name!r}; expected one of {MATMUL_PRECISIONS}")
    if name == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision({"high": "bfloat16_3x", "highest": "float32"}[name])


def build_model(model_cfg, n_classes: int) -> Model:
    """The modules named by config.model (and the number of classes)."""
    return Model(
        backbone=vit.build_backbone(model_cfg.variant, jnp.dtype(model_cfg.dtype)),
        head=head.SegmentationHead(dim=model_cfg.dim, dropout=model_cfg.get("dropout", 0.0)),
        cluster_probe=head.ClusterProbe(n_classes=n_classes),
        linear_probe=head.LinearProbe(n_classes=n_classes),
        matmul_precision=model_cfg.get("matmul_precision", "default"),
    )


def check_backbone_weights(model_cfg) -> None:
    """Refuses a random backbone unless the config explicitly allows one (demo, tests)."""
    if not model_cfg.weights and not model_cfg.allow_random_backbone:
        raise ValueError(
            "config.model.weights is empty. DepthG distils a pretrained DINO backbone: download "
            f"the official weights for {model_cfg.variant} (see README, section Weights), then "
            f"`python -m depthg_jax.models.convert --variant={model_cfg.variant} --weights=FILE "
            "--out=DIR` and pass --config.model.weights=DIR (a .pth/.safetensors file also works). "
            "Set --config.model.allow_random_backbone=True only for smoke tests."
        )


def init_backbone(model_cfg, key: jax.Array, variant: str | None = None) -> dict:
    """The configured pretrained backbone's params, or a random one seeded by `key` where the
    config allows it. `variant` (default model_cfg.variant) asks for another variant's random
    init (KNN tables of another backbone); weights are only ever those of model_cfg.variant."""
    check_backbone_weights(model_cfg)
    variant = variant or model_cfg.variant
    if model_cfg.weights:
        if variant != model_cfg.variant:
            raise ValueError(
                f"config.model.weights holds {model_cfg.variant} weights, but a {variant} "
                f"backbone was asked: pass that variant's weights with --config.model.variant="
                f"{variant}"
            )
        from depthg_jax.models import convert  # Loading weights pulls in Orbax and safetensors.

        return convert.load_backbone(model_cfg.weights, variant)
    patch = variants.patch_size(variant)
    dummy = jnp.zeros((1, 2 * patch, 2 * patch, 3), jnp.float32)
    return jax.jit(vit.build_backbone(variant).init)(key, dummy)["params"]


def init_trainable(model: Model, key: jax.Array) -> dict:
    """Random {"head", "cluster_probe", "linear_probe"} params (PyTorch default inits)."""
    k_head, k_cluster, k_linear = jax.random.split(key, 3)
    c = variants.embed_dim(model.backbone.variant)
    feats = jnp.zeros((1, 2, 2, c), jnp.float32)
    code = jnp.zeros((1, 2, 2, model.head.dim), jnp.float32)
    return {
        "head": model.head.init({"params": k_head}, feats, deterministic=True)["params"],
        "cluster_probe": model.cluster_probe.init(k_cluster, code)["params"],
        "linear_probe": model.linear_probe.init(k_linear, code)["params"],
    }


def full_params(backbone: dict, trainable: dict) -> dict:
    """The whole model's params from the frozen backbone and the trained parts."""
    missing = [k for k in TRAINABLE_KEYS if k not in trainable]
    if missing:
        raise ValueError(f"trainable params miss {missing}; expected keys {list(TRAINABLE_KEYS)}")
    return {"backbone": backbone, **{k: trainable[k] for k in TRAINABLE_KEYS}}


def compute_code(
    params: dict, images: jax.Array, *, variant: str, dim: int, dtype, matmul_precision="default"
) -> jax.Array:
    """uint8 (B, H, W, 3) -> code (B, H/p, W/p, dim), deterministic (no dropout)."""
    with precision_scope(matmul_precision):
        feats = vit.build_backbone(variant, jnp.dtype(dtype)).apply(
            {"params": params["backbone"]}, normalize_images(images)
        )
        return head.SegmentationHead(dim=dim, dropout=0.0).apply(
            {"params": params["head"]}, feats, deterministic=True
        )


@xla.jit(static_argnames=("variant", "dim", "n_classes", "dtype", "flip", "matmul_precision"))
def predict(
    params: dict,
    images: jax.Array,
    *,
    variant: str,
    dim: int,
    n_classes: int,
    dtype,
    flip: bool,
    matmul_precision: str = "default",
) -> dict:
    """Runs backbone, head and both probes on uint8 images.

    Args:
      params: {"backbone", "head", "cluster_probe", "linear_probe"}, each a flax "params" tree.
      images: (B, H, W, 3) uint8 RGB, H and W multiples of the patch size.
      variant, dim, n_classes, dtype, matmul_precision: the model (config.model).
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
    code_fn = lambda x: compute_code(  # noqa: E731
        params, x, variant=variant, dim=dim, dtype=dtype, matmul_precision=matmul_precision
    )
    if flip:
        # One backbone pass over [images, flipped images]; un-flip the second half's code.
        both = code_fn(jnp.concatenate([images, images[:, :, ::-1]]))
        code = (both[:b] + both[b:, :, ::-1]) / 2
    else:
        code = code_fn(images)
    code = code.astype(jnp.float32)
    code_up = resize_bilinear(code, (h, w), align_corners=False)
    inner = head.ClusterProbe(n_classes).apply({"params": params["cluster_probe"]}, code_up)
    logits = head.LinearProbe(n_classes).apply({"params": params["linear_probe"]}, code_up)
    return {
        "code": code,
        "cluster_log_probs": head.cluster_log_probs(inner, alpha=2.0),
        "linear_logits": logits,
    }


def predict_fn(model_cfg, n_classes: int):
    """predict(params, images, flip=...) bound to config.model."""

    def fn(params, images, *, flip: bool):
        return predict(
            params,
            images,
            variant=model_cfg.variant,
            dim=int(model_cfg.dim),
            n_classes=int(n_classes),
            dtype=str(model_cfg.dtype),
            flip=flip,
            matmul_precision=model_cfg.get("matmul_precision", "default"),
        )

    return fn


def check_params(params: dict, *, variant: str, dim: int, n_classes: int, where: str = "") -> None:
    """Raises a ValueError naming both sides if params do not fit the described model."""
    where = f" in {where}" if where else ""
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params{where} miss {missing}; expected keys {list(PARAM_KEYS)}")
    spec = variants.get_variant(variant)
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
    feats, bparams = vit.build_backbone(variant).init_with_output(k_vit, images)
    hparams = head.SegmentationHead(dim=dim).init(k_head, feats, deterministic=True)
    code = jnp.zeros(feats.shape[:3] + (dim,), jnp.float32)
    return {
        "backbone": bparams["params"],
        "head": hparams["params"],
        "cluster_probe": head.ClusterProbe(n_classes).init(k_cluster, code)["params"],
        "linear_probe": head.LinearProbe(n_classes).init(k_linear, code)["params"],
    }


def backbone_features(model_cfg, *, variant: str | None = None, normalize: bool = True):
    """features(backbone_params, images (B,H,W,3)) -> backbone tokens (B,h,w,C).

    normalize: the images are uint8 and get the ImageNet normalisation here; False: they
    already have it (the KNN command's batches).
    """
    backbone = vit.build_backbone(variant or model_cfg.variant, jnp.dtype(model_cfg.dtype))
    precision = model_cfg.get("matmul_precision", "default")

    def features(backbone_params, images):
        x = normalize_images(images) if normalize else images
        with precision_scope(precision):
            return backbone.apply({"params": backbone_params}, x)

    return features
