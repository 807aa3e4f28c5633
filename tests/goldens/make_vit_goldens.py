"""Makes the ViT golden fixtures from timm (a reference no one here wrote).

Run with a Python that has timm (needs torch 2.14.1 + torchvision 0.29.1 here):
  /work/timmenv/bin/python tests/goldens/make_vit_goldens.py

For each tiny config (the "mu/8" and "mu/16" variants: width 32, 2 heads, 1 block) it
builds a timm VisionTransformer with DINO's key names, re-randomises every parameter (so
biases, LayerNorm affine, position embeddings all matter), and stores in
tests/goldens/vit_<name>.npz: the state dict ("sd/<key>"), two input batches (NHWC) and
timm's outputs: last-block patch tokens after the final norm (CLS dropped, NHWC) and the
last block's attention. The second input has a size other than the stored grid; there the
position embeddings are resized as DINO's interpolate_pos_encoding does (torch bicubic,
scale factor (g + 0.1) / g0) and loaded into a timm model built for that size.
"""

import math
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

OUT = Path(__file__).resolve().parent
CASES = {
    # name: (patch, stored image size, other input size (H, W))
    "mu8": (8, 32, (48, 40)),
    "mu16": (16, 32, (48, 64)),
}


def build(patch, img_size):
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch,
        embed_dim=32,
        depth=1,
        num_heads=2,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
    ).eval()


def randomise(state, gen):
    out = {}
    for k, v in state.items():
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k == "norm.weight":
            out[k] = 1 + 0.2 * torch.randn(v.shape, generator=gen)
        elif k.endswith(".bias"):
            out[k] = 0.1 * torch.randn(v.shape, generator=gen)
        elif k in ("pos_embed", "cls_token"):
            out[k] = 0.5 * torch.randn(v.shape, generator=gen)
        else:
            fan_in = math.prod(v.shape[1:])
            out[k] = torch.randn(v.shape, generator=gen) / math.sqrt(fan_in)
    return out


def dino_resize_pos_embed(pos_embed, gh, gw):
    """DINO's interpolate_pos_encoding, done in torch."""
    n = pos_embed.shape[1] - 1
    g0 = math.sqrt(n)
    c = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, int(g0), int(g0), c).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0),
        mode="bicubic",
        align_corners=False,
    )
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c)], 1)


@torch.no_grad()
def run_timm(model, images_nhwc, patch):
    """Patch features (NHWC) and last-block attention of a timm ViT."""
    captured = {}
    last = model.blocks[-1]
    hook = last.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    tokens = model.forward_features(x)
    hook.remove()
    b, h, w, _ = images_nhwc.shape
    feats = tokens[:, 1:].reshape(b, h // patch, w // patch, -1)
    y = captured["x"]
    heads = last.attn.num_heads
    qkv = last.attn.qkv(y).reshape(b, y.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    attn = ((q * last.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    return feats.numpy(), attn.numpy()


def make_case(name, patch, size, other, seed):
    gen = torch.Generator().manual_seed(seed)
    model = build(patch, size)
    state = randomise(model.state_dict(), gen)
    model.load_state_dict(state)
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    feats, attn = run_timm(model, images, patch)
    other_images = rng.standard_normal((2, *other, 3)).astype(np.float32)
    resized = dict(state)
    resized["pos_embed"] = dino_resize_pos_embed(
        state["pos_embed"], other[0] // patch, other[1] // patch
    )
    other_model = build(patch, other)
    other_model.load_state_dict(resized)
    other_feats, other_attn = run_timm(other_model, other_images, patch)
    arrays = {f"sd/{k}": v.numpy() for k, v in state.items()}
    arrays.update(
        images=images,
        feats=feats,
        attn=attn,
        other_images=other_images,
        other_feats=other_feats,
        other_attn=other_attn,
        versions=np.array(f"timm {timm.__version__}, torch {torch.__version__}"),
    )
    path = OUT / f"vit_{name}.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path.name}: {path.stat().st_size} bytes, {len(state)} keys")


def main():
    for i, (name, (patch, size, other)) in enumerate(CASES.items()):
        make_case(name, patch, size, other, seed=i)


if __name__ == "__main__":
    main()
