"""depthg_jax.schedules against SPEC §7 and a step-by-step statement of the released loop."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthg_jax import sampling, schedules


def released_values(num_batches, initial, every, fire_at_zero, update):
    """The release's loop: the loss of batch n uses the current value, then the decay check
    (n % every == 0, and n > 0 unless fire_at_zero) updates it for later batches."""
    value, used = initial, []
    for n in range(num_batches):
        used.append(value)
        if n % every == 0 and (fire_at_zero or n > 0):
            value = update(value)
    return used


def test_num_samples_coco_vit_s_table():
    s = functools.partial(schedules.num_samples_at, initial=11, every=1000, rate=0.9)
    # SPEC §7: reference runs S = 9, then 8 at batch 1000, 7 at batch 2000.
    assert [s(n, mode="reference") for n in (0, 999, 1000, 1999, 2000, 2333)] == [
        9,
        9,
        8,
        8,
        7,
        7,
    ]
    # Corrected skips batch 0.
    assert [s(n, mode="corrected") for n in (0, 999, 1000, 1999, 2000, 2333)] == [
        11,
        11,
        9,
        9,
        8,
        8,
    ]


def test_num_samples_follows_released_loop_one_batch_earlier():
    used = released_values(2334, 11, 1000, True, lambda v: int(v * 0.9))
    for n in range(2333):  # documented: a firing reaches the release's loss one batch later
        assert schedules.num_samples_at(n, 11, 1000, 0.9, "reference") == used[n + 1]


def test_num_samples_constant_cases_and_bad_input():
    assert schedules.num_samples_at(5000, 12, 0, 0.5, "reference") == 12  # every == 0
    assert schedules.num_samples_at(5000, 12, 1000, 1.0, "reference") == 12  # ViT-B rate 1
    assert schedules.num_samples_at(10**6, 11, 1, 0.5, "reference") == 1  # minimum
    assert schedules.num_samples_at(10**6, 11, 1, 0.5, "reference", minimum=3) == 3
    with pytest.raises(ValueError, match="mode"):
        schedules.num_samples_at(0, 11, 10, 0.9, "other")
    with pytest.raises(ValueError, match="every"):
        schedules.num_samples_at(0, 11, -1, 0.9)


def test_depth_schedule_values_and_jit():
    fn = jax.jit(schedules.depth_schedule, static_argnums=(1, 2, 3, 4))
    for step, k in ((0, 0), (249, 0), (250, 1), (749, 2), (750, 3), (2333, 9)):
        w, b = fn(jnp.int32(step), 0.19, 0.03, 250, 0.6)
        assert float(w) == pytest.approx(0.19 * 0.6**k, rel=1e-6)
        assert float(b) == pytest.approx(0.03 * 0.6**k, rel=1e-6)
    w, b = schedules.depth_schedule(10_000, 0.09, 0.03, 0, 0.8)  # every == 0: constant
    assert (float(w), float(b)) == pytest.approx((0.09, 0.03))
    with pytest.raises(ValueError, match="every"):
        schedules.depth_schedule(0, 0.1, 0.1, -5, 0.5)


def test_depth_schedule_follows_released_loop_one_batch_earlier():
    used = released_values(1200, (0.19, 0.03), 250, False, lambda v: (v[0] * 0.6, v[1] * 0.6))
    steps = jnp.arange(1199)
    w, b = jax.vmap(lambda n: schedules.depth_schedule(n, 0.19, 0.03, 250, 0.6))(steps)
    want = np.array(used[1:1200])
    np.testing.assert_allclose(np.asarray(w), want[:, 0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b), want[:, 1], rtol=1e-6)


def test_sample_count_decay_retraces_once_per_distinct_s():
    depth = jnp.asarray(np.random.default_rng(0).uniform(1, 255, (2, 24, 24)), jnp.float32)
    feats = jnp.ones((2, 12, 12, 3))
    traced = []

    @functools.partial(jax.jit, static_argnums=2)
    @chex.assert_max_traces(n=3)
    def step(feats, depth, num_side):
        traced.append(num_side)
        coords = sampling.depth_fps_coords(depth, (12, 12), num_side, "reference")
        return sampling.sample(feats, coords).sum()

    for n in range(0, 2334, 97):  # a whole COCO ViT-S run, every 97th batch
        step(feats, depth, schedules.num_samples_at(n, 11, 1000, 0.9, "reference"))
    assert traced == [9, 8, 7]
