"""Your own images, labels optional: DepthG on `directory` datasets (README, "Your own images").

    python -m depthg_jax.main --config=configs/custom.py --workdir=runs/mine \
      --config.data.root=/data/my_crops --config.data.eval_root=/data/my_photos \
      --config.model.weights=weights/dino_s8 --config.data.n_classes=8

- data.root: the five-crops of your training photos (`python -m depthg_jax.data.five_crop`),
  with their KNN table; data.eval_root: the photos themselves, whose `val` split is held out
  for validation (images and depth; labels optional).
- data.n_classes: the number of clusters K you ask for. With labels, it must also be at least
  the number of label classes (clusters are matched to classes one to one).
- train.validate="auto": validation on labels when the `val` split has labelled pixels, else
  label-free monitoring (held-out losses, cluster usage, picture grids) and no export_best/.

The objective and its weights start from COCO's (configs/coco.py, ViT-S/8 or `:B/8`) with the
paper's intent (`objective="corrected"`: depth guides the sampling and the depth term in 3D).
`--config=configs/custom.py:mu/8` is the demo-sized variant: a random one-block backbone that
runs the README's recipe in minutes on a CPU (it shows the steps, not DepthG's quality).
"""

from depthg_jax import config as base


def get_config(variant: str = "S/8"):
    config = base.sibling_config(__file__, "coco", "S/8" if variant == "mu/8" else variant)
    config.objective = "corrected"
    config.model.variant = variant
    config.data.name = "directory"
    config.data.root = ""  # the five-crops (train split)
    config.data.eval_name = "directory"
    config.data.eval_root = ""  # the uncropped photos (val split); "" = data.root
    config.data.n_classes = 8
    config.train.validate = "auto"
    config.train.eval_every = 100
    config.train.image_every = 100
    config.train.checkpoint_every = 100
    config.eval.crf = False  # segment --crf and evaluate --config.eval.crf=True refine
    if variant == "mu/8":  # demo-sized: minutes on a CPU, no weights needed
        config.model.allow_random_backbone = True
        config.model.dim = 32
        config.loss.feature_samples = 7
        config.loss.samples_decay_every = 0
        config.loss.depth_decay_every = 100
        config.train.batch_size = 16
        config.train.num_steps = 100
        config.train.log_every = 10
        config.train.eval_every = 50
        config.train.image_every = 50
        config.train.checkpoint_every = 50
        config.eval.batch_size = 8
    return config
