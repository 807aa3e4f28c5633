"""The whole DepthG model in one place: its description (`ModelSpec`), its params, its forward.

`ModelSpec` is a frozen, hashable description (backbone variant, code dim, classes, compute
dtype, matmul precision, dropout) built once from the config and passed wherever the model is
built, initialised, checked or applied; jitted functions take it as a static argument. This
module owns the parameter keys ({"backbone", "head", "cluster_probe", "linear_probe"}), loads
or seeds the backbone, checks params against a spec, and runs the frozen features
(`frozen_features`, the one backbone forward of training, evaluation, KNN and baselines) and
the inference forward (`predict`).

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
class ModelSpec:
    """What a DepthG model is, without its params (those are plain pytrees).

    Hashable: a static argument of jitted functions, and a cache key.
    """

    variant: str
    dim: int
    n_classes: int
    dtype: str = "float32"  # backbone compute dtype
    matmul_precision: str = "default"
    dropout: float = 0.0  # the head's channel dropout while training
    attention: str = "auto"  # the backbone's attention implementation (vit.ATTENTIONS)

    def __post_init__(self):
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul precision {self.matmul_precision!r}; expected one of {MATMUL_PRECISIONS}"
            )

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        """The spec of a (resolved or exported) config: config.model and data.n_classes."""
        m = config.model
        return cls(
            variant=str(m.variant),
            dim=int(m.dim),
            n_classes=int(config.data.n_classes),
            dtype=str(m.dtype),
            matmul_precision=str(m.get("matmul_precision", "default")),
            dropout=float(m.get("dropout", 0.0)),
            attention=str(m.get("attention", "auto")),
        )

    @property
    def patch(self) -> int:
        return variants.patch_size(self.variant)

    @property
    def width(self) -> int:
        """Channels C of the backbone's features."""
        return variants.embed_dim(self.variant)

    @property
    def backbone(self) -> nn.Module:
        return vit.build_backbone(self.variant, jnp.dtype(self.dtype), self.attention)

    @property
    def head(self) -> head.SegmentationHead:
        return head.SegmentationHead(dim=self.dim, dropout=self.dropout)

    @property
    def cluster_probe(self) -> head.ClusterProbe:
        return head.ClusterProbe(n_classes=self.n_classes)

    @property
    def linear_probe(self) -> head.LinearProbe:
        return head.LinearProbe(n_classes=self.n_classes)

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


# --------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------


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


def init_trainable(spec: ModelSpec, key: jax.Array) -> dict:
    """Random {"head", "cluster_probe", "linear_probe"} params (PyTorch default inits)."""
    return _trainable_from_keys(spec, *jax.random.split(key, 3))


def _trainable_from_keys(spec: ModelSpec, k_head, k_cluster, k_linear) -> dict:
    feats = jnp.zeros((1, 2, 2, spec.width), jnp.float32)
    code = jnp.zeros((1, 2, 2, spec.dim), jnp.float32)
    return {
        "head": spec.head.init({"params": k_head}, feats, deterministic=True)["params"],
        "cluster_probe": spec.cluster_probe.init(k_cluster, code)["params"],
        "linear_probe": spec.linear_probe.init(k_linear, code)["params"],
    }


def init_params(spec: ModelSpec, key: jax.Array, *, res: int = 32) -> dict:
    """Randomly initialised params of the whole model (tests, demos without weights)."""
    return _init_params(key, spec=spec, res=res)


@xla.jit(static_argnames=("spec", "res"))
def _init_params(key: jax.Array, *, spec: ModelSpec, res: int) -> dict:
    k_vit, *k_trainable = jax.random.split(key, 4)
    images = jnp.zeros((1, res, res, 3), jnp.float32)
    backbone = vit.build_backbone(spec.variant).init(k_vit, images)["params"]
    return full_params(backbone, _trainable_from_keys(spec, *k_trainable))


def full_params(backbone: dict, trainable: dict) -> dict:
    """The whole model's params from the frozen backbone and the trained parts."""
    missing = [k for k in TRAINABLE_KEYS if k not in trainable]
    if missing:
        raise ValueError(f"trainable params miss {missing}; expected keys {list(TRAINABLE_KEYS)}")
    return {"backbone": backbone, **{k: trainable[k] for k in TRAINABLE_KEYS}}


def check_params(params: dict, spec: ModelSpec, *, where: str = "") -> None:
    """Raises a ValueError naming both sides if params do not fit the described model."""
    where = f" in {where}" if where else ""
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params{where} miss {missing}; expected keys {list(PARAM_KEYS)}")
    variant = variants.get_variant(spec.variant)
    backbone = params["backbone"]
    found = {
        "backbone width": (backbone["cls_token"].shape[-1], variant.dim),
        "backbone blocks": (sum(k.startswith("blocks_") for k in backbone), variant.depth),
        "patch size": (backbone["patch_embed"]["proj"]["kernel"].shape[0], variant.patch),
        "code dim": (params["head"]["linear"]["kernel"].shape[-1], spec.dim),
        "cluster probe classes": (params["cluster_probe"]["clusters"].shape[0], spec.n_classes),
        "linear probe classes": (
            params["linear_probe"]["linear"]["kernel"].shape[-1],
            spec.n_classes,
        ),
    }
    bad = [f"{name} {got} (expected {want})" for name, (got, want) in found.items() if got != want]
    if bad:
        raise ValueError(
            f"params{where} do not fit variant {spec.variant!r}, dim {spec.dim}, "
            f"{spec.n_classes} classes: " + "; ".join(bad)
        )


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------


def frozen_features(
    spec: ModelSpec, backbone_params: dict, images: jax.Array, *, normalized: bool = False
) -> jax.Array:
    """The frozen backbone's patch features (B, H/p, W/p, C), float32, no gradient.

    images: uint8 (B, H, W, 3), normalised here; or already ImageNet-normalised floats with
    normalized=True (the KNN command's batches).
    """
    x = images if normalized else normalize_images(images)
    with spec.precision():
        feats = spec.backbone.apply({"params": backbone_params}, x)
    return jax.lax.stop_gradient(feats.astype(jnp.float32))


def head_code(spec: ModelSpec, head_params: dict, feats: jax.Array) -> jax.Array:
    """The head's code of features (deterministic: no dropout), float32."""
    with spec.precision():
        code = spec.head.apply({"params": head_params}, feats, deterministic=True)
    return code.astype(jnp.float32)


def compute_code(spec: ModelSpec, params: dict, images: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> code (B, H/p, W/p, dim), deterministic (no dropout)."""
    return head_code(spec, params["head"], frozen_features(spec, params["backbone"], images))


def features_for_predict(
    spec: ModelSpec, backbone_params: dict, images: jax.Array, *, flip: bool
) -> jax.Array:
    """The backbone pass `predict_from_features` takes: the images' features, or with flip
    those of [images, horizontally flipped images] (one pass over 2B)."""
    if flip:
        images = jnp.concatenate([images, images[:, :, ::-1]])
    return frozen_features(spec, backbone_params, images)


def predict_from_features(
    spec: ModelSpec, trainable: dict, feats: jax.Array, image_hw: tuple[int, int], *, flip: bool
) -> dict:
    """Head and probes on `features_for_predict`'s output; see `predict` for the outputs."""
    code = head_code(spec, trainable["head"], feats)
    if flip:
        b = code.shape[0] // 2
        code = (code[:b] + code[b:, :, ::-1]) / 2  # un-flip the second half's code
    code_up = resize_bilinear(code, image_hw, align_corners=False)
    inner = spec.cluster_probe.apply({"params": trainable["cluster_probe"]}, code_up)
    logits = spec.linear_probe.apply({"params": trainable["linear_probe"]}, code_up)
    return {
        "code": code,
        "cluster_log_probs": head.cluster_log_probs(inner, alpha=2.0),
        "linear_logits": logits,
    }


@xla.jit(static_argnames=("spec", "flip"))
def predict(params: dict, images: jax.Array, spec: ModelSpec, flip: bool) -> dict:
    """Runs backbone, head and both probes on uint8 images.

    Args:
      params: {"backbone", "head", "cluster_probe", "linear_probe"}, each a flax "params" tree.
      images: (B, H, W, 3) uint8 RGB, H and W multiples of the patch size.
      spec: the model.
      flip: average the code with the flipped code of the horizontally flipped image.
    Returns:
      dict with "code" (B, h, w, K) float32 at the feature grid, "cluster_log_probs"
      (B, H, W, n) = log_softmax(2 * cosine to centroids), and "linear_logits" (B, H, W, n),
      both computed from the code upsampled to the image size.
    """
    missing = [k for k in PARAM_KEYS if k not in params]
    if missing:
        raise ValueError(f"params miss {missing}; expected keys {list(PARAM_KEYS)}")
    feats = features_for_predict(spec, params["backbone"], images, flip=flip)
    return predict_from_features(spec, params, feats, images.shape[1:3], flip=flip)
