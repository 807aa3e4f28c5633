"""One Vision Transformer for DINO, DINOv2 (with or without registers) and DINOv3.

``ViT(variant)`` follows the three reference implementations (facebookresearch/dino's and
dinov2's ``VisionTransformer`` / ``DinoVisionTransformer`` as released on torch hub,
facebookresearch/dinov3's ``DinoVisionTransformer``) with parameter names mirroring their
checkpoints: patch embedding, CLS token, learned position embeddings (resized to the input
grid by the family's rule) or 2-D rotary embeddings on the patch tokens, register tokens,
pre-norm blocks with optional LayerScale, a GELU MLP or SwiGLU, final LayerNorm. It returns
the patch tokens after the final norm as (B, H/p, W/p, C) float32, CLS and registers dropped;
``intermediate_tokens`` returns every token of chosen blocks (Depth Anything's taps).

Where the pieces live, and why:

* ``variants.py``: the table (``VariantSpec`` rows) and its lookups. It imports no JAX, so
  the config, the converters and the memory estimates read shapes without building a model,
  and a row's layout flags (``rope``, ``layer_scale``, ``qkv_bias`` ...) are the one place
  the model and the converters' expected keys both read.
* this module: the model and everything that shapes its numbers (position resizing, RoPE
  tables, the attention implementation choice), as big_vision keeps weight surgery next to
  the model. One ``Attention``, one ``Block``, one ``PatchEmbed`` serve every family; the
  options are read off the variant's row, so a variant name is the whole configuration.

``DinoViT``, ``Dinov2ViT`` and ``Dinov3ViT`` are the same module pinned to one family (they
refuse another family's variant); ``build_backbone`` returns the pinned class of a variant.

Learned positions. DINO (v1) resizes the stored grid with PyTorch bicubic and a scale factor
(g + 0.1) / g0. For DINOv2 the two references differ for the models without registers:
facebookresearch/dinov2 passes the same scale factor, transformers' ``Dinov2Model`` an output
size; both agree for the register models (output size, antialias=True). The
``pos_interpolation`` field picks one ("official", the default, or "transformers").

RoPE (DINOv3; "separate" coordinate normalisation, base 100): patch centres (i + 0.5) / n per
axis, mapped to [-1, 1]; angles 2 pi * coord / period with periods base ** (4k / head_dim),
k < head_dim / 4, y then x, tiled twice; computed in float32 at any grid and applied in
float32 to the patch tokens' queries and keys. The training-time coordinate augmentations are
not implemented (the backbone is frozen).
"""

from __future__ import annotations

import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

from depthg_jax.models.variants import VariantSpec, get_variant

# PyTorch's bicubic kernel uses this cubic coefficient (jax.image.resize uses -0.5).
TORCH_CUBIC_A = -0.75
# PyTorch's antialiased bicubic (ported from PIL) uses Keys' cubic with a = -0.5.
AA_CUBIC_A = -0.5
# DINO adds this to the target grid before computing the interpolation scale factor.
DINO_SCALE_OFFSET = 0.1
POS_INTERPOLATIONS = ("official", "transformers")
ROPE_BASE = 100.0
# "auto": the platform's fused kernel where it applies, else "xla"; "explicit": logits,
# float32 softmax and weighted sum spelled out (the path that can return attention maps).
ATTENTIONS = ("auto", "xla", "cudnn", "explicit")
# cuDNN flash attention takes half-precision inputs with a head width that is a multiple of 8,
# up to 128 before Hopper (256 from Hopper on; 128 is the bound that holds on every GPU).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128
FAMILY_NAMES = {"v1": "DINO (v1)", "v2": "DINOv2", "v3": "DINOv3"}


# ----------------------------------------------------------------------------- positions


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
    """The (out, in) resize matrix of one axis for a learned-position model and reference."""
    if registers:  # DINOv2 + registers, both references: size=(gh, gw), antialias=True
        return antialias_bicubic_matrix(in_size, out_size)
    if mode == "official":  # scale_factor=(g + 0.1) / g0: DINO v1, facebookresearch/dinov2
        return bicubic_matrix(in_size, out_size, (out_size + DINO_SCALE_OFFSET) / in_size)
    if mode == "transformers":  # size=(gh, gw): scale in/out
        return bicubic_matrix(in_size, out_size, out_size / in_size)
    raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {mode!r}")


def stored_grid(pos_embed: jax.Array) -> int:
    """Side g0 of the square patch grid of position embeddings (1, 1+g0*g0, C)."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1+g0*g0, C), got shape {pos_embed.shape}")
    n = pos_embed.shape[1] - 1
    g0 = math.isqrt(n)
    if g0 * g0 != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    return g0


def resize_pos_embed(
    pos_embed: jax.Array, grid_hw: tuple[int, int], mode: str = "official", registers: int = 0
) -> jax.Array:
    """Resizes position embeddings (1, 1+g0*g0, C) to a (gh, gw) grid: (1, 1+gh*gw, C).

    The defaults are DINO's ``interpolate_pos_encoding`` (PyTorch bicubic, scale factor
    (g + 0.1) / g0, align_corners False). ``registers`` selects DINOv2's register models'
    antialiased resize; ``mode`` the no-register DINOv2 reference (see the module doc). Every
    reference returns the stored embeddings unchanged at the stored square grid; the CLS
    embedding is never resized. The resize runs in float32.
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


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> np.ndarray:
    """DINOv3's RoPE periods (head_dim / 4,), float32: base ** (4k / head_dim)."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
    return (np.float32(base) ** np.arange(0, 1, 4 / head_dim, dtype=np.float32)).astype(np.float32)


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


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(t: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates the last P tokens of t (B, N, heads, hd) by (cos, sin) (P, hd), in float32."""
    cos, sin = rope
    prefix = t.shape[1] - cos.shape[0]
    patches = t[:, prefix:].astype(jnp.float32)
    patches = patches * cos[:, None] + rotate_half(patches) * sin[:, None]
    return jnp.concatenate([t[:, :prefix], patches.astype(t.dtype)], axis=1)


# ----------------------------------------------------------------------------- attention


def backend_platform() -> str:
    """The platform a jit traced here runs on by default: "cpu", "cuda", "rocm" or "tpu"."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = jax.extend.backend.get_backend().platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"


def attention_implementation(platform: str, dtype, head_dim: int, requested: str = "auto") -> str:
    """Which attention runs: "cudnn", "xla" or "explicit", for a platform (``backend_platform``
    names), compute dtype, head width and requested implementation (one of ``ATTENTIONS``).

    "auto" is cuDNN's flash attention on CUDA when the dtype and head width allow it; on a
    CPU the explicit einsum/softmax path, which XLA:CPU runs faster than its
    ``dot_product_attention`` (S/8 at 224 px 8%, the Depth Anything Small encoder at 518 px
    ~20%: bench/RESULTS.md); elsewhere (TPU, CUDA in float32) ``jax.nn.dot_product_attention``'s
    XLA path, whose lowering is plain HLO, so exported programs carry no custom call. "cudnn"
    where cuDNN cannot run is refused.
    """
    if requested not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {requested!r}")
    if requested in ("xla", "explicit"):
        return requested
    dtype_name = jnp.dtype(dtype).name
    why_not = []
    if platform != "cuda":
        why_not.append(f"the platform is {platform!r}, not 'cuda'")
    if dtype_name not in CUDNN_DTYPES:
        why_not.append(f"the compute dtype is {dtype_name}, not one of {CUDNN_DTYPES}")
    if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
        why_not.append(f"the head width {head_dim} is not a multiple of 8 up to 128")
    if not why_not:
        return "cudnn"
    if requested == "cudnn":
        raise ValueError(f"attention='cudnn' cannot run here: {'; '.join(why_not)}")
    return "explicit" if platform == "cpu" else "xla"


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str, return_map: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """softmax(q k^T) v per head for q, k, v (B, N, heads, hd), q already scaled.

    "explicit" (or ``return_map``) spells it out with a float32 softmax and returns the map
    (B, heads, N, N) float32; "xla" / "cudnn" call ``jax.nn.dot_product_attention`` with
    that implementation (scale 1: the caller's scaling is the references') and return None.
    """
    if return_map or implementation == "explicit":
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        # Softmax in float32 so bf16 compute does not lose the normalisation.
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", attn.astype(v.dtype), v), attn
    out = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
    return out, None


# ----------------------------------------------------------------------------- layers


def _trunc_normal_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """N(0, 0.02) truncated at +-2 (absolute), DINO's init of Linear weights and tokens."""
    return 0.02 * jax.random.truncated_normal(key, -2.0 / 0.02, 2.0 / 0.02, shape, dtype)


def _dense(features: int, name: str, dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_trunc_normal_init,
        bias_init=nn.initializers.zeros,
        precision=None,
        name=name,
    )


def _layer_norm(name: str, dtype, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p convolution; holds the checkpoints' ``patch_embed.proj``."""

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


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and ``proj``, as every
    reference; optional RoPE on the last ``rope[0].shape[0]`` tokens (DINOv3: the patches).

    ``implementation`` is a resolved one ("explicit", "xla", "cudnn"; see
    ``attention_implementation``). Returns (output, attention map or None): the map (B, heads,
    N, N), float32, is computed (on the explicit path) only when asked for.
    """

    dim: int
    heads: int
    qkv_bias: bool = True
    implementation: str = "explicit"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
        return_map: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        b, n, c = x.shape
        head_dim = c // self.heads
        qkv = _dense(3 * self.dim, "qkv", self.dtype, self.qkv_bias)(x)
        qkv = qkv.reshape(b, n, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out, attn = attend(q * (head_dim**-0.5), k, v, self.implementation, return_map)
        return _dense(self.dim, "proj", self.dtype)(out.reshape(b, n, c)), attn


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    dim: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.hidden, "fc1", self.dtype)(x)
        x = nn.gelu(x, approximate=False)
        return _dense(self.dim, "fc2", self.dtype)(x)


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


class LayerScale(nn.Module):
    """x * gamma (per channel), the checkpoints' ``lsN.gamma``."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.ones, (self.dim,), jnp.float32)
        return x * gamma.astype(self.dtype)


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); the LayerScales
    only where the variant has them (DINOv2, DINOv3)."""

    spec: VariantSpec
    attention: str = "explicit"  # a resolved implementation, see Attention
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, rope=None, return_map: bool = False):
        spec, dtype, eps = self.spec, self.dtype, self.spec.layernorm_eps
        attention = Attention(
            spec.dim, spec.heads, spec.qkv_bias, self.attention, dtype, name="attn"
        )
        y, attn = attention(_layer_norm("norm1", dtype, eps)(x), rope, return_map)
        if spec.layer_scale:
            y = LayerScale(spec.dim, dtype, name="ls1")(y)
        x = x + y
        h = _layer_norm("norm2", dtype, eps)(x)
        if spec.swiglu:
            h = SwiGLU(spec.dim, spec.mlp_hidden, spec.fused_swiglu, dtype, name="mlp")(h)
        else:
            h = Mlp(spec.dim, spec.mlp_hidden, dtype, name="mlp")(h)
        if spec.layer_scale:
            h = LayerScale(spec.dim, dtype, name="ls2")(h)
        return x + h, attn


# ----------------------------------------------------------------------------- model


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


class ViT(nn.Module):
    """The backbone of any variant of ``variants.VARIANTS``.

    Attributes:
      variant: a row of ``variants.VARIANTS`` ("S/8", "v2reg-B/14", "v3-L/16", "mu/8" ...).
      dtype: compute dtype (bfloat16 on accelerators); parameters are always float32, RoPE
        and the attention softmax run in float32.
      pos_interpolation: "official" or "transformers": the learned-position resize of the
        models without registers (only DINOv2's references differ; see the module doc).
      attention: one of ``ATTENTIONS``. "auto" (default) picks by ``attention_implementation``
        for the platform jit traces for (``backend_platform()``): cuDNN flash attention on
        CUDA in bf16/fp16, XLA's ``dot_product_attention`` elsewhere. "explicit" is the
        einsum/softmax path; a requested attention map always comes from it (last block only).
        The choice is made at trace time: exporting from this machine for another platform
        traces this machine's choice ("xla" on a CPU).
    """

    variant: str = "S/8"
    dtype: jnp.dtype = jnp.float32
    pos_interpolation: str = "official"
    attention: str = "auto"

    # The family a subclass is pinned to (None: any).
    family: ClassVar[str | None] = None

    def __call__(
        self, images: jax.Array, return_attention: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Runs the backbone on ImageNet-normalised (B, H, W, 3) images.

        Returns float32 features (B, H/p, W/p, C) after the final norm; with
        ``return_attention`` also the last block's attention (B, heads, T, T), float32, tokens
        ordered CLS, registers, patches.
        """
        spec = self._spec()
        gh, gw = check_images(images, spec.patch)
        (tokens,), attn = self._forward(images, (spec.depth,), True, return_attention)
        b, c = images.shape[0], spec.dim
        feats = tokens[:, 1 + spec.registers :].reshape(b, gh, gw, c)
        return (feats, attn) if return_attention else feats

    def intermediate_tokens(
        self, images: jax.Array, layers: tuple[int, ...], norm: bool = True
    ) -> tuple[jax.Array, ...]:
        """Every token after each of ``layers`` (1-based block numbers, any order).

        Block i's output is transformers' ``hidden_states[i]`` (``Dinov2Backbone``'s
        "stage{i}"). Returns one float32 (B, 1 + registers + h*w, C) array per entry, CLS
        first, then the registers, then the patches row-major; with ``norm`` the final
        LayerNorm is applied to each. Only the blocks up to max(layers) run.
        """
        spec = self._spec()
        layers = tuple(int(i) for i in layers)
        if not layers or not all(1 <= i <= spec.depth for i in layers):
            raise ValueError(
                f"layers must be block numbers in 1..{spec.depth} for {self.variant!r}, got "
                f"{layers}"
            )
        check_images(images, spec.patch)
        return self._forward(images, layers, norm, False)[0]

    def _spec(self) -> VariantSpec:
        spec = get_variant(self.variant)
        if self.family is not None and spec.family != self.family:
            raise ValueError(
                f"{type(self).__name__} runs {FAMILY_NAMES[self.family]} variants; "
                f"{self.variant!r} is a {spec.family} variant: use ViT({self.variant!r}), or "
                "build it with vit.build_backbone"
            )
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got "
                f"{self.pos_interpolation!r}"
            )
        return spec

    def resolved_attention(self) -> str:
        """The attention this module runs here (see ``attention_implementation``)."""
        spec = get_variant(self.variant)
        return attention_implementation(
            backend_platform(), self.dtype, spec.head_dim, self.attention
        )

    @nn.compact
    def _forward(
        self, images: jax.Array, taps: tuple[int, ...], norm: bool, return_map: bool
    ) -> tuple[tuple[jax.Array, ...], jax.Array | None]:
        """(tokens after each block in taps, as float32; the last block's map if asked)."""
        spec, dtype = self._spec(), self.dtype
        gh, gw = check_images(images, spec.patch)
        b, c = images.shape[0], spec.dim
        x = PatchEmbed(c, spec.patch, dtype, name="patch_embed")(images)
        cls = self.param("cls_token", _trunc_normal_init, (1, 1, c))
        tokens = [jnp.broadcast_to(cls, (b, 1, c)), x.reshape(b, -1, c)]  # row-major patches
        tokens = jnp.concatenate([t.astype(dtype) for t in tokens], axis=1)
        rope = None
        if spec.rope:
            cos, sin = rope_tables(gh, gw, spec.head_dim)
            rope = (jnp.asarray(cos), jnp.asarray(sin))
        else:
            pos_embed = self.param("pos_embed", _trunc_normal_init, self._pos_embed_shape(spec))
            pos = resize_pos_embed(pos_embed, (gh, gw), self.pos_interpolation, spec.registers)
            tokens = tokens + pos.astype(dtype)
        reg = self._register_and_mask_tokens(spec)
        if reg is not None:
            reg = jnp.broadcast_to(reg, (b, spec.registers, c)).astype(dtype)
            tokens = jnp.concatenate([tokens[:, :1], reg, tokens[:, 1:]], axis=1)
        outputs, attn = {}, None
        last, attention = max(taps), self.resolved_attention()
        for i in range(1, last + 1):
            block = Block(spec, attention, dtype, name=f"blocks_{i - 1}")
            tokens, attn = block(tokens, rope, return_map and i == last)
            if i in taps:
                outputs[i] = tokens
        if norm:
            final_norm = _layer_norm("norm", dtype, spec.layernorm_eps)
            outputs = {i: final_norm(t) for i, t in outputs.items()}
        return tuple(outputs[i].astype(jnp.float32) for i in taps), attn

    def _register_and_mask_tokens(self, spec: VariantSpec) -> jax.Array | None:
        """Declares the register tokens and the mask token where the variant has them;
        returns the register tokens (1, R, C) or None.

        The mask token is unused at inference (it replaces masked patches in training); it is
        kept so the params mirror the checkpoints. Creation order fixes each parameter's init
        key, so it stays as the DINOv2 (mask, registers) and DINOv3 (storage, mask) modules
        had it: seeded random backbones do not change.
        """
        names = [spec.register_name] if spec.registers else []
        if spec.mask_token:
            names = [*names, "mask_token"] if spec.rope else ["mask_token", *names]
        reg = None
        for name in names:
            if name == "mask_token":
                self.param(name, nn.initializers.zeros, (1, spec.dim))
            else:
                reg = self.param(name, _trunc_normal_init, (1, spec.registers, spec.dim))
        return reg

    def _pos_embed_shape(self, spec: VariantSpec) -> tuple[int, int, int]:
        """The stored grid: the loaded checkpoint's if params exist, else the pretraining one."""
        if self.has_variable("params", "pos_embed"):
            return tuple(self.get_variable("params", "pos_embed").shape)
        g0 = spec.pretrain_grid
        return (1, 1 + g0 * g0, spec.dim)


class DinoViT(ViT):
    """``ViT`` pinned to DINO (v1) variants ("S/8", "B/8", ..., "mu/8")."""

    variant: str = "S/8"
    family: ClassVar[str | None] = "v1"


class Dinov2ViT(ViT):
    """``ViT`` pinned to DINOv2 variants ("v2-S/14", "v2reg-B/14", ..., "v2-mu/14")."""

    variant: str = "v2-S/14"
    family: ClassVar[str | None] = "v2"


class Dinov3ViT(ViT):
    """``ViT`` pinned to DINOv3 variants ("v3-S/16", "v3-B/16", ..., "v3-mu/16")."""

    variant: str = "v3-S/16"
    family: ClassVar[str | None] = "v3"


_PINNED = {"v1": DinoViT, "v2": Dinov2ViT, "v3": Dinov3ViT}


def build_backbone(variant: str, dtype=jnp.float32, attention: str = "auto") -> ViT:
    """The backbone module of any variant (its family's pinned ``ViT``: DinoViT, Dinov2ViT or
    Dinov3ViT). Takes ImageNet-normalised (B, H, W, 3) images and returns (B, H/p, W/p, C)
    float32 patch features after the final norm (CLS and register tokens dropped).
    `attention`: one of ATTENTIONS (see ViT)."""
    return _PINNED[get_variant(variant).family](variant=variant, dtype=dtype, attention=attention)
