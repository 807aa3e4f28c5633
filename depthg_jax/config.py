"""The configuration: every field DepthG reads (`get_config`), resolved once, then validated.

Experiment files (configs/*.py) import `get_config()` from here and override only what
differs, so they load from any directory once the package is installed. Override from the
command line with `--config.train.batch_size=64` etc.

`resolve(config, workdir)` fills every derived field (data roots, the KNN variant and path,
the evaluation data) into a new locked config and validates it; everything downstream reads
the resolved config, and that is what the workdir's config.json holds.
"""

from __future__ import annotations

import math
import os

import ml_collections

from depthg_jax.data import datasets, knn
from depthg_jax.models import model as model_lib
from depthg_jax.models import variants

OBJECTIVES = ("reference", "corrected")
DTYPES = ("float32", "bfloat16", "float16")
CRF_IMAGES = ("exact", "reference")
PARALLELISMS = ("jit", "pmap")
# The hyperparameters a population member may set for itself (depthg_jax.training.sweep): the name
# the loss and optimiser read them by (objective.hparams) -> the config field.
HPARAM_FIELDS = {
    "intra_weight": "loss.pos_intra_weight",
    "intra_shift": "loss.pos_intra_shift",
    "inter_weight": "loss.pos_inter_weight",
    "inter_shift": "loss.pos_inter_shift",
    "neg_weight": "loss.neg_inter_weight",
    "neg_shift": "loss.neg_inter_shift",
    "depth_weight": "loss.depth_weight",
    "depth_shift": "loss.depth_shift",
    "depth_decay_rate": "loss.depth_decay_rate",
    "lr": "optim.lr",
    "probe_lr": "optim.probe_lr",
}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Root PRNG seed; per-step keys are fold_in(root, step).
    # "reference": behave as the released PyTorch code (published numbers).
    # "corrected": the paper's intent. docs/release.md lists every difference.
    config.objective = "reference"

    # --- Backbone and head -------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.variant = "S/8"  # DINO ViT variant: "S/8", "S/16", "B/8", "B/16", "mu/8" (tests).
    # Pretrained backbone: an Orbax dir from `python -m depthg_jax.models.convert`, or an
    # official .pth / timm / HF safetensors file. "" means random init (demo and tests only).
    config.model.weights = ""
    config.model.allow_random_backbone = False  # Must be True to train with weights == "".
    config.model.dtype = "float32"  # Backbone compute dtype; "bfloat16" on accelerators.
    # f32 matmul precision of backbone and head: "default" (TPU: one bf16 pass; recent GPUs:
    # TF32), "high", or "highest" (full fp32, as the release ran; docs/release.md#precision).
    config.model.matmul_precision = "default"
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
    # Dropout2d rate on the KNN features (the release's KNN script left the featuriser in
    # train mode: 0.1 reproduces it, seeded by config.seed; docs/release.md#knn).
    config.data.knn_dropout = 0.0
    config.data.worker_count = 0  # grain worker processes per host (0: in-process).
    config.data.read_threads = 0  # Decode threads per host (0: max(4, min(16, cpu_count))).
    config.data.prefetch = 2  # Batches prefetched to device ahead of the step.
    # Only for name == "synthetic" (generated on first use under <workdir>/synthetic_data):
    config.data.synthetic_train = 256  # Generated training images.
    config.data.synthetic_val = 64  # Generated validation images.
    config.data.synthetic_size = 256  # Side of the generated images (px).
    config.data.synthetic_seed = 0

    # --- Objective (docs/method.md) --------------------------------------------------------
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
    # Decay intervals in batches (the release's decay_every_steps N counts Lightning steps,
    # 3 per batch: batches = N / gcd(3, N); docs/settings.md). Their timing follows
    # `objective` (docs/release.md#schedules).
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
    # In-training validation on the evaluation split (0: only at the end). Under
    # objective="reference" an interval above a quarter of an epoch's batches validates at
    # each epoch's end instead, as the release does.
    config.train.eval_every = 500
    # The validation score that picks the best checkpoint (export_best/): "val/cluster_miou"
    # (COCO, Cityscapes) or "val/cluster_accuracy" (Potsdam), as the release.
    config.train.best_metric = "val/cluster_miou"
    config.train.parallelism = "jit"  # "jit" (one program over the mesh) or "pmap".
    config.train.eval_batches = 0  # Batches per in-training validation (0: whole split).
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.image_every = 500  # PNG summaries (image | depth | cluster | label).
    config.train.report_baselines = False  # Also score the untrained head and k-means (demo).
    # Start over in a workdir that holds a run: its files move to <workdir>/previous-<time>/.
    config.train.restart = False

    # --- Evaluation ----------------------------------------------------------------------
    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 16  # Global eval batch.
    config.eval.crf = True  # Dense CRF in the final protocol.
    config.eval.flip = True  # Average code with the flipped image's flipped code.
    # The CRF's RGB input: "exact" (the uint8 image) or "reference" (floor(255 * unnormalised
    # image), as the release feeds it: ~15-25% of levels come back one lower).
    config.eval.crf_image = "exact"

    # --- Sweep mode: a population of heads trained in one step (depthg_jax.training.sweep) ---
    # Members are named by a grid, seeded random draws, or an explicit list (at most one);
    # all empty: one run. Only per-member fields (HPARAM_FIELDS and loss.sampling) may vary.
    config.sweep = ml_collections.ConfigDict()
    # "loss.pos_intra_weight=0.5,0.58;loss.neg_inter_shift=0.7,0.76": the product of the lists.
    config.sweep.grid = ""
    config.sweep.random = 0  # Members drawn uniformly from sweep.ranges, seeded by sweep.seed.
    config.sweep.ranges = ""  # "loss.depth_weight=0.05:0.3;optim.lr=1e-4:1e-3:log".
    config.sweep.seed = 0
    # Explicit members, "|"-separated, each "field=value,..." (optionally "name=stego,...").
    config.sweep.members = ""
    # Memory the population may use, GiB (0: the device's limit; the host's RAM on CPU).
    config.sweep.memory_gb = 0.0
    return config


# --------------------------------------------------------------------------------------
# Resolution and validation
# --------------------------------------------------------------------------------------


def resolve(config: ml_collections.ConfigDict, workdir: str | None = None):
    """A new, locked, validated config with every derived field filled in.

    - data.root of the synthetic set: <workdir>/synthetic_data when empty;
    - data.knn_variant: model.variant when empty; data.knn_path: the standard table path;
    - data.eval_name / data.eval_root: the training data's when empty.
    The input config is not modified.
    """
    out = ml_collections.ConfigDict(config.to_dict())
    data = out.data
    if data.name == "synthetic" and not data.root:
        if workdir is None:
            raise ValueError("the synthetic data set needs a workdir (or data.root) to live in")
        data.root = os.path.join(os.path.abspath(workdir), "synthetic_data")
    data.knn_variant = data.knn_variant or out.model.variant
    if not data.knn_path and data.root and not data.data_dir:
        data.knn_path = knn.knn_table_path(
            data.root, data.train_split, data.knn_variant, data.train_res
        )
    data.eval_name = data.eval_name or data.name
    data.eval_root = data.eval_root or data.root
    out.lock()
    validate(out)
    return out


def eval_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data section evaluation reads: a resolved config's eval_name/eval_root as name/root."""
    out = ml_collections.ConfigDict(config.data.to_dict())
    out.name = config.data.eval_name or config.data.name
    out.root = config.data.eval_root or config.data.root
    return out


def release_depth_cast(config: ml_collections.ConfigDict, dataset: str) -> bool:
    """Whether depth reads as the released Potsdam loader's {0, 1} (docs/release.md)."""
    return config.objective == "reference" and dataset == "potsdam3"


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails early, with the field named, on values the run could only fail on later."""
    _one_of("objective", config.objective, OBJECTIVES)
    if config.model.variant not in variants.VARIANTS:
        raise ValueError(
            f"config.model.variant={config.model.variant!r}; expected one of "
            f"{sorted(variants.VARIANTS)}"
        )
    _one_of("model.dtype", config.model.dtype, DTYPES)
    _one_of("model.matmul_precision", config.model.matmul_precision, model_lib.MATMUL_PRECISIONS)
    _one_of("eval.crf_image", config.eval.crf_image, CRF_IMAGES)
    _one_of("train.parallelism", config.train.parallelism, PARALLELISMS)
    _one_of("loss.sampling", config.loss.sampling, ("fps", "random"))
    _one_of("train.best_metric", config.train.best_metric, BEST_METRICS)
    for field, low in (
        ("model.dim", 1),
        ("data.n_classes", 1),
        ("data.num_neighbors", 1),
        ("train.batch_size", 1),
        ("eval.batch_size", 1),
        ("train.num_steps", 1),
        ("train.log_every", 1),
        ("train.checkpoint_every", 1),
        ("train.keep_checkpoints", 1),
        ("train.eval_every", 0),
        ("train.eval_batches", 0),
        ("train.image_every", 0),
        ("loss.feature_samples", 1),
        ("loss.neg_samples", 1),
        ("loss.depth_decay_every", 0),
        ("loss.samples_decay_every", 0),
    ):
        section, name = field.split(".")
        value = config[section][name]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"config.{field}={value!r}; expected an integer >= {low}")
    if not 0.0 <= config.model.dropout < 1.0 or not 0.0 <= config.data.knn_dropout < 1.0:
        raise ValueError(
            f"config.model.dropout={config.model.dropout} and config.data.knn_dropout="
            f"{config.data.knn_dropout} must lie in [0, 1)"
        )
    for name_field, root_field in (("name", "root"), ("eval_name", "eval_root")):
        name = config.data[name_field] or config.data.name
        root = config.data[root_field] or config.data.root
        _one_of(f"data.{name_field}", name, datasets.DATASET_NAMES)
        if name == "synthetic" or config.data.data_dir:
            continue  # Generated, or read from prepared records (data.data_dir).
        if not root:
            raise ValueError(
                f"config.data.{root_field} is empty: set --config.data.{root_field}=DIR to the "
                f"{name} dataset (README, section Data)"
            )
        if not os.path.isdir(root):
            raise FileNotFoundError(f"config.data.{root_field}={root!r} is not a directory")
    patch = variants.patch_size(config.model.variant)
    for field in ("train_res", "eval_res"):
        res = config.data[field]
        if res <= 0 or res % patch:
            raise ValueError(
                f"config.data.{field}={res} is not a positive multiple of the patch size {patch}"
            )
    grid = (config.data.train_res // patch) ** 2
    if config.loss.feature_samples**2 > grid:
        raise ValueError(
            f"config.loss.feature_samples={config.loss.feature_samples}: "
            f"{config.loss.feature_samples}^2 samples exceed the {grid} feature-grid points"
        )
    model_lib.check_backbone_weights(config.model)


BEST_METRICS = ("val/cluster_miou", "val/cluster_accuracy")


def validation_interval(config: ml_collections.ConfigDict, train_examples: int) -> int:
    """Batches between in-training validations (0: only at the end).

    Under objective="reference", an interval above a quarter of an epoch's batches becomes
    the epoch's length (ceil(examples / batch)): the release then validates at epoch ends.
    """
    every = config.train.eval_every
    if every and config.objective == "reference":
        epoch = math.ceil(train_examples / config.train.batch_size)
        if every > epoch / 4:
            return epoch
    return every


def _one_of(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"config.{field}={value!r}; expected one of {tuple(allowed)}")

