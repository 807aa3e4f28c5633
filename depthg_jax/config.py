"""The configuration: one table of every field DepthG reads, and the rules derived from it.

`FIELDS` declares each field once: its default, what it means, its type and bounds, whether a
resumed run may change it (`on_resume`), and whether sweep members may differ in it
(`per_member`, with the name the loss and optimiser read it by). Everything else derives from
the table: `get_config()` (the base config experiment files start from), `validate()` (types,
finiteness, bounds and choices of every field, then the rules between fields),
`ALLOWED_ON_RESUME` (the resume guard), `MEMBER_FIELDS` / `HPARAM_FIELDS` (sweeps and the
objective's hyperparameters).

This module imports no JAX: loading a config file is cheap, and `validate` imports the model
and data tables only when it runs. Experiment files (configs/*.py) import `get_config()` from
here and override only what differs, so they load from any directory once the package is
installed. Override from the command line with `--config.train.batch_size=64` etc.

`resolve(config, workdir)` fills every derived field (data roots, the KNN variant and path,
the evaluation data) into a new locked config and validates it; everything downstream reads
the resolved config, and that is what the workdir's config.json holds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

OBJECTIVES = ("reference", "corrected")
DTYPES = ("float32", "bfloat16", "float16")
CRF_IMAGES = ("exact", "reference")
PARALLELISMS = ("jit", "pmap")
PARAM_DTYPES = ("float32", "bfloat16")
SAMPLINGS = ("fps", "random")
BEST_METRICS = ("val/cluster_miou", "val/cluster_accuracy")
VALIDATIONS = ("auto", "labels", "none")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: its default and meaning, and the rules every other place reads.

    low/high bound numbers (inclusive unless low_open/high_open); choices lists the allowed
    values (a callable gives them lazily, for tables that live in modules importing JAX).
    on_resume: a resumed run may change it (it changes when things happen, not what the run
    computes). hparam: the name the objective and optimiser read a per-member field by.
    """

    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | Callable[[], tuple] | None = None
    on_resume: bool = False
    per_member: bool = False
    hparam: str | None = None

    @property
    def kind(self) -> type:
        return type(self.default)


def _dataset_names() -> tuple:
    from depthg_jax.data import datasets

    return datasets.DATASET_NAMES


def _matmul_precisions() -> tuple:
    from depthg_jax.models import model

    return model.MATMUL_PRECISIONS


def _attentions() -> tuple:
    from depthg_jax.models import vit

    return vit.ATTENTIONS


def _variants() -> tuple:
    from depthg_jax.models import variants

    return tuple(sorted(variants.VARIANTS))


def _weight(default: float, doc: str, hparam: str) -> Field:
    return Field(default, doc, low=0.0, per_member=True, hparam=hparam)


def _shift(default: float, doc: str, hparam: str) -> Field:
    return Field(default, doc, per_member=True, hparam=hparam)


def _resumable(default: Any, doc: str, **rules) -> Field:
    return Field(default, doc, on_resume=True, **rules)


FIELDS: dict[str, Field] = {
    "seed": Field(0, "Root PRNG seed; per-step keys are fold_in(root, step).", low=0),
    "objective": Field(
        "reference",
        '"reference": behave as the released PyTorch code (published numbers); "corrected": '
        "the paper's intent. docs/release.md lists every difference.",
        choices=OBJECTIVES,
    ),
    # --- Backbone and head
    "model.variant": Field(
        "S/8",
        'Backbone variant: "S/8", "B/8", "v2-B/14", "v3-S/16", ..., "mu/8" (tests).',
        choices=_variants,
    ),
    "model.weights": Field(
        "",
        "Pretrained backbone: an Orbax dir from `python -m depthg_jax.models.convert`, or an "
        'official .pth / timm / HF safetensors file. "" means random init (demo and tests).',
    ),
    "model.allow_random_backbone": Field(False, 'Must be True to train with weights == "".'),
    "model.dtype": Field(
        "float32", 'Backbone compute dtype; "bfloat16" on accelerators.', choices=DTYPES
    ),
    "model.backbone_param_dtype": Field(
        "float32",
        "Dtype the frozen backbone's parameters are held in on the devices, cast once at load: "
        '"float32" (the reference) or "bfloat16" (half the memory; docs/pods.md#parameter-dtype).',
        choices=PARAM_DTYPES,
    ),
    "model.matmul_precision": Field(
        "default",
        'f32 matmul precision of backbone and head: "default" (TPU: one bf16 pass; recent '
        'GPUs: TF32), "high", or "highest" (full fp32, as the release ran; '
        "docs/release.md#matmul-precision).",
        choices=_matmul_precisions,
    ),
    "model.attention": _resumable(
        "auto",
        'The backbone\'s attention: "auto" (cuDNN flash attention on NVIDIA GPUs in bf16/fp16, '
        'XLA\'s dot_product_attention elsewhere), "xla", "cudnn", or "explicit" (einsum and '
        "softmax, as the release). The same numbers to ~1e-6 in float32.",
        choices=_attentions,
    ),
    "model.dim": Field(70, "Code dimension K.", low=1, high=65536),
    "model.dropout": Field(
        0.1,
        "Channel dropout (Dropout2d) rate of the head's three masks.",
        low=0.0,
        high=1.0,
        high_open=True,
    ),  # fmt: skip
    # --- Data
    "data.name": Field(
        "directory",
        'Training data: "cocostuff27", "cityscapes27", "potsdam3", "directory", "synthetic".',
        choices=_dataset_names,
    ),
    "data.root": Field("", "Dataset root on local disk (see README for each layout)."),
    "data.data_dir": Field(
        "",
        "Prepared records (`python -m depthg_jax.data.prepare`, local or gs://): when set, "
        "train and eval read them instead of files under root, and the KNN table beside them.",
    ),
    "data.n_classes": Field(
        27,
        "Ground-truth classes, and the clusters K of the cluster probe (for unlabelled data: "
        "the number of clusters you ask for).",
        low=1,
        high=255,
    ),  # fmt: skip
    "data.eval_name": Field(
        "",
        'Evaluation data when it differs from the training data ("" = data.name).',
        choices=lambda: ("",) + _dataset_names(),
    ),  # fmt: skip
    "data.eval_root": Field("", 'Root of the evaluation data ("" = data.root).'),
    "data.train_split": Field("train", "Training split."),
    "data.eval_split": Field("val", "Evaluation split."),
    "data.train_res": Field(
        224, "Training crop size (resize shorter side, centre crop).", low=1, high=4096
    ),
    "data.eval_res": Field(320, "Evaluation crop size.", low=1, high=4096),
    "data.num_neighbors": Field(
        7,
        "Positive drawn uniformly from KNN ranks 1..num_neighbors (tables hold 30).",
        low=1,
        high=29,
    ),  # fmt: skip
    "data.knn_path": Field(
        "",
        '"" = the standard name under root for (train split, knn_variant, train_res), made '
        "by `python -m depthg_jax.data.knn --config=...`.",
    ),
    "data.knn_variant": Field(
        "",
        'Backbone whose features define neighbours ("" = model.variant).',
        choices=lambda: ("",) + _variants(),
    ),  # fmt: skip
    "data.knn_dropout": Field(
        0.0,
        "Dropout2d rate on the KNN features (the release's KNN script left the featuriser in "
        "train mode: 0.1 reproduces it, seeded by config.seed; docs/release.md#knn-features).",
        low=0.0,
        high=1.0,
        high_open=True,
    ),  # fmt: skip
    "data.worker_count": _resumable(0, "grain worker processes per host (0: in-process).", low=0),
    "data.read_threads": _resumable(
        0, "Decode threads per host (0: max(4, min(16, cpu_count))).", low=0
    ),
    "data.prefetch": _resumable(2, "Batches prefetched to device ahead of the step.", low=1),
    "data.synthetic_train": Field(256, "Generated training images (synthetic only).", low=1),
    "data.synthetic_val": Field(64, "Generated validation images (synthetic only).", low=1),
    "data.synthetic_size": Field(256, "Side of the generated images, px.", low=16, high=4096),
    "data.synthetic_seed": Field(0, "Seed of the generated scenes.", low=0),
    # --- Objective (docs/method.md)
    "loss.sampling": Field(
        "fps",
        '"fps" (depth-guided) or "random" coordinates.',
        choices=SAMPLINGS,
        per_member=True,
    ),  # fmt: skip
    "loss.feature_samples": Field(11, "S: S x S points sampled per image.", low=1),
    "loss.pointwise": Field(True, "Centre feature correlations per anchor point."),
    "loss.neg_samples": Field(5, "Shuffled-batch negatives per step.", low=1, high=64),
    "loss.pos_intra_weight": _weight(0.58, "lambda of the intra-image term.", "intra_weight"),
    "loss.pos_intra_shift": _shift(0.07, "b of the intra-image term.", "intra_shift"),
    "loss.pos_inter_weight": _weight(0.36, "lambda of the KNN-positive term.", "inter_weight"),
    "loss.pos_inter_shift": _shift(0.025, "b of the KNN-positive term.", "inter_shift"),
    "loss.neg_inter_weight": _weight(0.70, "lambda of the negative term.", "neg_weight"),
    "loss.neg_inter_shift": _shift(0.761, "b of the negative term.", "neg_shift"),
    "loss.depth_weight": _weight(0.19, "Initial lambda_d.", "depth_weight"),
    "loss.depth_shift": _shift(0.03, "Initial b_d.", "depth_shift"),
    "loss.depth_decay_every": Field(
        250,
        "Batches between depth decays (0: never). The release's decay_every_steps N counts "
        "Lightning steps, 3 per batch: batches = N / gcd(3, N) (docs/settings.md); the timing "
        "follows `objective` (docs/release.md#schedule-timing).",
        low=0,
    ),
    "loss.depth_decay_rate": Field(
        0.6,
        "Factor of each depth decay.",
        low=0.0,
        high=1.0,
        low_open=True,
        per_member=True,
        hparam="depth_decay_rate",
    ),  # fmt: skip
    "loss.samples_decay_every": Field(1000, "Batches between S decays (0: never).", low=0),
    "loss.samples_decay_rate": Field(
        0.9, "Factor of each S decay.", low=0.0, high=1.0, low_open=True
    ),
    "loss.depth_positive": Field(False, "corrected only: add the positive's depth term too."),
    "loss.fov": Field(
        90.0,
        "Pinhole field of view (degrees) used to lift depth to 3D.",
        low=0.0,
        high=180.0,
        low_open=True,
        high_open=True,
    ),  # fmt: skip
    "loss.far": Field(5.0, "Depth scale of the lifted Z coordinate.", low=0.0, low_open=True),
    # --- Optimisation
    "optim.lr": Field(
        5e-4,
        "Head learning rate (Adam, PyTorch defaults).",
        low=0.0,
        low_open=True,
        high=1.0,
        per_member=True,
        hparam="lr",
    ),  # fmt: skip
    "optim.probe_lr": Field(
        5e-3,
        "Each probe's learning rate.",
        low=0.0,
        low_open=True,
        high=1.0,
        per_member=True,
        hparam="probe_lr",
    ),  # fmt: skip
    # --- Training loop
    "train.batch_size": Field(32, "Global batch (all devices of all hosts).", low=1),
    "train.num_steps": _resumable(
        2334, "Batches (the released max_steps 7000 ran ~2334 batches).", low=1
    ),
    "train.log_every": _resumable(25, "Batches between logged scalars.", low=1),
    "train.eval_every": _resumable(
        500,
        "In-training validation every this many batches (0: only at the end). Under "
        'objective="reference" an interval above a quarter of an epoch validates at each '
        "epoch's end instead, as the release does.",
        low=0,
    ),
    "train.validate": _resumable(
        "auto",
        'In-training validation: "labels" (scores on the labelled evaluation split, picks '
        'export_best/), "none" (label-free monitoring: held-out losses, cluster usage, '
        'picture grids; no export_best/), "auto" ("labels" when the evaluation split has '
        'labelled pixels, else "none"). README, section Your own images.',
        choices=VALIDATIONS,
    ),
    "train.best_metric": _resumable(
        "val/cluster_miou",
        'The validation score that picks export_best/: "val/cluster_miou" (COCO, '
        'Cityscapes) or "val/cluster_accuracy" (Potsdam), as the release.',
        choices=BEST_METRICS,
    ),
    "train.parallelism": _resumable(
        "jit", '"jit" (one program over the mesh) or "pmap".', choices=PARALLELISMS
    ),
    "train.eval_batches": _resumable(0, "Batches per in-training validation (0: all).", low=0),
    "train.checkpoint_every": _resumable(500, "Batches between checkpoints.", low=1),
    "train.keep_checkpoints": _resumable(3, "Checkpoints kept (the best is kept too).", low=1),
    "train.image_every": _resumable(
        500, "PNG summaries (image | depth | cluster | label) every this many batches.", low=0
    ),
    "train.report_baselines": _resumable(
        False, "Also score the untrained head and k-means (demo)."
    ),
    "train.restart": _resumable(
        False,
        "Start over in a workdir that holds a run: its files move to <workdir>/previous-<time>/.",
    ),
    # --- Device mesh ('data', 'model'): docs/pods.md
    "mesh.model": _resumable(
        1,
        "Devices each frozen-backbone parameter is split over (the mesh's 'model' axis); the "
        "batch splits over the other axis, 'data' = devices / mesh.model. 1: data parallelism "
        "only. `python -m depthg_jax.plan` says which value a backbone needs on a slice.",
        low=1,
    ),
    # --- Evaluation (the final protocol; a resumed run may change it)
    "eval.batch_size": _resumable(16, "Global eval batch.", low=1),
    "eval.crf": _resumable(True, "Dense CRF in the final protocol."),
    "eval.flip": _resumable(True, "Average the code with the flipped image's flipped code."),
    "eval.crf_image": _resumable(
        "exact",
        'The CRF\'s RGB input: "exact" (the uint8 image) or "reference" (floor(255 * '
        "unnormalised image), as the release feeds it: ~15-25% of levels come back one lower).",
        choices=CRF_IMAGES,
    ),
    # --- Sweep mode: a population of heads trained in one step (depthg_jax.training.sweep).
    # Members are named by a grid, seeded random draws, or an explicit list (at most one);
    # all empty: one run. Only per-member fields may vary.
    "sweep.grid": Field(
        "", '"loss.pos_intra_weight=0.5,0.58;loss.neg_inter_shift=0.7,0.76": the product.'
    ),
    "sweep.random": Field(
        0, "Members drawn uniformly from sweep.ranges, seeded by sweep.seed.", low=0
    ),
    "sweep.ranges": Field("", '"loss.depth_weight=0.05:0.3;optim.lr=1e-4:1e-3:log".'),
    "sweep.seed": Field(0, "Seed of the random draws.", low=0),
    "sweep.members": Field(
        "",
        'Explicit members, "|"-separated, each "field=value,..." (optionally "name=stego,...").',
    ),
    "sweep.memory_gb": Field(
        0.0,
        "Memory the population may use, GiB (0: the device's limit; host RAM on CPU).",
        low=0.0,
    ),  # fmt: skip
}

ALLOWED_ON_RESUME = tuple(name for name, f in FIELDS.items() if f.on_resume)
# The numeric hyperparameters first, then the per-member switches (loss.sampling).
MEMBER_FIELDS = tuple(
    sorted((n for n, f in FIELDS.items() if f.per_member), key=lambda n: FIELDS[n].hparam is None)
)
# The per-member hyperparameters by the name the loss and optimiser read them (objective).
HPARAM_FIELDS = {f.hparam: name for name, f in FIELDS.items() if f.hparam}


def get_config() -> ml_collections.ConfigDict:
    """The base config: every field of FIELDS at its default (see FIELDS for their meaning)."""
    config = ml_collections.ConfigDict()
    for name, field in FIELDS.items():
        section, _, leaf = name.rpartition(".")
        target = config
        if section:
            if section not in config:
                config[section] = ml_collections.ConfigDict()
            target = config[section]
        target[leaf] = field.default
    return config


def sibling_config(config_file: str, name: str, *args) -> ml_collections.ConfigDict:
    """get_config(*args) of the config file `name`.py beside `config_file` (configs that build
    on another load it this way, so they work from any directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_depthg_config_{name}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def get_field(config: ml_collections.ConfigDict, name: str) -> Any:
    node = config
    for part in name.split("."):
        node = node[part]
    return node


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
    validate_fields(config)  # before the derived fields are computed from bad values
    out = ml_collections.ConfigDict(config.to_dict())
    data = out.data
    if data.name == "synthetic" and not data.root:
        if workdir is None:
            raise ValueError("the synthetic data set needs a workdir (or data.root) to live in")
        data.root = os.path.join(os.path.abspath(workdir), "synthetic_data")
    data.knn_variant = data.knn_variant or out.model.variant
    if not data.knn_path and data.root and not data.data_dir:
        from depthg_jax.data import knn

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


def check_field(name: str, value: Any, field: Field | None = None) -> None:
    """Raises ValueError naming `config.<name>` if value breaks the field's type or rules."""
    field = field or FIELDS[name]
    where = f"config.{name}={value!r}"
    kind = field.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}; expected True or False")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}; expected an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}; expected a number")
        if not math.isfinite(value):
            raise ValueError(f"{where}; expected a finite number")
    elif kind is str and not isinstance(value, str):
        raise ValueError(f"{where}; expected a string")
    if field.choices is not None:
        choices = field.choices() if callable(field.choices) else field.choices
        if value not in choices:
            raise ValueError(f"{where}; expected one of {tuple(choices)}")
    low_ok = field.low is None or (value > field.low if field.low_open else value >= field.low)
    high_ok = field.high is None or (value < field.high if field.high_open else value <= field.high)
    if not (low_ok and high_ok):
        lo = "" if field.low is None else ("(" if field.low_open else "[") + f"{field.low:g}"
        hi = "" if field.high is None else f"{field.high:g}" + (")" if field.high_open else "]")
        bounds = f"in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{where}; expected a value {bounds}")


def validate_fields(config: ml_collections.ConfigDict) -> None:
    """Every field of the table: present, of its type, finite, within bounds and choices."""
    for name, field in FIELDS.items():
        try:
            value = get_field(config, name)
        except (KeyError, AttributeError):
            raise ValueError(f"config.{name} is missing (FIELDS declares it)") from None
        check_field(name, value, field)


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails early, with the field named, on values the run could only fail on later: each
    field against the table, then the rules between fields."""
    validate_fields(config)
    from depthg_jax.models import model as model_lib
    from depthg_jax.models import variants

    for name_field, root_field in (("name", "root"), ("eval_name", "eval_root")):
        name = config.data[name_field] or config.data.name
        root = config.data[root_field] or config.data.root
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
        if res % patch:
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
