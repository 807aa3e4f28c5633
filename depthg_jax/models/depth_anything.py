"""Depth Anything V2 in flax.linen: the project's DINOv2 ViT, a DPT neck and a depth head.

Follows transformers' ``DepthAnythingForDepthEstimation`` (itself a port of
DepthAnything/Depth-Anything-V2's ``DepthAnythingV2``), with parameter names mirroring the
Hugging Face checkpoints (``neck.reassemble_stage.layers.0.projection`` ->
``neck/reassemble_stage/layers_0/projection``):

1. the encoder: the project's DINOv2 ViT (``vit.build_backbone``, ``ViT.intermediate_tokens``),
   whose tokens after the final LayerNorm are taken at four blocks (1-based; Small and Base 3,
   6, 9, 12, Large 5, 12, 18, 24); its position embeddings are resized as transformers'
   ``Dinov2Model`` does (``pos_interpolation="transformers"``: bicubic to an output size; the
   official repository's DINOv2 copy resizes by a scale factor, ``"official"``);
2. the neck: each block's patch tokens as a (h, w) map, a 1x1 projection to
   ``neck_hidden_sizes[i]`` and a resize by ``reassemble_factors[i]`` (4 and 2: a transposed
   convolution with kernel = stride, 1: none, 0.5: a 3x3 stride-2 convolution); a 3x3
   convolution to ``fusion_hidden_size``; then fusion from the deepest map up, each fusion
   layer adding a residual conv unit of the next shallower map, another residual conv unit,
   a bilinear upsampling (align_corners=True) to the next map's size (x2 for the last) and a
   1x1 projection;
3. the head: 3x3 convolution to half the width, bilinear upsampling (align_corners=True) to
   the input size (14 x the token grid), 3x3 convolution, ReLU, 1x1 convolution to one
   channel, ReLU (relative depth: disparity, large = near) or sigmoid x max_depth (metric).

Pre- and post-processing, matched to transformers' ``DPTImageProcessor`` (which the
``-hf`` checkpoints use) and ``post_process_depth_estimation``:
``preprocessed_size`` (the resize keeping the aspect ratio: the scale nearer to 1 of the two
sides', each side rounded to a multiple of 14), ``resize_image`` (PIL, the processor's
resample, uint8 in and out), ``normalisation_table`` (the rescale and normalise of each uint8
value, bit for bit as the processor computes it) and ``upsample_depth`` (PyTorch's bicubic
resize to the image size, align_corners=False).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from depthg_jax.models import variants, vit

# ImageNet statistics, as the Depth Anything processors normalise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_BICUBIC = 3


class DepthAnythingSpec(NamedTuple):
    """Shape of one Depth Anything model: its encoder and its DPT neck and head."""

    encoder: str  # a DINOv2 name of variants.VARIANTS
    layers: tuple[int, ...]  # 1-based blocks whose normed tokens feed the neck
    neck_hidden_sizes: tuple[int, ...]
    fusion_hidden_size: int
    reassemble_factors: tuple[float, ...] = (4, 2, 1, 0.5)
    head_hidden_size: int = 32
    depth_type: str = "relative"  # "relative" (disparity) or "metric" (depth, sigmoid x max)
    max_depth: float = 1.0


VARIANTS: dict[str, DepthAnythingSpec] = {
    # depth-anything/Depth-Anything-V2-{Small,Base,Large}-hf and depth_anything_v2_vit{s,b,l}.pth
    "da2-S": DepthAnythingSpec("v2-S/14", (3, 6, 9, 12), (48, 96, 192, 384), 64),
    "da2-B": DepthAnythingSpec("v2-B/14", (3, 6, 9, 12), (96, 192, 384, 768), 128),
    "da2-L": DepthAnythingSpec("v2-L/14", (5, 12, 18, 24), (256, 512, 1024, 1024), 256),
}
HUB_NAMES = {
    "da2-S": "depth-anything/Depth-Anything-V2-Small-hf",
    "da2-B": "depth-anything/Depth-Anything-V2-Base-hf",
    "da2-L": "depth-anything/Depth-Anything-V2-Large-hf",
}


def check_spec(spec: DepthAnythingSpec) -> None:
    """Raises ValueError for a spec the modules cannot build."""
    enc = variants.get_variant(spec.encoder)
    if enc.family != "v2" or enc.registers:
        raise ValueError(
            f"Depth Anything needs a DINOv2 encoder (no registers), got {spec.encoder!r}"
        )
    n = len(spec.neck_hidden_sizes)
    if n == 0 or len(spec.layers) != n or len(spec.reassemble_factors) != n:
        raise ValueError(
            f"layers {spec.layers}, neck_hidden_sizes {spec.neck_hidden_sizes} and "
            f"reassemble_factors {spec.reassemble_factors} must have the same, non-zero length"
        )
    if not all(1 <= i <= enc.depth for i in spec.layers):
        raise ValueError(f"layers {spec.layers} outside 1..{enc.depth} of {spec.encoder!r}")
    for f in spec.reassemble_factors:
        if not (f == 1 or (f > 1 and f == int(f)) or (0 < f < 1 and (1 / f) == int(1 / f))):
            raise ValueError(f"reassemble factor {f}: expected an integer or 1/integer")
    if spec.depth_type not in ("relative", "metric"):
        raise ValueError(f"depth_type {spec.depth_type!r}: expected 'relative' or 'metric'")


# ----------------------------------------------------------------------------- resizing


@functools.lru_cache(maxsize=256)
def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) of PyTorch's bilinear resize along one axis with
    align_corners=True: source = dst * (in - 1) / (out - 1) in float32, upper = lower + 1 except
    at the last input row."""
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    src = scale * np.arange(out_size, dtype=np.float32)
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.where(lo < in_size - 1, lo + 1, lo)
    return lo.astype(np.int32), hi.astype(np.int32), (src - lo).astype(np.float32)


def resize_bilinear_aligned(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) -> (B, H, W, C): ``F.interpolate(mode="bilinear", align_corners=True)``,
    done as two gathers and a lerp per axis."""
    for axis, out in ((1, size[0]), (2, size[1])):
        if x.shape[axis] == out:
            continue
        lo, hi, t = linear_taps(x.shape[axis], out)
        shape = [1] * x.ndim
        shape[axis] = out
        t = jnp.asarray(t, x.dtype).reshape(shape)
        a, b = jnp.take(x, jnp.asarray(lo), axis=axis), jnp.take(x, jnp.asarray(hi), axis=axis)
        x = a * (1 - t) + b * t
    return x


@functools.lru_cache(maxsize=64)
def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix M (out, in) with M @ x == PyTorch's bicubic resize of x to ``out_size`` along one
    axis (align_corners=False, a = -0.75, no antialiasing, taps clamped to the edge).

    As ``vit.bicubic_matrix`` but with an output size rather than a scale factor, and the
    source coordinate scale * (dst + 0.5) - 0.5 rounded once to float32, as ATen's CPU kernel
    computes it (a fused multiply-add; rounding the product first moves some taps by an ulp).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - idx.astype(np.float32), 0.0, 1.0).astype(np.float32)
    weights = vit._cubic_weights(t)
    matrix = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        np.add.at(
            matrix, (np.arange(out_size), np.clip(idx - 1 + tap, 0, in_size - 1)), weights[:, tap]
        )
    return matrix.astype(np.float32)


def upsample_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) prediction -> (H, W) float32, as transformers' ``post_process_depth_estimation``:
    PyTorch's bicubic resize to an output size, as two ``bicubic_resize_matrix`` products."""
    h, w = depth.shape
    rows, cols = bicubic_resize_matrix(h, size[0]), bicubic_resize_matrix(w, size[1])
    return (rows @ np.asarray(depth, np.float32) @ cols.T).astype(np.float32)


def preprocessed_size(
    height: int,
    width: int,
    target: tuple[int, int] = (518, 518),
    multiple: int = 14,
    keep_aspect_ratio: bool = True,
) -> tuple[int, int]:
    """(h, w) the DPT processor resizes an image to: with ``keep_aspect_ratio`` both sides take
    the scale (target / side) nearer to 1; each side is then rounded to a multiple of
    ``multiple`` (half to even, as Python's round), at least one multiple."""
    sh, sw = target[0] / height, target[1] / width
    if keep_aspect_ratio:
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh

    def constrain(value: float) -> int:
        x = round(value / multiple) * multiple
        return x if x >= 0 else math.ceil(value / multiple) * multiple

    return max(constrain(sh * height), multiple), max(constrain(sw * width), multiple)


def resize_image(image: np.ndarray, size: tuple[int, int], resample: int = PIL_BICUBIC):
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with PIL, as the processor resizes (before rescaling)."""
    if image.shape[:2] == tuple(size):
        return np.ascontiguousarray(image)
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((size[1], size[0]), resample=resample))


def normalisation_table(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    rescale: float = 1 / 255,
) -> np.ndarray:
    """(256, 3) float32: the processor's value for each uint8 level of each channel: the
    level x rescale in float64, cast to float32, minus mean, divided by std (float32)."""
    levels = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)[:, None]
    return ((levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
        np.float32
    )


def normalise(images: jax.Array, table: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) -> float32 network input through a ``normalisation_table``."""
    idx = images.astype(jnp.int32)
    return jnp.stack([table[:, c][idx[..., c]] for c in range(3)], axis=-1)


# ----------------------------------------------------------------------------- layers


def _conv(features: int, kernel: int, name: str, dtype, stride: int = 1, bias: bool = True):
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class TransposedPatchConv(nn.Module):
    """PyTorch's ConvTranspose2d with kernel = stride = ``factor`` and no padding: every input
    pixel becomes a factor x factor block. ``kernel`` is (f, f, C_in, C_out)."""

    features: int
    factor: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f, (b, h, w, c) = self.factor, x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (f, f, c, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.einsum("bhwc,ijcd->bhiwjd", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, h * f, w * f, self.features) + bias.astype(self.dtype)


class ReassembleLayer(nn.Module):
    """1x1 projection, then the resize of ``factor`` (transposed conv / none / strided conv)."""

    channels: int
    factor: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.channels, 1, "projection", self.dtype)(x)
        if self.factor > 1:
            return TransposedPatchConv(self.channels, int(self.factor), self.dtype, name="resize")(
                x
            )
        if self.factor < 1:
            stride = int(round(1 / self.factor))
            return _conv(self.channels, 3, "resize", self.dtype, stride=stride)(x)
        return x


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convolutions with bias (pre-activation)."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(self.features, 3, "convolution1", self.dtype)(nn.relu(x))
        y = _conv(self.features, 3, "convolution2", self.dtype)(nn.relu(y))
        return x + y


class FusionLayer(nn.Module):
    """[x + unit1(residual)] -> unit2 -> bilinear (align_corners) to ``size`` or x2 -> 1x1."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual=None, size: tuple[int, int] | None = None) -> jax.Array:
        if residual is not None:
            if residual.shape != x.shape:
                raise ValueError(f"fusion: residual {residual.shape} vs {x.shape}")
            x = x + ResidualConvUnit(self.features, self.dtype, name="residual_layer1")(residual)
        x = ResidualConvUnit(self.features, self.dtype, name="residual_layer2")(x)
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = resize_bilinear_aligned(x, tuple(size))
        return _conv(self.features, 1, "projection", self.dtype)(x)


class ReassembleStage(nn.Module):
    neck_hidden_sizes: tuple[int, ...]
    reassemble_factors: tuple[float, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
        pairs = zip(self.neck_hidden_sizes, self.reassemble_factors, strict=True)
        return [
            ReassembleLayer(c, f, self.dtype, name=f"layers_{i}")(x)
            for i, ((c, f), x) in enumerate(zip(pairs, maps, strict=True))
        ]


class FusionStage(nn.Module):
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
        maps = list(maps)[::-1]  # deepest first
        fused, out = None, []
        for i, x in enumerate(maps):
            size = maps[i + 1].shape[1:3] if i + 1 < len(maps) else None
            layer = FusionLayer(self.features, self.dtype, name=f"layers_{i}")
            fused = layer(x, size=size) if fused is None else layer(fused, x, size=size)
            out.append(fused)
        return out


class DepthAnythingNeck(nn.Module):
    """Token maps of the chosen blocks -> fused feature maps (shallowest-resolution last)."""

    neck_hidden_sizes: tuple[int, ...]
    reassemble_factors: tuple[float, ...]
    fusion_hidden_size: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: Sequence[jax.Array], grid: tuple[int, int]) -> list[jax.Array]:
        """tokens: one (B, P + gh*gw, C) per block, P leading tokens (CLS, registers) dropped."""
        gh, gw = grid
        maps = [t[:, t.shape[1] - gh * gw :].reshape(t.shape[0], gh, gw, -1) for t in tokens]
        maps = ReassembleStage(
            self.neck_hidden_sizes, self.reassemble_factors, self.dtype, name="reassemble_stage"
        )(maps)
        maps = [
            _conv(self.fusion_hidden_size, 3, f"convs_{i}", self.dtype, bias=False)(x)
            for i, x in enumerate(maps)
        ]
        return FusionStage(self.fusion_hidden_size, self.dtype, name="fusion_stage")(maps)


class DepthAnythingHead(nn.Module):
    """The last fused map -> (B, H, W) float32 depth at the input size (patch x grid)."""

    fusion_hidden_size: int
    head_hidden_size: int
    patch: int
    depth_type: str = "relative"
    max_depth: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        x = _conv(self.fusion_hidden_size // 2, 3, "conv1", self.dtype)(x)
        x = resize_bilinear_aligned(x, (grid[0] * self.patch, grid[1] * self.patch))
        x = nn.relu(_conv(self.head_hidden_size, 3, "conv2", self.dtype)(x))
        x = _conv(1, 1, "conv3", self.dtype)(x)[..., 0].astype(jnp.float32)
        if self.depth_type == "metric":
            return nn.sigmoid(x) * self.max_depth
        return nn.relu(x)


class DepthAnything(nn.Module):
    """Depth Anything: ImageNet-normalised (B, H, W, 3) images, H and W multiples of 14 ->
    (B, H, W) float32 depth (relative: disparity, large = near).

    Attributes:
      spec: the model's shape (``VARIANTS`` or one read from a checkpoint's config).
      dtype: compute dtype (bfloat16 on accelerators); parameters are float32.
      pos_interpolation: the encoder's position-embedding resize: "transformers" (what
        ``DepthAnythingForDepthEstimation`` does, the default) or "official" (the
        Depth-Anything-V2 repository's DINOv2: scale factor (g + 0.1) / 37).
      attention: the encoder's attention implementation (``vit.ATTENTIONS``; "auto": cuDNN
        flash attention on CUDA in bfloat16, XLA's elsewhere).
    """

    spec: DepthAnythingSpec
    dtype: jnp.dtype = jnp.float32
    pos_interpolation: str = "transformers"
    attention: str = "auto"

    def setup(self):
        check_spec(self.spec)
        self.backbone = vit.build_backbone(self.spec.encoder, self.dtype, self.attention).clone(
            pos_interpolation=self.pos_interpolation
        )
        self.neck = DepthAnythingNeck(
            tuple(self.spec.neck_hidden_sizes),
            tuple(self.spec.reassemble_factors),
            self.spec.fusion_hidden_size,
            self.dtype,
        )
        self.head = DepthAnythingHead(
            self.spec.fusion_hidden_size,
            self.spec.head_hidden_size,
            variants.patch_size(self.spec.encoder),
            self.spec.depth_type,
            self.spec.max_depth,
            self.dtype,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        grid = vit.check_images(images, variants.patch_size(self.spec.encoder))
        tokens = self.backbone.intermediate_tokens(images, layers=tuple(self.spec.layers))
        return self.head(self.neck(tokens, grid)[-1], grid)
