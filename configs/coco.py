"""COCO-Stuff-27, released DepthG hyperparameters (SPEC §7).

ViT-S/8 by default; ViT-B/8 with `--config=configs/coco.py:B/8`.
`objective="reference"` reproduces the released code (published numbers); switch to the
paper's intent with `--config.objective=corrected`.
"""

from configs import base


def get_config(variant: str = "S/8"):
    config = base.get_config()
    config.model.variant = variant
    config.data.name = "cocostuff27"
    config.data.n_classes = 27
    loss = config.loss
    if variant.startswith("S/"):
        config.model.dim = 70
        loss.feature_samples = 11
        loss.pos_intra_weight, loss.pos_intra_shift = 0.58, 0.07
        loss.pos_inter_weight, loss.pos_inter_shift = 0.36, 0.025
        loss.neg_inter_weight, loss.neg_inter_shift = 0.70, 0.761
        loss.depth_weight, loss.depth_shift = 0.19, 0.03
        loss.depth_decay_every, loss.depth_decay_rate = 250, 0.6
        loss.samples_decay_every, loss.samples_decay_rate = 1000, 0.9
    elif variant.startswith("B/"):
        config.model.dim = 90
        loss.feature_samples = 12
        loss.pos_intra_weight, loss.pos_intra_shift = 0.2305, 0.1233
        loss.pos_inter_weight, loss.pos_inter_shift = 1.0501, 0.2103
        loss.neg_inter_weight, loss.neg_inter_shift = 0.2485, 0.9748
        loss.depth_weight, loss.depth_shift = 0.1603, 0.0359
        loss.depth_decay_every, loss.depth_decay_rate = 100, 0.64
        loss.samples_decay_every = 0
    else:
        raise ValueError(f"configs/coco.py has settings for S/* and B/* variants, not {variant!r}")
    loss.sampling = "fps"
    loss.pointwise = True
    return config
