"""Potsdam-3, ViT-S/8, the released DepthG run (docs/settings.md). Images are not five-cropped."""

from depthg_jax import config as base


def get_config():
    config = base.get_config()
    config.model.variant = "S/8"
    config.model.dim = 90
    config.data.name = "potsdam3"
    config.data.n_classes = 3
    config.train.batch_size = 16
    loss = config.loss
    loss.sampling = "fps"
    loss.pointwise = True
    loss.feature_samples = 11
    loss.pos_intra_weight, loss.pos_intra_shift = 0.61, 0.20
    loss.pos_inter_weight, loss.pos_inter_shift = 0.34, 0.09
    loss.neg_inter_weight, loss.neg_inter_shift = 0.72, 0.63
    loss.depth_weight, loss.depth_shift = 0.13, 0.14
    loss.depth_decay_every = 0
    loss.samples_decay_every = 0
    # The release validates every 100 batches (every epoch's end once that exceeds a quarter
    # epoch) and keeps the best checkpoint by cluster accuracy (docs/release.md).
    config.train.eval_every = 100
    config.train.best_metric = "val/cluster_accuracy"
    return config
