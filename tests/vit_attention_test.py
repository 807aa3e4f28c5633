"""The backbone's attention implementations: the choice, parity with the explicit path, and
lowering for other platforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthg_jax.models.variants import get_variant
from depthg_jax.models.vit import (
    ATTENTIONS,
    attention_implementation,
    backend_platform,
    build_backbone,
)

# One per layout: DINO (learned positions, no layer scale), DINOv2 with registers (antialiased
# position resize, layer scale), DINOv3 (RoPE before attention, storage tokens).
VARIANTS = ["mu/8", "v2reg-mu/14", "v3-mu/16"]
# The existing bf16-vs-fp32 bounds of the tiny DINO variant (tests/vit_test.py).
BF16_MAX, BF16_MEAN = 0.05, 0.006


def random_params(variant: str, seed: int = 0) -> dict:
    """init's params with every leaf perturbed, so biases, norms and tokens all matter."""
    p = get_variant(variant).patch
    params = build_backbone(variant).init(jax.random.key(seed), jnp.zeros((1, p, p, 3)))
    leaves, treedef = jax.tree.flatten(params["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def forward(variant, params, x, attention, dtype=jnp.float32):
    model = build_backbone(variant, dtype).clone(attention=attention)
    return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)


def images(variant, seed=0):
    p = get_variant(variant).patch
    return np.random.default_rng(seed).standard_normal((2, 5 * p, 7 * p, 3)).astype(np.float32)


def test_attention_implementation_choice():
    bf16, f32, f16 = jnp.bfloat16, jnp.float32, jnp.float16
    assert attention_implementation("cuda", bf16, 64) == "cudnn"
    assert attention_implementation("cuda", f16, 128) == "cudnn"
    assert attention_implementation("cuda", f32, 64) == "xla"  # cuDNN flash: half precision
    assert attention_implementation("cuda", bf16, 20) == "xla"  # not a multiple of 8
    assert attention_implementation("cuda", bf16, 256) == "xla"  # beyond 128
    for platform in ("tpu", "rocm"):
        assert attention_implementation(platform, bf16, 64) == "xla"
    assert attention_implementation("cpu", bf16, 64) == "explicit"  # faster on XLA:CPU
    for requested in ("xla", "explicit"):
        assert attention_implementation("cuda", bf16, 64, requested) == requested
    assert backend_platform() == "cpu"
    assert build_backbone("S/8", bf16).resolved_attention() == "explicit"  # on this CPU
    with pytest.raises(ValueError, match="attention='cudnn' cannot run here: the platform"):
        attention_implementation("cpu", bf16, 64, "cudnn")
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_implementation("cuda", bf16, 64, "flash")
    assert ATTENTIONS == ("auto", "xla", "cudnn", "explicit")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_xla_path_equals_explicit_fp32(variant):
    params = random_params(variant)
    x = images(variant)
    explicit = forward(variant, params, x, "explicit")
    for attention in ("auto", "xla"):
        fused = forward(variant, params, x, attention)
        err = float(jnp.abs(fused - explicit).max())
        print(f"{variant} {attention} vs explicit fp32: max {err:.2e}")
        assert err <= 1e-6, err


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_xla_path_bf16_within_the_bf16_bounds(variant):
    params = random_params(variant)
    x = images(variant, seed=1)
    f32 = forward(variant, params, x, "explicit")
    explicit = forward(variant, params, x, "explicit", jnp.bfloat16)
    fused = forward(variant, params, x, "xla", jnp.bfloat16)
    for name, bf16 in [("explicit", explicit), ("xla", fused)]:
        err = jnp.abs(bf16 - f32)
        print(f"{variant} bf16 {name} vs fp32: max {float(err.max()):.4f} mean "
              f"{float(err.mean()):.5f}")  # fmt: skip
        assert 0 < float(err.max()) <= BF16_MAX and float(err.mean()) <= BF16_MEAN


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_maps_come_from_the_explicit_path(variant):
    params = random_params(variant)
    x = images(variant, seed=2)
    outs = {
        a: build_backbone(variant)
        .clone(attention=a)
        .apply({"params": params}, x, return_attention=True)
        for a in ("auto", "explicit")
    }
    # Earlier blocks ran the XLA path, so the last block's map differs by rounding only.
    np.testing.assert_allclose(outs["auto"][0], outs["explicit"][0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(outs["auto"][1], outs["explicit"][1], atol=1e-7, rtol=0)
    np.testing.assert_allclose(outs["auto"][1].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_attention_lowers_for_other_platforms_without_custom_calls(variant, dtype, platform):
    """The jitted backbone with the XLA attention path ("auto" on TPU, and on CUDA where cuDNN
    cannot run) exports for TPU and CUDA from abstract inputs, as plain StableHLO."""
    p = get_variant(variant).patch
    model = build_backbone(variant, dtype, "xla")
    x = jax.ShapeDtypeStruct((2, 4 * p, 6 * p, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
    exported = jax.export.export(
        jax.jit(lambda p, x: model.apply({"params": p}, x)), platforms=[platform]
    )(params, x)
    assert exported.platforms == (platform,)
    assert exported.out_avals[0].shape == (2, 4, 6, get_variant(variant).dim)
    assert "stablehlo.custom_call" not in exported.mlir_module()


def test_bad_attention_option_raises():
    with pytest.raises(ValueError, match="attention must be one of"):
        build_backbone("mu/8").clone(attention="flash").init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )
