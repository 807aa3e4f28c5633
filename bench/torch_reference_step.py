"""A PyTorch statement of the released DepthG train step, for benchmarking only.

This restates, in our own code, what one optimiser step of the authors' release
(leonsick/depthg `LitUnsupervisedSegmenter.training_step`, built on STEGO) computes, so that
`bench/train_step.py` can time it next to ours on the same inputs:

- a plain DINO ViT with explicit attention, softmax(q k^T * scale) v, DINO's module names,
  frozen, in eval mode, under `torch.no_grad`, run once on the anchors and once on the
  positives (the release calls its featurizer twice);
- the head: linear + nonlinear 1x1 convolutions, each behind its own Dropout2d(0.1) mask,
  and a third mask on the features that enter the correlations;
- farthest point sampling per image in a NumPy loop on the host (depth average-pooled to
  the feature grid, lifted with fov=90 passed to tan as radians, FPS from index 0 with
  `np.delete` of the chosen index each round, then the chosen set read back in row-major
  order as (row/H, col/W), x2-1);
- the STEGO contrastive correlation loss (intra, inter, 5 negatives with the no-self-pair
  shuffle, pointwise centring, zero clamp, grid_sample with the transposed grid, border
  padding, align_corners=True) and the released depth-feature term (full depth map resized
  to SxS, normalised along its one channel);
- cluster probe (hard assignment) and linear probe (bilinear upsampling, cross-entropy over
  valid pixels) on the detached code;
- one backward, then three Adam steps (head 5e-4, each probe 5e-3);
- the released decay block, run after each batch's loss with Lightning's global_step = 3·b
  (three optimiser steps per batch) and the release's own intervals N: depth weight and
  shift × rate when `global_step % N == 0 and global_step > 0`; the sample count
  S <- int(S·rate), floored at fps_min_samples, when `global_step % N == 0` (batch 0 too).

Negatives (the permutations) may be given to `step` from outside and the dropout rate to
the constructor, so that a run can be replayed exactly next to ours (tests/trajectory_test.py);
`load_jax_params` copies our flax parameters in. Nothing in `depthg_jax` imports this file.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (embed dim, heads, patch, blocks) of the DINO variants (MLP ratio 4 for all), plus the
# one-block test variant "mu/8" of depthg_jax.models.vit.
VARIANTS = {
    "S/8": (384, 6, 8, 12),
    "S/16": (384, 6, 16, 12),
    "B/8": (768, 12, 8, 12),
    "B/16": (768, 12, 16, 12),
    "mu/8": (32, 2, 8, 1),
}


# --------------------------------------------------------------------------------------
# Backbone: DINO's vision_transformer.py layout, explicit attention
# --------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViT(nn.Module):
    """Returns last-block tokens after the final LayerNorm, CLS dropped, as (B, C, h, w)."""

    def __init__(self, variant: str = "S/8", pretrain_res: int = 224):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}; expected one of {sorted(VARIANTS)}")
        dim, heads, patch, depth = VARIANTS[variant]
        self.patch_embed = PatchEmbed(patch, dim)
        grid = pretrain_res // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, gh: int, gw: int) -> torch.Tensor:
        """DINO's resize: bicubic, scale factor (g + 0.1) / g0, for grids other than g0 x g0."""
        g0 = int(math.sqrt(self.pos_embed.shape[1] - 1))
        if (gh, gw) == (g0, g0):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = grid.shape[-1]
        grid = grid.reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / g0, (gw + 0.1) / g0), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([cls, grid], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.patch_embed.patch_size
        gh, gw = h // p, w // p
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.position_embedding(gh, gw)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 1:].reshape(b, gh, gw, -1).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------
# Head and probes
# --------------------------------------------------------------------------------------


class Featurizer(nn.Module):
    """Frozen backbone + trainable head; returns (masked feats, code) like the release."""

    def __init__(self, variant: str, dim: int, dropout: float = 0.1):
        super().__init__()
        self.model = DinoViT(variant)
        for p in self.model.parameters():
            p.requires_grad = False
        channels = VARIANTS[variant][0]
        self.dropout = nn.Dropout2d(p=dropout)
        self.cluster1 = nn.Sequential(nn.Conv2d(channels, dim, 1))
        self.cluster2 = nn.Sequential(
            nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, dim, 1)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        with torch.no_grad():
            feats = self.model(images)
        # Three independent channel-dropout masks: two for the head, one for the loss input.
        code = self.cluster1(self.dropout(feats)) + self.cluster2(self.dropout(feats))
        return self.dropout(feats), code


class ClusterProbe(nn.Module):
    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_classes, dim))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        inner = torch.einsum(
            "bchw,nc->bnhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1)
        )
        hard = F.one_hot(inner.argmax(1), inner.shape[1]).permute(0, 3, 1, 2).float()
        return -(hard * inner).sum(1).mean()


# --------------------------------------------------------------------------------------
# Sampling: the released host-side FPS and the transposed grid_sample
# --------------------------------------------------------------------------------------


def lift_depth(depth: torch.Tensor, fov: float = 90.0, far: float = 5.0) -> torch.Tensor:
    """(h, w) depth -> (3, h, w) points; fov goes to tan as given (radians), as released."""
    factor = 2.0 * torch.tan(torch.tensor([fov], dtype=depth.dtype) / 2.0)
    h, w = depth.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = factor * depth * (cols - w / 2.0) / w
    y = factor * depth * (rows - h / 2.0) / h
    return torch.stack([x, y, -depth * far])


def farthest_points_numpy(points: np.ndarray, count: int) -> np.ndarray:
    """Released FPS: start at index 0, shrink the candidate list with np.delete each round."""
    remaining = np.arange(len(points))
    chosen = np.zeros(count, dtype=int)
    nearest = np.full(len(points), np.inf)
    chosen[0] = remaining[0]
    remaining = np.delete(remaining, 0)
    for i in range(1, count):
        gap = ((points[chosen[i - 1]] - points[remaining]) ** 2).sum(-1)
        nearest[remaining] = np.minimum(gap, nearest[remaining])
        pick = int(np.argmax(nearest[remaining]))
        chosen[i] = remaining[pick]
        remaining = np.delete(remaining, pick)
    return chosen


def fps_coords(feats: torch.Tensor, depth: torch.Tensor, num_side: int) -> torch.Tensor:
    """Per-image host loop: pooled depth -> points -> FPS -> (B, S, S, 2) coords in [-1, 1]."""
    h, w = feats.shape[-2:]
    pooled = F.adaptive_avg_pool2d(depth, (h, w))
    out = []
    for i in range(pooled.shape[0]):
        cloud = lift_depth(pooled[i, 0]).permute(1, 2, 0).reshape(-1, 3)
        picked = farthest_points_numpy(cloud.cpu().numpy(), num_side**2)
        mask = torch.zeros(h * w)
        mask[picked] = 1.0
        rc = mask.reshape(h, w).nonzero().float()  # row-major: FPS order is lost
        rc[:, 0] /= h
        rc[:, 1] /= w
        out.append(rc.reshape(num_side, num_side, 2))
    return torch.stack(out) * 2 - 1


def sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def no_self_perm(n: int) -> torch.Tensor:
    perm = torch.randperm(n)
    perm[perm == torch.arange(n)] += 1
    return perm % n


def unit(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw,ncij->nhwij", a, b)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def correlation_term(f1, f2, c1, c2, shift: float, pointwise: bool) -> torch.Tensor:
    with torch.no_grad():
        fd = corr(unit(f1), unit(f2))
        if pointwise:
            overall = fd.mean()
            fd = fd - fd.mean([3, 4], keepdim=True)
            fd = fd - fd.mean() + overall
    cd = corr(unit(c1), unit(c2))
    return (-cd.clamp(0.0) * (fd - shift)).mean()


def depth_term(code_s: torch.Tensor, depth: torch.Tensor, shift: float) -> torch.Tensor:
    """Released depth-feature correlation: full depth resized to S x S, unit along 1 channel."""
    cd = corr(unit(code_s), unit(code_s))
    d = F.interpolate(depth, size=code_s.shape[2:], mode="bilinear", align_corners=True)
    dd = corr(unit(d), unit(d))
    return (-cd.clamp(0.0) * (dd - shift)).mean()


# Released COCO-Stuff ViT-S/8 weights and shifts (docs/settings.md) and its decays, the intervals in
# the release's units (global_step = 3 x batch): depth every 250 (250 batches) x0.6, FPS
# sample count every 1000 (1000 batches) x0.9, floored at fps_min_samples 0 (0: no decay).
LOSS = dict(
    intra=(0.58, 0.07),
    inter=(0.36, 0.025),
    neg=(0.70, 0.761),
    depth=(0.19, 0.03),
    neg_samples=5,
    pointwise=True,
    decay_every_steps=250,
    depth_loss_decay_factor=0.6,
    fps_sample_decay_every_steps=1000,
    fps_sample_decay_factor=0.9,
    fps_min_samples=0,
)


class TorchReferenceStep:
    """Holds the model and optimisers; `step(batch)` runs one released training step."""

    def __init__(
        self,
        variant: str = "S/8",
        dim: int = 70,
        n_classes: int = 27,
        num_side: int = 11,
        loss: dict | None = None,
        dropout: float = 0.1,
    ):
        torch.manual_seed(0)
        self.loss = {**LOSS, **(loss or {})}
        unknown = set(self.loss) - set(LOSS)
        if unknown:
            raise ValueError(f"unknown loss settings {sorted(unknown)}; known: {sorted(LOSS)}")
        # Mutable schedule state, as the release keeps it in its cfg.
        self.depth_weight, self.depth_shift = self.loss["depth"]
        self.global_step = 0  # Lightning's count: 3 per batch (three optimisers)
        self.net = Featurizer(variant, dim, dropout)
        self.cluster_probe = ClusterProbe(dim, n_classes)
        self.linear_probe = nn.Conv2d(dim, n_classes, 1)
        self.n_classes = n_classes
        self.num_side = num_side
        self.net.train()
        head = [p for p in self.net.parameters() if p.requires_grad]
        self.optims = [
            torch.optim.Adam(head, lr=5e-4),
            torch.optim.Adam(self.linear_probe.parameters(), lr=5e-3),
            torch.optim.Adam(self.cluster_probe.parameters(), lr=5e-3),
        ]
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def to_tensors(self, batch: dict) -> dict:
        """Host NHWC numpy batch (as for the JAX step) -> NCHW tensors, images normalised."""

        def image(x):
            t = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).float() / 255.0
            return (t - self.mean) / self.std

        return {
            "img": image(batch["image"]),
            "img_pos": image(batch["image_pos"]),
            "depth": torch.from_numpy(np.asarray(batch["depth"], np.float32))[:, None],
            "depth_pos": torch.from_numpy(np.asarray(batch["depth_pos"], np.float32))[:, None],
            "label": torch.from_numpy(np.asarray(batch["label"], np.int64)),
        }

    def load_jax_params(self, backbone: dict, params: dict) -> None:
        """Copies our flax parameters in: `backbone` (DinoViT params), `params` (the train
        state's {"head", "cluster_probe", "linear_probe"}). Resets the optimisers."""

        def t(x):
            return torch.from_numpy(np.array(x, np.float32))

        def linear(module: nn.Module, tree: dict) -> None:
            kernel = t(tree["kernel"]).T  # (in, out) -> (out, in)
            shape = module.weight.shape
            module.weight.data.copy_(kernel.reshape(shape))
            module.bias.data.copy_(t(tree["bias"]))

        def norm(module: nn.LayerNorm, tree: dict) -> None:
            module.weight.data.copy_(t(tree["scale"]))
            module.bias.data.copy_(t(tree["bias"]))

        vit = self.net.model
        vit.cls_token.data.copy_(t(backbone["cls_token"]))
        vit.pos_embed.data.copy_(t(backbone["pos_embed"]))
        proj = backbone["patch_embed"]["proj"]
        vit.patch_embed.proj.weight.data.copy_(t(proj["kernel"]).permute(3, 2, 0, 1))
        vit.patch_embed.proj.bias.data.copy_(t(proj["bias"]))
        for i, block in enumerate(vit.blocks):
            tree = backbone[f"blocks_{i}"]
            norm(block.norm1, tree["norm1"])
            norm(block.norm2, tree["norm2"])
            linear(block.attn.qkv, tree["attn"]["qkv"])
            linear(block.attn.proj, tree["attn"]["proj"])
            linear(block.mlp.fc1, tree["mlp"]["fc1"])
            linear(block.mlp.fc2, tree["mlp"]["fc2"])
        norm(vit.norm, backbone["norm"])
        head = params["head"]
        linear(self.net.cluster1[0], head["linear"])
        linear(self.net.cluster2[0], head["nonlinear_1"])
        linear(self.net.cluster2[2], head["nonlinear_2"])
        self.cluster_probe.clusters.data.copy_(t(params["cluster_probe"]["clusters"]))
        linear(self.linear_probe, params["linear_probe"]["linear"])
        for opt in self.optims:
            opt.state.clear()

    def head_params(self) -> dict:
        """The trainable parameters in our flax layout (numpy), for comparison."""

        def dense(module: nn.Module) -> dict:
            w = module.weight.detach().numpy()
            return {"kernel": w.reshape(w.shape[0], -1).T, "bias": module.bias.detach().numpy()}

        return {
            "head": {
                "linear": dense(self.net.cluster1[0]),
                "nonlinear_1": dense(self.net.cluster2[0]),
                "nonlinear_2": dense(self.net.cluster2[2]),
            },
            "cluster_probe": {"clusters": self.cluster_probe.clusters.detach().numpy()},
            "linear_probe": {"linear": dense(self.linear_probe)},
        }

    def decay(self) -> None:
        """The released decay block, run after each batch's loss (global_step = 3·b)."""
        c, step = self.loss, self.global_step
        if c["decay_every_steps"] and step % c["decay_every_steps"] == 0 and step > 0:
            self.depth_weight = self.depth_weight * c["depth_loss_decay_factor"]
            self.depth_shift = self.depth_shift * c["depth_loss_decay_factor"]
        if c["fps_sample_decay_every_steps"] and step % c["fps_sample_decay_every_steps"] == 0:
            self.num_side = int(self.num_side * c["fps_sample_decay_factor"])
            if self.num_side < c["fps_min_samples"]:
                self.num_side = c["fps_min_samples"]

    def step(self, batch: dict, perms: np.ndarray | None = None) -> float:
        """One released training step on a host batch; returns the total loss.

        perms: (neg_samples, B) negatives (image perms[i, b] is anchor b's i-th negative);
        None draws them with the release's `super_perm` from torch's generator. The step
        uses the current S and depth weight/shift, then runs the decay block for later
        batches.
        """
        t = self.to_tensors(batch)
        for opt in self.optims:
            opt.zero_grad()
        feats, code = self.net(t["img"])
        feats_pos, code_pos = self.net(t["img_pos"])

        coords1 = fps_coords(feats, t["depth"], self.num_side)
        coords2 = fps_coords(feats_pos, t["depth_pos"], self.num_side)
        f1, c1 = sample(feats, coords1), sample(code, coords1)
        f2, c2 = sample(feats_pos, coords2), sample(code_pos, coords2)
        c, pw = self.loss, self.loss["pointwise"]
        intra = correlation_term(f1, f1, c1, c1, c["intra"][1], pw)
        inter = correlation_term(f1, f2, c1, c2, c["inter"][1], pw)
        depth = depth_term(c1, t["depth"], self.depth_shift)
        if perms is not None and np.shape(perms) != (c["neg_samples"], feats.shape[0]):
            raise ValueError(
                f"perms must be (neg_samples={c['neg_samples']}, B={feats.shape[0]}), "
                f"got {np.shape(perms)}"
            )
        negs = []
        for i in range(c["neg_samples"]):
            if perms is None:
                perm = no_self_perm(feats.shape[0])
            else:
                perm = torch.from_numpy(np.asarray(perms[i], np.int64))
            fn, cn = sample(feats[perm], coords2), sample(code[perm], coords2)
            negs.append(correlation_term(f1, fn, c1, cn, c["neg"][1], pw))
        neg = torch.stack(negs).mean()
        loss = (
            c["inter"][0] * inter
            + c["intra"][0] * intra
            + c["neg"][0] * neg
            + self.depth_weight * depth
        )
        self.decay()  # released order: after the correlation losses, before the probes

        label = t["label"]
        detached = code.detach().clone()
        logits = F.interpolate(
            self.linear_probe(detached), label.shape[-2:], mode="bilinear", align_corners=False
        )
        logits = logits.permute(0, 2, 3, 1).reshape(-1, self.n_classes)
        flat = label.reshape(-1)
        valid = (flat >= 0) & (flat < self.n_classes)
        loss = loss + F.cross_entropy(logits[valid], flat[valid])
        loss = loss + self.cluster_probe(detached)

        loss.backward()
        for opt in self.optims:
            opt.step()
            self.global_step += 1  # Lightning counts every optimiser step
        return float(loss.detach())
