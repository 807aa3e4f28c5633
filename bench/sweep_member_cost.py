"""What one extra sweep member costs on this machine: the per-member parts of a step, alone.

    python bench/sweep_member_cost.py

At S/8, batch 8, 224 px: the head's forward and backward on anchors and positives (its C x C
1x1 convolution dominates) and the linear probe's cross-entropy on logits upsampled to the
label size. Every member runs both; the backbone forward, FPS and the data are shared. Their
sum against the P = 1 step time (bench/sweep.py) bounds what P members can cost.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.method import losses
from depthg_jax.models import head as head_lib
from depthg_jax.runtime import xla

B, GRID, C, K, N, RES = 8, 28, 384, 70, 27, 224


def timed_ms(fn, *args, repeats: int = 5) -> float:
    jitted = xla.jit(fn)
    jax.block_until_ready(jitted(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(jitted(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(2 * B, GRID, GRID, C)).astype(np.float32))
    labels = jnp.asarray(rng.integers(-1, N, (B, RES, RES)).astype(np.int32))
    code = jnp.asarray(rng.normal(size=(B, GRID, GRID, K)).astype(np.float32))
    head = head_lib.SegmentationHead(dim=K, dropout=0.1)
    head_params = head.init({"params": jax.random.key(0)}, feats, deterministic=True)["params"]
    probe = head_lib.LinearProbe(N)
    probe_params = probe.init(jax.random.key(1), code)["params"]

    def head_loss(p):
        out = head.apply(
            {"params": p}, feats, deterministic=False, rngs={"dropout": jax.random.key(2)}
        )
        return jnp.sum(out)

    def probe_loss(p):
        return losses.linear_probe_loss(probe.apply({"params": p}, code), labels)

    head_ms = timed_ms(jax.grad(head_loss), head_params)
    probe_ms = timed_ms(jax.grad(probe_loss), probe_params)
    print(
        f"head forward+backward (anchors and positives, {2 * B} x {GRID}^2 x {C}): {head_ms:.0f} ms"
    )
    print(f"linear probe cross-entropy at {RES}^2 forward+backward: {probe_ms:.0f} ms")
    print(f"per extra member (these two): {head_ms + probe_ms:.0f} ms")


if __name__ == "__main__":
    main()
