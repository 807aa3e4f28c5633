"""Full-depth parity of Dinov2ViT / Dinov3ViT with transformers (random weights), and bf16 error.

  PYTHONPATH=. /work/main/.venv/bin/python bench/verify_v2v3_parity.py --variants=v2-B/14,v3-B/16

For each variant a transformers model (Dinov2Model, Dinov2WithRegistersModel or
DINOv3ViTModel) is built from a config at the real width and depth, every parameter
except the Linear/conv matrices (kept at transformers' std-0.02 init, since 0.1 * N(0, 1)
matrices at width 768+ blow the residual stream up and make fp32 itself the limit) perturbed
by 0.1 * N(0, 1); its state dict goes through convert_state_dict, and our
features (final norm, CLS and registers dropped) are compared with last_hidden_state at
224 px and at a second size (448 for DINOv2, 320 for DINOv3). DINOv2 uses
pos_interpolation="transformers" (the reference here). Also reports bf16-vs-fp32 error.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from depthg_jax.models.convert import convert_state_dict, normalise_state_dict
from depthg_jax.models.variants import get_variant, mlp_hidden
from depthg_jax.models.vit import build_backbone

TOLERANCE = 1e-4


def reference(variant: str):
    import transformers as tf

    spec = get_variant(variant)
    common = dict(
        hidden_size=spec.dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads
    )
    if spec.family == "v3":
        config = tf.DINOv3ViTConfig(
            intermediate_size=mlp_hidden(variant), num_register_tokens=spec.registers,
            use_gated_mlp=spec.swiglu, hidden_act="silu" if spec.swiglu else "gelu", **common,
        )  # fmt: skip
        return tf.DINOv3ViTModel(config)
    common.update(image_size=518, patch_size=14)
    if spec.registers:
        return tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**common))
    return tf.Dinov2Model(tf.Dinov2Config(use_swiglu_ffn=spec.swiglu, **common))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="v2-S/14,v2-B/14,v2-L/14,v2reg-B/14,v3-S/16,"
                        "v3-S+/16,v3-B/16,v3-L/16")  # fmt: skip
    args = parser.parse_args()
    print(f"jax {jax.__version__} {jax.devices()[0].platform}, torch {torch.__version__}")
    worst = 0.0
    for variant in args.variants.split(","):
        spec = get_variant(variant)
        torch.manual_seed(0)
        model = reference(variant).eval()
        with torch.no_grad():  # matrices keep transformers' init (std 0.02), as trained
            for p in model.parameters():  # ViTs have; biases, norms, LayerScale, tokens move
                if p.ndim != 2 and p.ndim != 4:
                    p.add_(0.1 * torch.randn_like(p))
        state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        params = convert_state_dict(normalise_state_dict(state), variant)
        backbone = build_backbone(variant)
        if spec.family == "v2":
            backbone = backbone.clone(pos_interpolation="transformers")
        low_backbone = backbone.clone(dtype=jnp.bfloat16)
        f32 = jax.jit(lambda p, x, m=backbone: m.apply({"params": p}, x))
        bf16 = jax.jit(lambda p, x, m=low_backbone: m.apply({"params": p}, x))
        second = 448 if spec.family == "v2" else 320
        for size in (224, second):
            x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
            t0 = time.perf_counter()
            with torch.no_grad():
                hidden = model(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
            ref = hidden[:, 1 + spec.registers :].numpy()
            ours = np.asarray(f32(params, x)).reshape(ref.shape)
            err = float(np.abs(ours - ref).max())
            worst = max(worst, err)
            low = np.abs(np.asarray(bf16(params, x)).reshape(ref.shape) - ours)
            print(
                f"{variant} ({spec.depth} blocks, dim {spec.dim}) {size}px: fp32 max abs err "
                f"{err:.2e} (|features| max {np.abs(ref).max():.2f}); bf16 vs fp32 max "
                f"{low.max():.4f} mean {low.mean():.5f} [{time.perf_counter() - t0:.0f} s]",
                flush=True,
            )
    print(f"worst fp32 error {worst:.2e}: {'PASS' if worst <= TOLERANCE else 'FAIL'} (<= 1e-4)")


if __name__ == "__main__":
    main()
