"""Segmentation head, cluster probe and linear probe (docs/method.md), NHWC.

1x1 convolutions are Dense layers on the channel axis, initialised like PyTorch's Conv2d
default (weights kaiming_uniform with a=sqrt(5), bias uniform(+-1/sqrt(fan_in)): both
amount to uniform(+-1/sqrt(fan_in)) with fan_in the input channel count).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from depthg_jax.method.image_ops import l2_normalize

# F.normalize's default eps.
NORMALIZE_EPS = 1e-12


def torch_default_init(fan_in: int) -> nn.initializers.Initializer:
    """uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch Conv2d/Linear default init."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_conv1x1(features: int, fan_in: int, name: str) -> nn.Dense:
    """A 1x1 convolution on NHWC input (Dense on channels) with PyTorch's default init."""
    init = torch_default_init(fan_in)
    return nn.Dense(features, kernel_init=init, bias_init=init, name=name)


def channel_dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """PyTorch Dropout2d on NHWC x: whole channels zeroed per image, survivors / (1 - rate).

    Identity when rate == 0; all zeros when rate == 1.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    if x.ndim != 4:
        raise ValueError(f"channel_dropout expects (B, h, w, C), got shape {x.shape}")
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class SegmentationHead(nn.Module):
    """code = linear(drop1(f)) + nonlinear_2(relu(nonlinear_1(drop2(f)))).

    Attributes:
      dim: code dimension K.
      dropout: channel-dropout rate of drop1 and drop2 (masks from the 'dropout' rng).
    """

    dim: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, feats: jax.Array, *, deterministic: bool) -> jax.Array:
        """feats (B, h, w, C) -> code (B, h, w, dim)."""
        if feats.ndim != 4:
            raise ValueError(f"feats must be (B, h, w, C), got shape {feats.shape}")
        c = feats.shape[-1]
        if deterministic or self.dropout == 0.0:
            f1 = f2 = feats
        else:
            key1, key2 = jax.random.split(self.make_rng("dropout"))
            f1 = channel_dropout(key1, feats, self.dropout)
            f2 = channel_dropout(key2, feats, self.dropout)
        linear = torch_conv1x1(self.dim, c, "linear")(f1)
        hidden = nn.relu(torch_conv1x1(c, c, "nonlinear_1")(f2))
        return linear + torch_conv1x1(self.dim, c, "nonlinear_2")(hidden)


class ClusterProbe(nn.Module):
    """Cosine similarity of each code pixel to n_classes learnt centroids (N(0, 1) init)."""

    n_classes: int

    @nn.compact
    def __call__(self, code: jax.Array) -> jax.Array:
        """code (B, h, w, K) -> inner (B, h, w, n_classes) in [-1, 1]."""
        clusters = self.param(
            "clusters", nn.initializers.normal(stddev=1.0), (self.n_classes, code.shape[-1])
        )
        code = l2_normalize(code, eps=NORMALIZE_EPS)
        return jnp.einsum("bhwk,nk->bhwn", code, l2_normalize(clusters, eps=NORMALIZE_EPS))


def cluster_log_probs(inner: jax.Array, alpha: float = 2.0) -> jax.Array:
    """log_softmax(alpha * inner) over the class axis (last), the probe's eval output."""
    return jax.nn.log_softmax(alpha * inner, axis=-1)


class LinearProbe(nn.Module):
    """1x1 convolution K -> n_classes with PyTorch's default init; returns logits."""

    n_classes: int

    @nn.compact
    def __call__(self, code: jax.Array) -> jax.Array:
        """code (B, h, w, K) -> logits (B, h, w, n_classes)."""
        return torch_conv1x1(self.n_classes, code.shape[-1], "linear")(code)
