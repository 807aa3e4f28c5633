"""Training schedules of the DepthG objective as pure functions of the step (SPEC §7).

`step` is the 0-based batch index. A decay that "fires at batch k" is in effect for the loss
of batch k onwards.

Note on the release: it evaluated its decay conditions after computing the loss of a
batch, so each change reached the loss one batch later than stated here (e.g. S = 11 for
batch 0 only, then 9; 8 from batch 1001). SPEC §7 states the schedule without that lag,
and so do these functions; the difference is one batch per firing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def depth_schedule(
    step: int | jax.Array, weight: float, shift: float, every: int, rate: float
) -> tuple[jax.Array, jax.Array]:
    """Depth-term weight and shift at `step`: both × rate every `every` batches.

    The first decay fires at batch `every` (never at 0, as released). every == 0: constant.
    Jittable in `step`.

    Returns:
      (λ_d, b_d) as float32 scalars.
    """
    if every < 0:
        raise ValueError(f"every must be >= 0, got {every}")
    weight = jnp.asarray(weight, jnp.float32)
    shift = jnp.asarray(shift, jnp.float32)
    if every == 0:
        return weight, shift
    fired = jnp.asarray(step) // every
    factor = jnp.asarray(rate, jnp.float32) ** fired.astype(jnp.float32)
    return weight * factor, shift * factor


def num_samples_at(
    step: int, initial: int, every: int, rate: float, mode: str = "reference", minimum: int = 1
) -> int:
    """Samples per side S at batch `step` (a Python int, on the host).

    Every `every` batches S ← max(int(S·rate), minimum). "reference" fires at batch 0 too (so
    COCO ViT-S with S0 = 11, rate .9 runs 9, then 8 from batch 1000, 7 from 2000);
    "corrected" skips batch 0. every == 0: constant. `minimum` guards against S = 0 (the
    release's fps_min_samples default is 0).

    A jitted step that takes S as a static shape retraces once per distinct S.
    """
    if mode not in ("reference", "corrected"):
        raise ValueError(f"mode must be 'reference' or 'corrected', got {mode!r}")
    if every < 0 or step < 0:
        raise ValueError(f"every and step must be >= 0, got every={every}, step={step}")
    if every == 0:
        return int(initial)
    fired = step // every + (1 if mode == "reference" else 0)
    samples = int(initial)
    for _ in range(fired):
        new = max(int(samples * rate), minimum)
        if new == samples:
            break  # fixed point reached (rate 1 or the minimum): no need to loop on
        samples = new
    return samples
