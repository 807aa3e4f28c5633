"""depthg_jax.method.schedules against a restatement of the released decay block (docs/settings.md).

The release runs, once per batch b and after that batch's loss, with Lightning's
global_step = 3·b and N in its own units:

    if depth_loss_decay and global_step % N_depth == 0 and global_step > 0:
        depth_feat_weight *= rate; depth_feat_shift *= rate
    if fps_sample_decay and global_step % N_fps == 0:
        feature_samples = max(int(feature_samples * rate), fps_min_samples)

`released_values` below states exactly that loop; our schedules are configured in batches
(M = N / gcd(3, N)) and must give every batch the value the released loop gave it.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cityscapes, coco
from depthg_jax.method import sampling, schedules

NUM_BATCHES = 2334  # the released max_steps 7000 / 3 optimisers

# (name, initial (λ_d, b_d), release N, rate): docs/settings.md.
DEPTH_RUNS = [
    ("coco_s8", (0.19, 0.03), 250, 0.6),
    ("coco_b8", (0.16026274975444096, 0.035909146298813595), 300, 0.64),
    ("cityscapes_b8", (0.09, 0.03), 400, 0.8),
]
# (name, initial S, release N (0: no decay), rate).
SAMPLE_RUNS = [("coco_s8", 11, 1000, 0.9), ("coco_b8", 12, 0, 1.0)]


def released_values(num_batches, initial, n_release, update, skip_zero, mode):
    """Value used by the loss of each batch, by the release's own condition.

    reference: the check `3·b % N == 0` (and b > 0 if skip_zero) runs after batch b's loss.
    corrected: the same firings for b > 0, applied before batch b's loss (no lag).
    """
    value, used = initial, []
    for b in range(num_batches):
        global_step = 3 * b
        fires = n_release > 0 and global_step % n_release == 0
        if mode == "corrected" and fires and global_step > 0:
            value = update(value)
        used.append(value)
        if mode == "reference" and fires and (global_step > 0 or not skip_zero):
            value = update(value)
    return used


def in_batches(n_release):
    return n_release // math.gcd(3, n_release) if n_release else 0


def test_release_units_convert_to_the_batch_intervals_of_the_configs():
    # The release's reproduction script: decay_every_steps and fps_sample_decay_every_steps.
    assert in_batches(250) == 250 == coco.get_config("S/8").loss.depth_decay_every
    assert in_batches(1000) == 1000 == coco.get_config("S/8").loss.samples_decay_every
    assert in_batches(300) == 100 == coco.get_config("B/8").loss.depth_decay_every
    assert coco.get_config("B/8").loss.samples_decay_every == 0
    assert in_batches(400) == 400 == cityscapes.get_config().loss.depth_decay_every
    assert cityscapes.get_config().loss.samples_decay_every == 0
    assert in_batches(750) == 250  # an N divisible by 3 fires every N / 3 batches


@pytest.mark.parametrize("mode", ["reference", "corrected"])
@pytest.mark.parametrize("name,initial,n_release,rate", SAMPLE_RUNS)
def test_num_samples_table_follows_the_released_condition(name, initial, n_release, rate, mode):
    update = lambda s: max(int(s * rate), 1)
    want = released_values(NUM_BATCHES, initial, n_release, update, False, mode)
    every = in_batches(n_release)
    got = [schedules.num_samples_at(b, initial, every, rate, mode=mode) for b in range(NUM_BATCHES)]
    assert got == want, name


@pytest.mark.parametrize("mode", ["reference", "corrected"])
@pytest.mark.parametrize("name,initial,n_release,rate", DEPTH_RUNS)
def test_depth_table_follows_the_released_condition(name, initial, n_release, rate, mode):
    update = lambda v: (v[0] * rate, v[1] * rate)
    want = np.array(released_values(NUM_BATCHES, initial, n_release, update, True, mode))
    every = in_batches(n_release)
    fn = jax.jit(jax.vmap(lambda b: schedules.depth_schedule(b, *initial, every, rate, mode)))
    w, s = fn(jnp.arange(NUM_BATCHES))
    np.testing.assert_allclose(np.asarray(w), want[:, 0], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(s), want[:, 1], rtol=1e-6, err_msg=name)


def test_num_samples_coco_vit_s_boundaries_by_hand():
    s = functools.partial(schedules.num_samples_at, initial=11, every=1000, rate=0.9)
    batches = (0, 1, 999, 1000, 1001, 1999, 2000, 2001, 2333)
    assert [s(b, mode="reference") for b in batches] == [11, 9, 9, 9, 8, 8, 8, 7, 7]
    assert [s(b, mode="corrected") for b in batches] == [11, 11, 11, 9, 9, 9, 8, 8, 8]
    assert schedules.num_samples_at(2333, 12, 0, 1.0, mode="reference") == 12  # COCO ViT-B


@pytest.mark.parametrize(
    "mode,batch,decays",
    [
        ("reference", 0, 0),
        ("reference", 1, 0),
        ("reference", 250, 0),
        ("reference", 251, 1),
        ("reference", 500, 1),
        ("reference", 501, 2),
        ("reference", 2333, 9),
        ("corrected", 0, 0),
        ("corrected", 249, 0),
        ("corrected", 250, 1),
        ("corrected", 500, 2),
        ("corrected", 2333, 9),
    ],
)
def test_depth_coco_vit_s_boundaries_by_hand(mode, batch, decays):
    w, b = schedules.depth_schedule(batch, 0.19, 0.03, 250, 0.6, mode=mode)
    assert float(w) == pytest.approx(0.19 * 0.6**decays, rel=1e-6)
    assert float(b) == pytest.approx(0.03 * 0.6**decays, rel=1e-6)


def test_depth_vit_b_and_cityscapes_boundaries_by_hand():
    w0, b0 = 0.16026274975444096, 0.035909146298813595
    for batch, k in ((100, 0), (101, 1), (200, 1), (201, 2)):
        w, b = schedules.depth_schedule(batch, w0, b0, 100, 0.64, mode="reference")
        assert (float(w), float(b)) == pytest.approx((w0 * 0.64**k, b0 * 0.64**k), rel=1e-6)
    for batch, k in ((99, 0), (100, 1), (199, 1), (200, 2)):
        w, _ = schedules.depth_schedule(batch, w0, b0, 100, 0.64, mode="corrected")
        assert float(w) == pytest.approx(w0 * 0.64**k, rel=1e-6)
    for batch, k in ((400, 0), (401, 1), (800, 1), (801, 2)):
        w, b = schedules.depth_schedule(batch, 0.09, 0.03, 400, 0.8, mode="reference")
        assert (float(w), float(b)) == pytest.approx((0.09 * 0.8**k, 0.03 * 0.8**k), rel=1e-6)


def test_constant_cases_and_bad_input():
    assert schedules.num_samples_at(5000, 12, 0, 0.5, "reference") == 12  # every == 0
    assert schedules.num_samples_at(5000, 12, 1000, 1.0, "reference") == 12  # rate 1
    assert schedules.num_samples_at(10**6, 11, 1, 0.5, "reference") == 1  # minimum
    assert schedules.num_samples_at(10**6, 11, 1, 0.5, "reference", minimum=3) == 3
    w, b = schedules.depth_schedule(10_000, 0.09, 0.03, 0, 0.8, mode="reference")
    assert (float(w), float(b)) == pytest.approx((0.09, 0.03))
    with pytest.raises(ValueError, match="mode"):
        schedules.num_samples_at(0, 11, 10, 0.9, "other")
    with pytest.raises(ValueError, match="mode"):
        schedules.depth_schedule(0, 0.1, 0.1, 5, 0.5, mode="other")
    with pytest.raises(ValueError, match="every"):
        schedules.num_samples_at(0, 11, -1, 0.9)
    with pytest.raises(ValueError, match="every"):
        schedules.depth_schedule(0, 0.1, 0.1, -5, 0.5)
    with pytest.raises(ValueError, match="step"):
        schedules.num_samples_at(-1, 11, 10, 0.9)


def test_depth_schedule_jits_in_step():
    fn = jax.jit(schedules.depth_schedule, static_argnums=(1, 2, 3, 4, 5))
    w, _ = fn(jnp.int32(251), 0.19, 0.03, 250, 0.6, "reference")
    assert float(w) == pytest.approx(0.19 * 0.6, rel=1e-6)


def test_sample_count_decay_retraces_once_per_distinct_s():
    depth = jnp.asarray(np.random.default_rng(0).uniform(1, 255, (2, 24, 24)), jnp.float32)
    feats = jnp.ones((2, 12, 12, 3))
    traced = []

    @functools.partial(jax.jit, static_argnums=2)
    @chex.assert_max_traces(n=4)
    def step(feats, depth, num_side):
        traced.append(num_side)
        coords = sampling.depth_fps_coords(depth, (12, 12), num_side, "reference")
        return sampling.sample(feats, coords).sum()

    for n in range(0, 2334, 97):  # a whole COCO ViT-S run, every 97th batch
        step(feats, depth, schedules.num_samples_at(n, 11, 1000, 0.9, "reference"))
    assert traced == [11, 9, 8, 7]
