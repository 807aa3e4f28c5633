"""Training schedules of the DepthG objective as pure functions (docs/release.md).

`step` is the 0-based batch index b. Both schedules are configured in BATCHES. The release
configured them in its own units, Lightning's global_step, which is 3·b at batch b (three
optimisers under manual optimisation), and fired a decay when `global_step % N == 0`.
Since 3·b % N == 0 exactly when b % M == 0 with M = N / gcd(3, N), a released interval N
is M batches here. The release's reproduction script sets N = 250 (COCO ViT-S depth; M =
250), 1000 (S decay; M = 1000), 300 (COCO ViT-B depth; M = 100) and 400 (Cityscapes; M = 400):
docs/settings.md#release-units.

Two timings, selected by `mode`:

- "reference", as released: the decay block runs *after* batch b's loss, so a decay that
  fires at batch b is first seen by batch b + 1. The depth decay needs b > 0 (it fires after
  batches M, 2M, ...: the k-th is first seen at batch kM + 1); the sample-count decay also
  fires after batch 0 (so S = `initial` for batch 0 only; COCO ViT-S: 11, then 9 for
  batches 1-1000, 8 for 1001-2000, 7 from 2001).
- "corrected", the schedule as stated: the k-th decay is in effect from batch kM; none at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("reference", "corrected")


def _check(mode: str, every: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'reference' or 'corrected', got {mode!r}")
    if every < 0:
        raise ValueError(f"every must be >= 0, got {every}")


def depth_decays_seen(step: int | jax.Array, every: int, mode: str = "corrected") -> jax.Array:
    """How many depth decays the loss of batch `step` sees (int32; jittable in `step`).

    reference: 0 for batch 0, else (step - 1) // every. corrected: step // every.
    every == 0: none.
    """
    _check(mode, every)
    step = jnp.asarray(step, jnp.int32)
    if every == 0:
        return jnp.zeros_like(step)
    if mode == "reference":
        return jnp.maximum(step - 1, 0) // every
    return step // every


def depth_schedule(
    step: int | jax.Array,
    weight: float,
    shift: float,
    every: int,
    rate: float,
    mode: str = "corrected",
) -> tuple[jax.Array, jax.Array]:
    """Depth-term weight and shift for batch `step`: both × rate per decay seen.

    Decays fire every `every` batches (never at batch 0); see the module docstring for the
    released one-batch lag of "reference". every == 0: constant. Jittable in `step`.

    Returns:
      (λ_d, b_d) as float32 scalars.
    """
    seen = depth_decays_seen(step, every, mode)
    factor = jnp.asarray(rate, jnp.float32) ** seen.astype(jnp.float32)
    return jnp.float32(weight) * factor, jnp.float32(shift) * factor


def sample_decays_seen(step: int, every: int, mode: str = "reference") -> int:
    """How many sample-count decays batch `step` sees (host int).

    reference: decays fire after every batch b with b % every == 0, b = 0 included, so
    0 for batch 0, else (step - 1) // every + 1. corrected: step // every. every == 0: none.
    """
    _check(mode, every)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if every == 0:
        return 0
    if mode == "reference":
        return 0 if step == 0 else (step - 1) // every + 1
    return step // every


def num_samples_at(
    step: int, initial: int, every: int, rate: float, mode: str = "reference", minimum: int = 1
) -> int:
    """Samples per side S for batch `step` (a Python int, on the host).

    Each decay seen (`sample_decays_seen`) applies S ← max(int(S·rate), minimum), as
    released; `minimum` guards against S = 0 (the release's fps_min_samples default is 0).
    COCO ViT-S (11, every 1000, rate .9), reference: 11 for batch 0, 9 for 1-1000, 8 for
    1001-2000, 7 from 2001; corrected: 11 for 0-999, 9 from 1000, 8 from 2000.

    A jitted step that takes S as a static shape retraces once per distinct S.
    """
    fired = sample_decays_seen(step, every, mode)
    samples = int(initial)
    for _ in range(fired):
        new = max(int(samples * rate), minimum)
        if new == samples:
            break  # fixed point reached (rate 1 or the minimum): no need to loop on
        samples = new
    return samples
