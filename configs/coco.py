"""COCO-Stuff-27, the released DepthG runs (docs/settings.md).

ViT-S/8 by default; ViT-B/8 with `--config=configs/coco.py:B/8`; DINOv2/v3 backbones with
e.g. `--config=configs/coco.py:v2-B/14` (the same size's DINO v1 settings as a starting point;
L, g, H+ and 7B, e.g. `:v3-7B/16`, start from the B/8 ones).
`objective="reference"` reproduces the released code (published numbers); switch to the
paper's intent with `--config.objective=corrected`.
"""

from depthg_jax import config as base


def get_config(variant: str = "S/8"):
    config = base.get_config()
    config.model.variant = variant
    config.data.name = "cocostuff27"
    config.data.n_classes = 27
    loss = config.loss
    family, _, size = variant.rpartition("-")
    if family:  # DINOv2 / DINOv3 (README, section Backbones): a starting point, not a tuned run.
        patch = int(size.split("/")[1])
        config.data.train_res = 224  # 16x16 (patch 14) or 14x14 (patch 16) feature grid
        config.data.eval_res = 322 if patch == 14 else 320
        variant = "S/8" if size.startswith("S") else "B/8"  # S, S+: ViT-S/8 settings; else B/8
    if variant.startswith("S/"):
        config.model.dim = 70
        loss.feature_samples = 11
        loss.pos_intra_weight, loss.pos_intra_shift = 0.58, 0.07
        loss.pos_inter_weight, loss.pos_inter_shift = 0.36, 0.025
        loss.neg_inter_weight, loss.neg_inter_shift = 0.70, 0.761
        loss.depth_weight, loss.depth_shift = 0.19, 0.03
        loss.depth_decay_every, loss.depth_decay_rate = 250, 0.6
        loss.samples_decay_every, loss.samples_decay_rate = 1000, 0.9  # release: 1000 steps
        config.train.eval_every = 100  # The release's val_freq.
    elif variant.startswith("B/"):
        config.model.dim = 90
        loss.feature_samples = 12
        # The release's reproduction script, at its full precision.
        loss.pos_intra_weight, loss.pos_intra_shift = 0.23052367315917113, 0.12326312284078644
        loss.pos_inter_weight, loss.pos_inter_shift = 1.0500945312858674, 0.21028290947990444
        loss.neg_inter_weight, loss.neg_inter_shift = 0.2485038032028848, 0.9748103425096648
        loss.depth_weight, loss.depth_shift = 0.16026274975444096, 0.035909146298813595
        loss.depth_decay_every, loss.depth_decay_rate = 100, 0.64  # release: 300 steps
        loss.samples_decay_every = 0
        config.train.eval_every = 50  # The release's val_freq for ViT-B.
    else:
        raise ValueError(
            f"configs/coco.py has settings for S/* and B/* sized variants, not {variant!r}"
        )
    loss.sampling = "fps"
    loss.pointwise = True
    return config
