"""Full-size parity of DinoViT with timm's DINO ViTs (random weights), fp32, and bf16 error.

Run with a Python that has timm, torch, jax and flax (see bench/RESULTS.md):
  PYTHONPATH=. /work/timmenv/bin/python bench/verify_vit_parity.py

For vit_small_patch8_224.dino (S/8) and vit_base_patch8_224.dino (B/8) built with
pretrained=False: LayerNorm affine and biases are re-randomised (timm initialises them to
1/0, which would hide bugs there), the state dict goes through convert_state_dict, and
our features (last block, final norm, CLS dropped) are compared with timm's
forward_features at 224 and at 320. At 320 the reference is timm built for 320 px with the
position embeddings resized by DINO's interpolate_pos_encoding, done in torch (bicubic,
scale_factor (g + 0.1) / g0, align_corners False). Also reports bf16-vs-fp32 error of ours.
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
import torch.nn.functional as F

from depthg_jax.models.convert import convert_state_dict
from depthg_jax.models.vit import DinoViT

MODELS = {"S/8": "vit_small_patch8_224.dino", "B/8": "vit_base_patch8_224.dino"}
TOLERANCE = 1e-4


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """facebookresearch/dino VisionTransformer.interpolate_pos_encoding, restated in torch."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim)
    grid = F.interpolate(
        grid.permute(0, 3, 1, 2),
        scale_factor=((gh + 0.1) / math.sqrt(n), (gw + 0.1) / math.sqrt(n)),
        mode="bicubic",
    )
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith(".bias") or "norm" in key:
            value.add_(0.1 * torch.randn_like(value))
    return state


@torch.no_grad()
def timm_features(name: str, state, images: np.ndarray, patch: int) -> np.ndarray:
    size = images.shape[1]
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size).eval()
    model.load_state_dict(state)
    tokens = model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2))
    b = images.shape[0]
    return tokens[:, 1:].reshape(b, size // patch, size // patch, -1).numpy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="S/8,B/8")
    parser.add_argument("--sizes", default="224,320")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(
        f"timm {timm.__version__}, torch {torch.__version__}, jax {jax.__version__}, "
        f"threads torch={torch.get_num_threads()}"
    )
    failures = 0
    for variant in args.variants.split(","):
        name = MODELS[variant]
        state = random_state(name, seed=0)
        params = convert_state_dict({k: v.numpy() for k, v in state.items()}, variant)
        f32 = jax.jit(lambda p, x, v=variant: DinoViT(v).apply({"params": p}, x))
        bf16 = jax.jit(lambda p, x, v=variant: DinoViT(v, jnp.bfloat16).apply({"params": p}, x))
        for size in map(int, args.sizes.split(",")):
            rng = np.random.default_rng(size)
            images = rng.standard_normal((args.batch, size, size, 3)).astype(np.float32)
            ref_state = dict(state)
            if size != 224:
                g = size // 8
                ref_state["pos_embed"] = dino_interpolate_pos_encoding(state["pos_embed"], g, g)
            t0 = time.perf_counter()
            ref = timm_features(name, ref_state, images, 8)
            ours = np.asarray(f32(params, images))
            low = np.asarray(bf16(params, images))
            err = float(np.abs(ours - ref).max())
            ok = err <= TOLERANCE
            failures += not ok
            print(
                f"{variant} ({name}) {size}x{size} batch {args.batch}: fp32 max abs err "
                f"{err:.2e} (mean {np.abs(ours - ref).mean():.1e}, |ref| max "
                f"{np.abs(ref).max():.2f}) {'PASS' if ok else 'FAIL'} <= {TOLERANCE:g}; "
                f"bf16 vs fp32 max abs {np.abs(low - ours).max():.3f} mean "
                f"{np.abs(low - ours).mean():.4f} [{time.perf_counter() - t0:.0f}s]",
                flush=True,
            )
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
