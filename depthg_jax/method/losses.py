"""The DepthG objective: STEGO correlation terms, the depth-feature term, probe losses.

Pure JAX, NHWC, no hidden randomness: sample coordinates and negative permutations are
arguments (see `depthg_jax.method.sampling`). Each public function mirrors a function of the
released PyTorch code (docs/method.md) so parity can be checked term by term. The terms are
unweighted; the trainer applies the λ weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from depthg_jax.method import image_ops, sampling

_HIGHEST = jax.lax.Precision.HIGHEST
# The release's "no clamp" lower bound when zero_clamp is off.
_NO_CLAMP = -9999.0


@flax.struct.dataclass
class LossParams:
    """Everything `loss_terms` needs besides arrays.

    Shifts are pytree leaves (they may be traced, e.g. the decaying depth shift, without
    retracing); the other fields are static and part of the jit cache key. Defaults are the
    COCO-Stuff ViT-S/8 row of docs/settings.md.

    Attributes:
      intra_shift: b of the anchor-anchor term.
      inter_shift: b of the anchor-positive term.
      neg_shift: b of the anchor-negative term.
      depth_shift: b_d of the depth-feature term.
      pointwise: centre feature correlations over the second map's points (docs/method.md).
      zero_clamp: clamp code correlations at 0 (False: at -9999, as released).
      stabilize: also clamp code correlations at 0.8 from above (released `stabalize`).
      depth_mode: "reference" (D from normalised resized depth, ≡ 1 for positive depth) or
        "corrected" (3D proximity of the sampled points, docs/method.md).
      fov: field of view for lifting (radians in reference mode, degrees in corrected).
      far: depth scale of the lifted Z coordinate.
      depth_positive: corrected mode only: average the anchor's depth term with the
        positive's (code_pos at coords2, depth_pos). False: anchor only, as released.
    """

    intra_shift: float = 0.07
    inter_shift: float = 0.025
    neg_shift: float = 0.761
    depth_shift: float = 0.03
    pointwise: bool = flax.struct.field(pytree_node=False, default=True)
    zero_clamp: bool = flax.struct.field(pytree_node=False, default=True)
    stabilize: bool = flax.struct.field(pytree_node=False, default=False)
    depth_mode: str = flax.struct.field(pytree_node=False, default="reference")
    fov: float = flax.struct.field(pytree_node=False, default=90.0)
    far: float = flax.struct.field(pytree_node=False, default=5.0)
    depth_positive: bool = flax.struct.field(pytree_node=False, default=False)


# F.normalize's eps in the release's correlation and depth terms.
NORMALIZE_EPS = 1e-10


def normalize(x: jax.Array) -> jax.Array:
    """Unit vectors over the last (channel) axis, as the release's `F.normalize(x, dim=1)`."""
    return image_ops.l2_normalize(x, axis=-1, eps=NORMALIZE_EPS)


def correlation(a: jax.Array, b: jax.Array) -> jax.Array:
    """corr[n, h, w, i, j] = Σ_c a[n, h, w, c] · b[n, i, j, c].

    (B, S, S, C), (B, S, S, C) -> (B, S, S, S, S).
    """
    if a.ndim != 4 or b.ndim != 4 or a.shape[0] != b.shape[0] or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"correlation needs (B, h, w, C) and (B, i, j, C) with equal B and C, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return jnp.einsum("bhwc,bijc->bhwij", a, b, precision=_HIGHEST)


def _clamp(cd: jax.Array, zero_clamp: bool, stabilize: bool) -> jax.Array:
    low = 0.0 if zero_clamp else _NO_CLAMP
    # where(>=) rather than maximum: the gradient passes at the bound, as torch.clamp's does.
    cd = jnp.where(cd >= low, cd, low)
    if stabilize:
        cd = jnp.where(cd <= 0.8, cd, 0.8)
    return cd


def _same_shape(names: Sequence[str], arrays: Sequence[jax.Array]) -> None:
    shapes = [tuple(a.shape) for a in arrays]
    if len(set(shapes)) != 1:
        listed = ", ".join(f"{n} {s}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(f"shapes must match: {listed}")


def correlation_term(
    f1: jax.Array,
    f2: jax.Array,
    c1: jax.Array,
    c2: jax.Array,
    shift: float | jax.Array,
    pointwise: bool,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The released `helper` with `loss.mean()`: mean(−clamp(corr(c1,c2)) · (F − shift)).

    F = corr(n(f1), n(f2)) under stop_gradient; if pointwise, F is centred over the second
    map's points and the global mean added back (docs/method.md).

    Args:
      f1, f2: sampled features (B, S, S, C).
      c1, c2: sampled codes (B, S, S, K).
      shift: b.
      pointwise: centre F per anchor point.
      zero_clamp, stabilize: clamp bounds, as released (defaults: the released config).

    Returns:
      (scalar loss, code correlation cd (B, S, S, S, S)).
    """
    _same_shape(("f1", "f2"), (f1, f2))
    _same_shape(("c1", "c2"), (c1, c2))
    if f1.shape[:3] != c1.shape[:3]:
        raise ValueError(f"f1 {tuple(f1.shape)} and c1 {tuple(c1.shape)} differ in (B, S, S)")
    fd = jax.lax.stop_gradient(correlation(normalize(f1), normalize(f2)))
    if pointwise:
        old_mean = fd.mean()
        fd = fd - fd.mean(axis=(3, 4), keepdims=True)
        fd = fd - fd.mean() + old_mean
    cd = correlation(normalize(c1), normalize(c2))
    loss = -_clamp(cd, zero_clamp, stabilize) * (fd - shift)
    return loss.mean(), cd


def _reference_depth_correlation(depth: jax.Array, num_side: int) -> jax.Array:
    """The released dd: depth resized to S×S (align_corners), normalised over its 1 channel."""
    d = image_ops.resize_bilinear(depth[..., None], num_side, align_corners=True)
    d = normalize(d)  # sign(d): 1 for every positive depth
    return correlation(d, d)


def _corrected_depth_correlation(
    depth: jax.Array,
    coords: jax.Array,
    feature_hw: int | Sequence[int],
    fov: float,
    far: float,
) -> jax.Array:
    """D = 1 − ‖p − p'‖ / max‖p − p'‖ of the sampled points lifted to 3D (docs/method.md)."""
    h, w = sampling._pair(feature_hw)
    pooled = image_ops.average_pool(depth, (h, w))
    d = sampling.sample(pooled[..., None], coords)[..., 0]  # (B, S, S)
    # `sample` reads out[i, j] at coords[j, i]: the positions of the values in d.
    pos = jnp.swapaxes(coords, 1, 2).astype(d.dtype)
    col = jnp.clip((pos[..., 0] + 1) / 2 * (w - 1), 0, w - 1)
    row = jnp.clip((pos[..., 1] + 1) / 2 * (h - 1), 0, h - 1)
    scale = sampling.lift_scale(fov, "corrected")
    points = sampling.lift_points(d, row, col, h, w, scale, far)  # (B, S, S, 3)
    diff = points[:, :, :, None, None, :] - points[:, None, None, :, :, :]
    dist = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))
    top = dist.max(axis=(1, 2, 3, 4), keepdims=True)
    # A map whose sampled points all coincide: every pair is "close" (D = 1).
    return 1.0 - dist / jnp.where(top > 0, top, 1.0)


def depth_feature_term(
    code: jax.Array,
    depth: jax.Array,
    shift: float | jax.Array,
    mode: str = "reference",
    *,
    coords: jax.Array | None = None,
    feature_hw: int | Sequence[int] | None = None,
    fov: float = 90.0,
    far: float = 5.0,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> jax.Array:
    """The depth-feature correlation term: mean(−clamp(corr(c, c)) · (D − shift)) (docs/method.md).

    "reference": the released `depth_feature_correlation(code, code, depth, depth,
    shift)[0].mean()`: D is the outer product of the depth resized to S×S (bilinear,
    align_corners True) and normalised over its single channel, i.e. D ≡ 1 wherever depth is
    positive; no depth information enters. `coords`/`feature_hw` are ignored.
    "corrected": depth pooled to `feature_hw`, read at `coords` (the code's coordinates),
    lifted to 3D with fov in degrees; D = 1 − ‖p − p'‖ / max‖p − p'‖ per image.

    Args:
      code: sampled code (B, S, S, K).
      depth: full depth maps (B, H, W).
      shift: b_d.
      mode: "reference" or "corrected".
      coords: corrected only: (B, S, S, 2) coordinates the code was sampled at.
      feature_hw: corrected only: the feature grid the code was sampled from.
      fov, far: corrected only: lifting parameters.
      zero_clamp, stabilize: clamp bounds, as released.

    Returns:
      Scalar loss.
    """
    sampling._check_mode(mode)
    if code.ndim != 4 or code.shape[1] != code.shape[2]:
        raise ValueError(f"code must be sampled (B, S, S, K), got {tuple(code.shape)}")
    if depth.ndim != 3 or depth.shape[0] != code.shape[0]:
        raise ValueError(
            f"depth must be (B={code.shape[0]}, H, W) for code {tuple(code.shape)}, "
            f"got {tuple(depth.shape)}"
        )
    depth = depth.astype(code.dtype)
    num_side = code.shape[1]
    if mode == "reference":
        dd = _reference_depth_correlation(depth, num_side)
    else:
        if coords is None or feature_hw is None:
            raise ValueError("corrected depth term needs coords= and feature_hw=")
        if tuple(coords.shape) != (code.shape[0], num_side, num_side, 2):
            raise ValueError(
                f"coords must be {(code.shape[0], num_side, num_side, 2)} for code "
                f"{tuple(code.shape)}, got {tuple(coords.shape)}"
            )
        dd = _corrected_depth_correlation(depth, coords, feature_hw, fov, far)
    dd = jax.lax.stop_gradient(dd)
    cd = correlation(normalize(code), normalize(code))
    loss = -_clamp(cd, zero_clamp, stabilize) * (dd - shift)
    return loss.mean()


def loss_terms(
    feats: jax.Array,
    feats_pos: jax.Array,
    code: jax.Array,
    code_pos: jax.Array,
    depth: jax.Array,
    depth_pos: jax.Array,
    coords1: jax.Array,
    coords2: jax.Array,
    neg_perms: jax.Array,
    params: LossParams,
) -> dict[str, jax.Array]:
    """The released `ContrastiveCorrelationLoss.forward` means, given coords and negatives.

    Args:
      feats, feats_pos: backbone feature maps (B, h, w, C) of anchor and positive.
      code, code_pos: head codes (B, h, w, K).
      depth, depth_pos: full depth maps (B, H, W).
      coords1, coords2: sample coords (B, S, S, 2) of anchor and positive.
      neg_perms: (neg_samples, B) int: negative i pairs anchor b with image neg_perms[i, b],
        sampled at coords2 (as released).
      params: `LossParams`.

    Returns:
      dict(intra=, inter=, neg=, depth=) of unweighted scalar terms. Gradients reach only the
      codes (feature correlations are under stop_gradient).
    """
    for name, x in (("feats", feats), ("feats_pos", feats_pos)):
        sampling._check_rank(name, x, 4, "(B, h, w, C)")
    _same_shape(("feats", "feats_pos"), (feats, feats_pos))
    _same_shape(("code", "code_pos"), (code, code_pos))
    _same_shape(("depth", "depth_pos"), (depth, depth_pos))
    _same_shape(("coords1", "coords2"), (coords1, coords2))
    if code.ndim != 4 or code.shape[:3] != feats.shape[:3]:
        raise ValueError(
            f"code {tuple(code.shape)} must share (B, h, w) with feats {tuple(feats.shape)}"
        )
    batch, h, w = feats.shape[:3]
    sampling._check_rank("depth", depth, 3, "(B, H, W)")
    if depth.shape[0] != batch:
        raise ValueError(f"depth {tuple(depth.shape)} and feats {tuple(feats.shape)} differ in B")
    sampling._check_coords("coords1", coords1, batch)
    if neg_perms.ndim != 2 or neg_perms.shape[1] != batch:
        raise ValueError(
            f"neg_perms must be (neg_samples, B={batch}), got {tuple(neg_perms.shape)}"
        )

    feats = jax.lax.stop_gradient(feats)
    feats_pos = jax.lax.stop_gradient(feats_pos)
    f1 = sampling.sample(feats, coords1)
    c1 = sampling.sample(code, coords1)
    f2 = sampling.sample(feats_pos, coords2)
    c2 = sampling.sample(code_pos, coords2)
    term = lambda a, b, x, y, shift: correlation_term(
        a, b, x, y, shift, params.pointwise, params.zero_clamp, params.stabilize
    )[0]

    def negative(perm):
        fn = sampling.sample(feats[perm], coords2)
        cn = sampling.sample(code[perm], coords2)
        return term(f1, fn, c1, cn, params.neg_shift)

    depth_kw = dict(
        fov=params.fov, far=params.far, zero_clamp=params.zero_clamp, stabilize=params.stabilize
    )
    depth_term = depth_feature_term(
        c1,
        depth,
        params.depth_shift,
        params.depth_mode,
        coords=coords1,
        feature_hw=(h, w),
        **depth_kw,
    )
    if params.depth_positive and params.depth_mode == "corrected":
        depth_term_pos = depth_feature_term(
            c2,
            depth_pos,
            params.depth_shift,
            params.depth_mode,
            coords=coords2,
            feature_hw=(h, w),
            **depth_kw,
        )
        depth_term = (depth_term + depth_term_pos) / 2
    return dict(
        intra=term(f1, f1, c1, c1, params.intra_shift),
        inter=term(f1, f2, c1, c2, params.inter_shift),
        # Equal-size negatives: the mean of the concatenation is the mean of the means.
        neg=jax.vmap(negative)(neg_perms).mean(),
        depth=depth_term,
    )


def cluster_probe_loss(inner: jax.Array) -> jax.Array:
    """Cluster probe training loss: −mean over pixels of max_k inner (hard assignment).

    inner: (B, h, w, n) cosine similarities of codes to centroids.
    """
    return -jnp.mean(jnp.max(inner, axis=-1))


def linear_probe_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Linear probe cross-entropy (STEGO): logits (B, h, w, n) upsampled bilinearly
    (align_corners False) to labels (B, H, W); mean over pixels with 0 <= label < n.

    Pixels with other labels are ignored; if none is valid the loss is 0 (not NaN).
    """
    sampling._check_rank("logits", logits, 4, "(B, h, w, n)")
    sampling._check_rank("labels", labels, 3, "(B, H, W)")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and logits {tuple(logits.shape)} differ in B"
        )
    n = logits.shape[-1]
    up = image_ops.resize_bilinear(logits, labels.shape[1:], align_corners=False)
    logp = jax.nn.log_softmax(up, axis=-1)
    valid = (labels >= 0) & (labels < n)
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    count = valid.sum()
    return jnp.where(valid, nll, 0).sum() / jnp.maximum(count, 1)
