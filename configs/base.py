"""Base configuration: every field DepthG training and evaluation reads, with its meaning.

Dataset configs import `get_config()` from here and override only what differs.
Override from the command line with `--config.train.batch_size=64` etc.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root PRNG seed; per-step keys are fold_in(root, step).
    # "reference": behave as the released PyTorch code (published numbers).
    # "corrected": the paper's intent (SPEC.md §5-§7). Affects depth term, FPS coords, fov, S decay.
    config.objective = "reference"

    # --- Backbone and head -------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.variant = "S/8"  # DINO ViT variant: "S/8", "S/16", "B/8", "B/16", "mu/8" (tests).
    # Pretrained backbone: an Orbax dir from `python -m depthg_jax.models.convert`, or an
    # official .pth / timm / HF safetensors file. "" means random init (demo and tests only).
    config.model.weights = ""
    config.model.allow_random_backbone = False  # Must be True to train with weights == "".
    config.model.dtype = "float32"  # Backbone compute dtype; "bfloat16" on accelerators.
    config.model.dim = 70  # Code dimension K.
    config.model.dropout = 0.1  # Channel dropout (Dropout2d) rate of the head's three masks.

    # --- Data ----------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.name = "directory"  # "cocostuff27", "cityscapes27", "potsdam3", "directory".
    config.data.root = ""  # Dataset root on local disk (see README for each layout).
    # Prepared records (`python -m depthg_jax.data.prepare`, local or gs://): when set, train
    # and eval read them instead of files under root, and the KNN table stored beside them.
    config.data.data_dir = ""
    config.data.n_classes = 27  # Number of ground-truth classes (and clusters).
    # Evaluation data, when it differs from the training data (e.g. training on five-crops
    # written as a "directory" dataset, evaluating on the original split): "" = same as above.
    config.data.eval_name = ""
    config.data.eval_root = ""
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.train_res = 224  # Training crop size (resize shorter side, centre crop).
    config.data.eval_res = 320  # Evaluation crop size.
    config.data.num_neighbors = 7  # Positive drawn uniformly from KNN ranks 1..num_neighbors.
    # KNN table: "" = the standard name under root for (train split, knn_variant, train_res),
    # made by `python -m depthg_jax.data.knn --config=...`.
    config.data.knn_path = ""
    config.data.knn_variant = ""  # Backbone whose features define neighbours ("" = model.variant).
    config.data.worker_count = 0  # grain worker processes per host (0: in-process).
    config.data.read_threads = 0  # Decode threads per host (0: max(4, min(16, cpu_count))).
    config.data.prefetch = 2  # Batches prefetched to device ahead of the step.
    # Only for name == "synthetic" (generated on first use under <workdir>/synthetic_data):
    config.data.synthetic_train = 256  # Generated training images.
    config.data.synthetic_val = 64  # Generated validation images.
    config.data.synthetic_size = 256  # Side of the generated images (px).
    config.data.synthetic_seed = 0

    # --- Objective (SPEC.md §4-§7) -----------------------------------------------------------
    config.loss = ml_collections.ConfigDict()
    config.loss.sampling = "fps"  # "fps" (depth-guided) or "random" coordinates.
    config.loss.feature_samples = 11  # S: S x S points sampled per image.
    config.loss.pointwise = True  # Centre feature correlations per anchor point.
    config.loss.neg_samples = 5  # Shuffled-batch negatives per step.
    config.loss.pos_intra_weight = 0.58
    config.loss.pos_intra_shift = 0.07
    config.loss.pos_inter_weight = 0.36
    config.loss.pos_inter_shift = 0.025
    config.loss.neg_inter_weight = 0.70
    config.loss.neg_inter_shift = 0.761
    config.loss.depth_weight = 0.19  # Initial lambda_d.
    config.loss.depth_shift = 0.03  # Initial b_d.
    config.loss.depth_decay_every = 250  # Batches between depth decays (0: never).
    config.loss.depth_decay_rate = 0.6
    config.loss.samples_decay_every = 1000  # Batches between S decays (0: never).
    config.loss.samples_decay_rate = 0.9
    config.loss.depth_positive = False  # corrected only: add the positive's depth term too.
    config.loss.fov = 90.0  # Pinhole field of view used to lift depth to 3D.
    config.loss.far = 5.0  # Depth scale of the lifted Z coordinate.

    # --- Optimisation --------------------------------------------------------------------
    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 5e-4  # Head (Adam, PyTorch defaults).
    config.optim.probe_lr = 5e-3  # Each probe.

    # --- Training loop -------------------------------------------------------------------
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 32  # Global batch (all devices of all hosts).
    config.train.num_steps = 2334  # Batches (the released max_steps 7000 ran ~2334 batches).
    config.train.log_every = 25
    config.train.eval_every = 500  # In-training validation (0: only at the end).
    config.train.eval_batches = 0  # Batches per in-training validation (0: whole split).
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.image_every = 500  # PNG summaries (image | depth | cluster | label).
    config.train.report_baselines = False  # Also score the untrained head and k-means (demo).

    # --- Evaluation ----------------------------------------------------------------------
    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 16  # Global eval batch.
    config.eval.crf = True  # Dense CRF in the final protocol.
    config.eval.flip = True  # Average code with the flipped image's flipped code.
    return config
