"""Cityscapes-27, ViT-B/8, the released DepthG run (docs/settings.md): random sampling."""

from depthg_jax import config as base


def get_config():
    config = base.get_config()
    config.model.variant = "B/8"
    config.model.dim = 100
    config.data.name = "cityscapes27"
    config.data.n_classes = 27
    loss = config.loss
    loss.sampling = "random"
    loss.pointwise = False
    loss.feature_samples = 11
    loss.pos_intra_weight, loss.pos_intra_shift = 0.95, 0.39
    loss.pos_inter_weight, loss.pos_inter_shift = 1.02, 0.25
    loss.neg_inter_weight, loss.neg_inter_shift = 0.57, 0.26
    loss.depth_weight, loss.depth_shift = 0.09, 0.03
    loss.depth_decay_every, loss.depth_decay_rate = 400, 0.8
    loss.samples_decay_every = 0
    config.train.eval_every = 100  # The release's val_freq (docs/release.md#checkpoint-choice).
    return config
