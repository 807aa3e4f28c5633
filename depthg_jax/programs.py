"""Every jitted program the package runs, in one table, and the check that each lowers for TPU,
GPU and CPU without the hardware.

Each `Entry` builds its program exactly as the package does (the same factory: the train
step, the population step, the evaluator's steps, `predict`, the KNN and k-means feature
programs, the portable artifact's function) together with abstract inputs
(`jax.ShapeDtypeStruct` with the shardings the real call gives them; nothing is allocated but
the k-means centroids, a few KiB) at a config's real shapes: configs/coco.py gives ViT-S/8 at
batch 32 and 224 px for training, 320 px with flip for evaluation; `configs/coco.py:B/8` the
ViT-B/8 ones. `lower` then exports one with `jax.export` for each platform asked (`["tpu"]`,
`["cuda"]`, `["cpu"]`) and refuses, naming the program and the platform:
  - a host callback (`jax.pure_callback`, `io_callback`, `jax.debug.*`) anywhere in it;
  - a custom call outside `ALLOWED_CUSTOM_CALLS` (a CPU-only kernel, a cuDNN-only attention);
  - anything JAX cannot lower for that platform.

`UNLISTED` names the jit sites of the package that are deliberately not in the table, each
with its reason; tests/lowering_test.py scans the package's source for every `jit`/`pmap` and
fails when one is neither listed here nor in `UNLISTED`.

Run it on a CPU host. The backbone picks its attention for the platform it is traced on
(models/vit.py, attention="auto"): here that is XLA's `dot_product_attention`, the path TPUs
run and GPUs run in float32; a CUDA host would trace cuDNN flash attention, which lowers for
CUDA only. So the "cuda" lowering checked here is that of the XLA attention path, not of the
cuDNN one a GPU runs in bfloat16 (that needs cuDNN present to lower at all).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from depthg_jax.data import knn
from depthg_jax.evaluation import baselines, evaluator
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.runtime import portable, sharding, xla
from depthg_jax.training import population
from depthg_jax.training import step as step_lib

PLATFORMS = ("tpu", "cuda", "cpu")
# Custom calls a program may contain: SPMD partitioning markers, which every backend's
# partitioner consumes, and jax.export's checks of a symbolic dimension's value at call time
# (the portable artifact's batch size). Anything else (a CPU LAPACK kernel, a cuDNN call, a
# host callback) would tie the program to one platform.
ALLOWED_CUSTOM_CALLS = frozenset(
    {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "shape_assertion"}
)
# Primitives that call back into Python on the host: a step containing one stalls on every
# call and cannot be serialised.
HOST_CALLBACKS = frozenset({"pure_callback", "io_callback", "debug_callback", "debug_print"})
KNN_BATCH_PER_DEVICE = 8  # the KNN command's default --per_device_batch
SWEEP_MEMBERS = 8  # the population step is lowered with this many members

# Jit sites in the package that are not programs of the table, and why.
UNLISTED = {
    "depthg_jax.runtime.xla:jit": "the xla.jit wrapper itself; every program is built with it",
    "depthg_jax.runtime.xla:_Jitted._jitted": "inside the xla.jit wrapper",
    "depthg_jax.runtime.xla:_Jitted._nested": "inside the xla.jit wrapper",
    "depthg_jax.models.model:init_backbone": (
        "a random backbone's init, run once and only without pretrained weights (demo, tests)"
    ),
    "depthg_jax.models.model:_init_params": "the whole model's random init (tests, demos)",
    "depthg_jax.runtime.sharding:_reshard": (
        "an identity jit that moves an array to another sharding (no computation)"
    ),
    "depthg_jax.models.convert:check_finite_on_devices": (
        "one isfinite count per loaded backbone tensor, run once at load (elementwise ops)"
    ),
    "depthg_jax.training.step:make_pmap_train_step.step_fn": (
        "jax.pmap, which jax.export cannot take (it exports jit programs only); its body is "
        "the jit step's own update_from_features plus all_gather and pmean"
    ),
}


class LoweringError(ValueError):
    """A program cannot run on a platform as written (the message names both and why)."""


@dataclasses.dataclass(frozen=True)
class Lowerable:
    """A jitted program and abstract arguments to export it with."""

    name: str
    program: Any  # a jax.jit (what jax.export takes)
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)  # static keyword arguments


class Shapes:
    """What the programs are built for: a config's model, batches and resolutions on a mesh."""

    def __init__(
        self, config: ml_collections.ConfigDict, mesh: Mesh | None = None, *, members: int = 0
    ):
        self.config = config
        self.mesh = sharding.make_mesh() if mesh is None else mesh
        self.members = members or SWEEP_MEMBERS
        self.spec = model_lib.ModelSpec.from_config(config)
        self.replicated = sharding.replicated(self.mesh)
        self.batched = sharding.batch_sharding(self.mesh)

    def replicate(self, tree):
        """Abstract copies of `tree`'s leaves, replicated on the mesh."""
        return jax.tree.map(lambda x: _struct(x.shape, x.dtype, self.replicated), tree)

    def batch(self, **leaves):
        """{name: (shape, dtype)} as abstract arrays split over the mesh's 'data' axis."""
        return {k: _struct(shape, dtype, self.batched) for k, (shape, dtype) in leaves.items()}

    @functools.cached_property
    def params(self) -> dict:
        """The whole model's params {"backbone", "head", "cluster_probe", "linear_probe"}."""
        init = lambda key: model_lib.init_params(self.spec, key)  # noqa: E731
        return self.replicate(jax.eval_shape(init, jax.random.key(0)))

    @functools.cached_property
    def key(self):
        return self.replicate(jax.eval_shape(lambda: jax.random.key(0)))

    def hp(self, members: int = 0) -> dict:
        hp = jax.eval_shape(lambda: objective_lib.hparams(self.config))
        if members:
            hp = {k: jax.ShapeDtypeStruct((members,), v.dtype) for k, v in hp.items()}
            hp["fps"] = jax.ShapeDtypeStruct((members,), jnp.float32)  # a mixed population
        return self.replicate(hp)

    def state(self, members: int = 0):
        hp = objective_lib.hparams(self.config)
        key = jax.random.key(0)
        if members:
            make = lambda: step_lib.create_population_state(self.spec, hp, key, members)  # noqa: E731
        else:
            make = lambda: step_lib.create_train_state(self.spec, hp, key)  # noqa: E731
        return self.replicate(jax.eval_shape(make))

    def train_batch(self) -> dict:
        b, r = int(self.config.train.batch_size), int(self.config.data.train_res)
        one = {"image": ((b, r, r, 3), jnp.uint8), "depth": ((b, r, r), jnp.float32),
               "label": ((b, r, r), jnp.int32)}  # fmt: skip
        return self.batch(**one, **{k + "_pos": v for k, v in one.items()})

    def eval_batch(self) -> tuple:
        """(images uint8, labels int32, valid bool) of one evaluation batch."""
        b, e = int(self.config.eval.batch_size), int(self.config.data.eval_res)
        out = self.batch(
            image=((b, e, e, 3), jnp.uint8), label=((b, e, e), jnp.int32), valid=((b,), jnp.bool_)
        )
        return out["image"], out["label"], out["valid"]

    def population_params(self) -> dict:
        trainable = jax.tree.map(
            lambda x: _struct((self.members,) + x.shape, x.dtype, self.replicated),
            {k: self.params[k] for k in model_lib.TRAINABLE_KEYS},
        )
        return {"backbone": self.params["backbone"], **trainable}


def _struct(shape, dtype, sharding_=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding_)


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def _train_step(s: Shapes) -> Lowerable:
    objective = objective_lib.Objective.from_config(s.config)
    program = step_lib.make_train_step("jit", s.spec, objective, s.mesh)
    args = (s.state(), s.params["backbone"], s.train_batch(), s.key, s.hp())
    return Lowerable("train_step", xla.as_jax_jit(program), args,
                     {"num_side": objective.samples_at(0)})  # fmt: skip


def _population_step(s: Shapes) -> Lowerable:
    # Members of mixed sampling: both the FPS and the random-coordinate paths are in it.
    objective = objective_lib.Objective.from_config(s.config, sampling=objective_lib.MIXED)
    program = population.make_population_step("jit", s.spec, objective, s.mesh)
    args = (s.state(s.members), s.params["backbone"], s.train_batch(), s.key, s.hp(s.members))
    return Lowerable("population_step", xla.as_jax_jit(program), args,
                     {"num_side": objective.samples_at(0)})  # fmt: skip


def _evaluator(s: Shapes, predict, **options) -> evaluator.Evaluator:
    return evaluator.Evaluator(predict, s.spec.n_classes, s.mesh, progress=False, **options)


def _evaluation_step(s: Shapes) -> Lowerable:
    """The final protocol's step: flip-averaged code, log-probs out for the dense CRF."""
    ev = _evaluator(s, evaluator.head_predictor(s.spec, flip=True), crf=True)
    return Lowerable("evaluation_step", xla.as_jax_jit(ev.step), (s.params, *s.eval_batch()))


def _crf_count(s: Shapes) -> Lowerable:
    ev = _evaluator(s, evaluator.head_predictor(s.spec, flip=True), crf=True)
    images, labels, valid = s.eval_batch()
    preds = {k: _struct(labels.shape, jnp.int32, s.batched) for k in evaluator.PROBES}
    return Lowerable("crf_count", xla.as_jax_jit(ev.count), (preds, labels, valid))


def _validation_step(s: Shapes) -> Lowerable:
    ev = _evaluator(s, evaluator.head_predictor(s.spec, flip=False))
    return Lowerable("validation_step", xla.as_jax_jit(ev.step), (s.params, *s.eval_batch()))


def _population_validation_step(s: Shapes) -> Lowerable:
    ev = _evaluator(s, evaluator.population_predictor(s.spec))
    args = (s.population_params(), *s.eval_batch())
    return Lowerable("population_validation_step", xla.as_jax_jit(ev.step), args)


def _predict(s: Shapes) -> Lowerable:
    images = s.eval_batch()[0]
    return Lowerable("predict", xla.as_jax_jit(model_lib.predict), (s.params, images),
                     {"spec": s.spec, "flip": True})  # fmt: skip


def _knn_features(s: Shapes, dropout: float) -> Lowerable:
    program = knn.embedding_program(knn.backbone_features(s.spec), dropout=dropout)
    g, r = KNN_BATCH_PER_DEVICE * s.mesh.devices.size, int(s.config.data.train_res)
    images = s.batch(x=((g, r, r, 3), jnp.float32))["x"]  # ImageNet-normalised
    name = "knn_features" + ("_dropout" if dropout else "")
    return Lowerable(name, xla.as_jax_jit(program), (s.params["backbone"], images, s.key))


def _embedding(s: Shapes, of: str):
    """(embed, its params, its width) of the k-means baselines: "backbone" or "code"."""
    if of == "backbone":
        return baselines.backbone_embedding(s.spec), s.params["backbone"], s.spec.width
    return baselines.code_embedding(s.spec), s.params, s.spec.dim


def _kmeans_features(s: Shapes, of: str) -> Lowerable:
    embed, params, _ = _embedding(s, of)
    program = baselines.unit_embedding_program(embed)
    return Lowerable(f"kmeans_{of}_features", xla.as_jax_jit(program), (params, s.eval_batch()[0]))


def _kmeans_step(s: Shapes, of: str) -> Lowerable:
    embed, params, width = _embedding(s, of)
    centroids = jnp.zeros((s.spec.n_classes, width), jnp.float32)  # (n, width): a few KiB
    ev = _evaluator(s, baselines.kmeans_predictor(embed, centroids))
    return Lowerable(f"kmeans_{of}_step", xla.as_jax_jit(ev.step), (params, *s.eval_batch()))


def _portable_inference(s: Shapes) -> Lowerable:
    res = int(s.config.data.eval_res)
    program = portable.inference_program(s.spec, flip=True)
    return Lowerable("portable_inference", program, (s.params, portable.abstract_images(res)))


def _heldout_terms(s: Shapes) -> Lowerable:
    """Label-free monitoring: the objective's terms on a held-out batch (one device)."""
    from depthg_jax.training import loop

    objective = objective_lib.Objective.from_config(s.config, sampling="fps")
    b, e = int(s.config.eval.batch_size), int(s.config.data.eval_res)
    images = _struct((b, e, e, 3), jnp.uint8)
    depth = _struct((b, e, e), jnp.float32)
    trainable = s.state().params
    step = _struct((), jnp.int32)
    args = (trainable, s.params["backbone"], images, depth, s.key, step, s.hp())
    return Lowerable("heldout_terms", xla.as_jax_jit(loop.heldout_terms), args,
                     {"spec": s.spec, "objective": objective,
                      "num_side": objective.samples_at(0)})  # fmt: skip


def _segmenter_forward(s: Shapes) -> Lowerable:
    """inference.Segmenter's batch: labels, log-probabilities and code of one probe."""
    from depthg_jax import inference

    images = s.eval_batch()[0]
    return Lowerable("segmenter_forward", xla.as_jax_jit(inference._forward), (s.params, images),
                     {"spec": s.spec, "flip": True, "probe": "cluster"})  # fmt: skip


def _depth_anything(s: Shapes) -> Lowerable:
    """The depth command's JAX forward: Depth Anything V2 Small on a batch of COCO-sized
    (518 x 686) uint8 images, flip TTA on, as `python -m depthg_jax.data.depth` runs it."""
    from depthg_jax.data import depth
    from depthg_jax.models import depth_anything as da

    spec = da.VARIANTS["da2-S"]
    stats = (da.IMAGENET_MEAN, da.IMAGENET_STD, 1 / 255)
    program = depth._jax_forward(spec, "float32", True, stats, s.mesh)
    images = _struct((8, 518, 518, 3), jnp.float32)
    params = jax.eval_shape(da.DepthAnything(spec).init, jax.random.key(0), images)["params"]
    batch = s.batch(x=((4 * s.mesh.devices.size, 518, 686, 3), jnp.uint8))["x"]
    return Lowerable("depth_anything", xla.as_jax_jit(program), (s.replicate(params), batch))


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    doc: str
    sites: tuple[str, ...]  # the jit sites it covers, "module:qualified name"
    build: Callable[[Shapes], Lowerable]


_STEP = "depthg_jax.training.step:jit_program.program"
_EVAL_STEP = "depthg_jax.evaluation.evaluator:Evaluator.__init__.step"
ENTRIES = (
    Entry("train_step", "the jit train step over the mesh (state donated)",
          (_STEP,), _train_step),
    Entry("population_step", "a sweep's step, members of mixed sampling",
          (_STEP,), _population_step),
    Entry("evaluation_step", "evaluate's step: flip, log-probs for the CRF",
          (_EVAL_STEP,), _evaluation_step),
    Entry("crf_count", "the confusion counts of the CRF's labels",
          ("depthg_jax.evaluation.evaluator:Evaluator.__init__.count",), _crf_count),
    Entry("validation_step", "in-training validation of one head", (_EVAL_STEP,),
          _validation_step),
    Entry("population_validation_step", "validation of every member from one backbone pass",
          (_EVAL_STEP,), _population_validation_step),
    Entry("predict", "models.model.predict with flip (segment)",
          ("depthg_jax.models.model:predict",), _predict),
    Entry("knn_features", "the KNN command's pooled features",
          ("depthg_jax.data.knn:embedding_program.embed",),
          functools.partial(_knn_features, dropout=0.0)),
    Entry("knn_features_dropout", "the same with the release's Dropout2d(0.1)",
          ("depthg_jax.data.knn:embedding_program.embed",),
          functools.partial(_knn_features, dropout=0.1)),
    Entry("kmeans_backbone_features", "unit backbone features for k-means",
          ("depthg_jax.evaluation.baselines:unit_embedding_program.features",),
          functools.partial(_kmeans_features, of="backbone")),
    Entry("kmeans_code_features", "unit codes for k-means",
          ("depthg_jax.evaluation.baselines:unit_embedding_program.features",),
          functools.partial(_kmeans_features, of="code")),
    Entry("kmeans_backbone_step", "the k-means predictor's evaluation step (backbone)",
          (_EVAL_STEP,), functools.partial(_kmeans_step, of="backbone")),
    Entry("kmeans_code_step", "the k-means predictor's evaluation step (code)",
          (_EVAL_STEP,), functools.partial(_kmeans_step, of="code")),
    Entry("heldout_terms", "label-free monitoring's losses on held-out images",
          ("depthg_jax.training.loop:heldout_terms",), _heldout_terms),
    Entry("segmenter_forward", "the Python API's (and segment's) batch with flip",
          ("depthg_jax.inference:_forward",), _segmenter_forward),
    Entry("depth_anything", "the depth command's Depth Anything V2 forward (flip TTA)",
          ("depthg_jax.data.depth:_jax_forward",), _depth_anything),
    Entry("portable_inference", "the portable artifact's function (params as arguments here; "
          "the artifact holds them as constants)",
          ("depthg_jax.runtime.portable:inference_program.infer",
           "depthg_jax.runtime.portable:export_inference"), _portable_inference),
)  # fmt: skip
BY_NAME = {e.name: e for e in ENTRIES}


def build(name: str, shapes: Shapes) -> Lowerable:
    """The program `name` of the table with abstract inputs at `shapes`."""
    if name not in BY_NAME:
        raise KeyError(f"no program {name!r} in the table; one of {sorted(BY_NAME)}")
    return BY_NAME[name].build(shapes)


# --------------------------------------------------------------------------------------
# Lowering and its checks
# --------------------------------------------------------------------------------------


def host_callbacks(closed_jaxpr) -> list[str]:
    """Names of the host-callback primitives anywhere in a jaxpr (sub-jaxprs included)."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in HOST_CALLBACKS:
                found.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(closed_jaxpr.jaxpr)
    return found


_CUSTOM_CALL = re.compile(r'custom_call\s*@([\w.$-]+)|call_target_name\s*=\s*"([^"]+)"')


def custom_calls(module_text: str) -> set[str]:
    """The custom-call targets named in a StableHLO module's text."""
    return {a or b for a, b in _CUSTOM_CALL.findall(module_text)}


def lower(lowerable: Lowerable, platform: str, *, allowed=ALLOWED_CUSTOM_CALLS):
    """`jax.export` of the program for one platform, after the checks above; returns the
    `jax.export.Exported`. Raises LoweringError naming the program, the platform and why."""
    where = f"{lowerable.name} for {platform}"
    traced = lowerable.program.trace(*lowerable.args, **lowerable.kwargs)
    callbacks = host_callbacks(traced.jaxpr)
    if callbacks:
        raise LoweringError(
            f"{where}: host callback(s) {sorted(set(callbacks))} in the program; a step must "
            "not call back into Python (it stalls the device and cannot be exported)"
        )
    try:
        exported = jax.export.export(lowerable.program, platforms=[platform])(
            *lowerable.args, **lowerable.kwargs
        )
    except Exception as e:  # noqa: BLE001 - any lowering failure is the finding
        raise LoweringError(f"{where}: {type(e).__name__}: {str(e)[:2000]}") from e
    extra = custom_calls(exported.mlir_module()) - set(allowed)
    if extra:
        raise LoweringError(
            f"{where}: custom call(s) {sorted(extra)} outside the allowed "
            f"{sorted(allowed)}: they tie the program to one platform's kernels"
        )
    return exported
