"""Attention alone on this CPU: JAX's two paths, a bound-shifted softmax, and PyTorch's SDPA.

The shape is one block of the Depth Anything V2 Small encoder at 518 x 686 (6 heads of 64,
37 x 49 patches + 1 class token = 1813 tokens), batch 4, float32. Rounds alternate between
the candidates, and each prints its median wall time per image and block, and its largest
difference from the explicit path.

    PYTHONPATH=. python bench/attention_cpu.py --rounds=5

- explicit: the ViT's einsum path (`model.attention="explicit"`, auto's choice on CPUs).
- xla: `jax.nn.dot_product_attention` (auto's choice on TPUs).
- bound_shift: the row maximum replaced by the Cauchy-Schwarz bound |q| max|k| (this skips
  one pass over the logits) and the normalisation moved after the second matmul. It is an
  experiment, not in the package: the bound can sit far above the true maximum.
- torch_sdpa: `torch.nn.functional.scaled_dot_product_attention`, a fused kernel that never
  writes the N x N logits.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

BATCH, HEADS, TOKENS, HEAD_DIM = 4, 6, 1813, 64


def explicit(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * HEAD_DIM**-0.5, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def bound_shift(q, k, v):
    q = q * HEAD_DIM**-0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    q_norm = jnp.linalg.norm(q, axis=-1).transpose(0, 2, 1)  # (b, h, q)
    k_max = jnp.max(jnp.linalg.norm(k, axis=-1), axis=1)  # (b, h)
    weights = jnp.exp(logits - (q_norm * k_max[:, :, None])[..., None])
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return out / weights.sum(-1).transpose(0, 2, 1)[..., None]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 3)
    shape = (BATCH, TOKENS, HEADS, HEAD_DIM)
    q, k, v = (
        jax.random.normal(key, shape) * s for key, s in zip(keys, (1.5, 1.5, 1.0), strict=True)
    )
    candidates = {name: jax.jit(fn) for name, fn in
                  [("explicit", explicit), ("xla", xla), ("bound_shift", bound_shift)]}  # fmt: skip
    reference = np.asarray(candidates["explicit"](q, k, v))
    errors = {}
    for name, fn in candidates.items():
        errors[name] = float(np.max(np.abs(np.asarray(fn(q, k, v)) - reference)))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        tq, tk, tv = (
            torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy()) for x in (q, k, v)
        )

        def sdpa():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

        out = sdpa().numpy().transpose(0, 2, 1, 3)
        errors["torch_sdpa"] = float(np.max(np.abs(out - reference)))
        candidates["torch_sdpa"] = lambda *_: sdpa()
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            out = fn(q, k, v)
            if isinstance(out, jax.Array):
                out.block_until_ready()
            times[name].append(time.perf_counter() - start)
    base = np.median(times["explicit"])
    for name, seconds in times.items():
        median = np.median(seconds)
        print(f"{name:12s} {1000 * median / BATCH:7.1f} ms per image and block "
              f"({median / base:.2f}x explicit), max |diff| {errors[name]:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
