"""The portable inference artifact: a trained model's whole inference function serialised with
`jax.export`, runnable anywhere JAX runs with only `jax`, `numpy` and `flatbuffers` installed
(no depthg_jax), on CPU, NVIDIA GPUs and TPUs from one file.

A folder holds:
  model.jax       `jax.export.Exported.serialize()` of `infer(images)`, lowered for cpu, cuda
                  and tpu together (the backbone, head and probe weights are constants in it)
  portable.json   the sidecar: input and outputs, resolution, flip, class names, palette,
                  the model, the source export's checksum and a digest of the weights baked in
  MANIFEST.json   sizes and SHA-256 of both (runtime/integrity.py), written last

`infer` takes uint8 RGB images (B, R, R, 3), B any size (a symbolic dimension), R the fixed
evaluation resolution, and returns {"cluster": int32 (B, R, R) cluster ids, "linear": int32
(B, R, R) class ids, "code": float32 (B, R/p, R/p, K) the head's code}: exactly
`models.model.predict` followed by the argmax that `segment` takes, with the flip average
baked in or left out when the artifact is written. Cluster ids are not classes (Hungarian
matching against labels maps them, `evaluate`'s results.json); linear ids are.

Written by `python -m depthg_jax.export --format=portable` (training/exports.py gathers the
config's classes, palette and source); README, section "Portable inference" shows the lines
that load it without this package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from depthg_jax.models import model as model_lib
from depthg_jax.runtime import files, integrity

FORMAT = "depthg-jax-portable"
VERSION = 1
MODEL_FILE = "model.jax"
SIDECAR = "portable.json"
PLATFORMS = ("cpu", "cuda", "tpu")
BATCH_DIM = "batch"
# Attention paths of the backbone (models/vit.py) whose lowering is plain HLO on every platform;
# the backbone picks its path for the host it is traced on.


def inference_program(spec: model_lib.ModelSpec, *, flip: bool):
    """The jitted `infer(params, images)` of the artifact (see the module docstring); the
    artifact closes it over the params, which become constants of the exported program.

    A plain `jax.jit`: `jax.export` takes one, and the artifact is compiled by whoever runs it.
    """

    @jax.jit
    def infer(params: dict, images: jax.Array) -> dict:
        out = model_lib.predict(params, images, spec, flip)
        return {
            "cluster": jnp.argmax(out["cluster_log_probs"], axis=-1).astype(jnp.int32),
            "linear": jnp.argmax(out["linear_logits"], axis=-1).astype(jnp.int32),
            "code": out["code"],
        }

    return infer


def abstract_images(res: int) -> jax.ShapeDtypeStruct:
    """uint8 (batch, res, res, 3) with a symbolic batch size."""
    (batch,) = jax.export.symbolic_shape(BATCH_DIM)
    return jax.ShapeDtypeStruct((batch, res, res, 3), jnp.uint8)


def check_resolution(spec: model_lib.ModelSpec, res: int) -> None:
    if res <= 0 or res % spec.patch:
        raise ValueError(
            f"resolution {res} must be a positive multiple of the patch size {spec.patch} of "
            f"{spec.variant}"
        )


def portable_spec(spec: model_lib.ModelSpec) -> model_lib.ModelSpec:
    """The spec the artifact is traced with: XLA's dot_product_attention, which lowers for
    every platform and is what TPUs (and GPUs without cuDNN flash) run, whatever this host
    would pick for itself (cuDNN's on a CUDA host, the einsum path on a CPU); the same numbers
    to ~1e-6 in float32."""
    return dataclasses.replace(spec, attention="xla")


def export_inference(
    spec: model_lib.ModelSpec,
    params: dict,
    *,
    res: int,
    flip: bool,
    platforms: tuple[str, ...] = PLATFORMS,
) -> jax.export.Exported:
    """`infer` lowered for `platforms` at resolution `res` (nothing runs, nothing compiles)."""
    check_resolution(spec, res)
    model_lib.check_params(params, spec)
    spec = portable_spec(spec)
    infer = inference_program(spec, flip=flip)
    params = jax.device_get(params)
    program = jax.jit(lambda images: infer(params, images))
    return jax.export.export(program, platforms=list(platforms))(abstract_images(res))


def params_digest(params: dict) -> str:
    """SHA-256 over every leaf of `params` (its path, dtype, shape and bytes, in path order):
    the same weights give the same digest whichever export or checkpoint they came from."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_portable(
    out: str,
    spec: model_lib.ModelSpec,
    params: dict,
    *,
    res: int,
    flip: bool,
    classes: list[str],
    palette: np.ndarray,
    source: dict,
    platforms: tuple[str, ...] = PLATFORMS,
) -> dict:
    """Writes the artifact folder `out` (must not exist) atomically; returns its sidecar.

    classes, palette: names and (n, 3) uint8 colours of the n classes; source: where the
    weights came from (recorded as is, e.g. the source export's manifest checksum).
    """
    if len(classes) != spec.n_classes or np.shape(palette) != (spec.n_classes, 3):
        raise ValueError(
            f"{len(classes)} class names and a palette of shape {np.shape(palette)} for a model "
            f"of {spec.n_classes} classes"
        )
    exported = export_inference(spec, params, res=res, flip=flip, platforms=platforms)
    grid = res // spec.patch
    sidecar = {
        "format": FORMAT,
        "version": VERSION,
        "model_file": MODEL_FILE,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "resolution": res,
        "flip": bool(flip),
        "input": {
            "images": {
                "dtype": "uint8",
                "shape": [BATCH_DIM, res, res, 3],
                "meaning": f"RGB images resized to {res} x {res}",
            },
        },  # fmt: skip
        "outputs": {
            "cluster": {
                "dtype": "int32",
                "shape": [BATCH_DIM, res, res],
                "meaning": "cluster id per pixel (not a class: match clusters to "
                "classes on labelled images, as evaluate does)",
            },
            "linear": {
                "dtype": "int32",
                "shape": [BATCH_DIM, res, res],
                "meaning": "class id per pixel (the linear probe)",
            },
            "code": {
                "dtype": "float32",
                "shape": [BATCH_DIM, grid, grid, spec.dim],
                "meaning": "the head's code on the feature grid"
                + (", averaged with the flipped image's" if flip else ""),
            },
        },  # fmt: skip
        "classes": list(classes),
        "palette": np.asarray(palette, np.uint8).tolist(),
        "model": {
            "variant": spec.variant,
            "dim": spec.dim,
            "n_classes": spec.n_classes,
            "dtype": spec.dtype,
            "matmul_precision": spec.matmul_precision,
            "attention": portable_spec(spec).backbone.resolved_attention(),
        },
        "params_sha256": params_digest(params),
        "source": source,
    }
    with files.atomic_directory(out, prefix=f".export-{os.getpid()}-") as tmp:
        with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
            f.write(exported.serialize())
        with open(os.path.join(tmp, SIDECAR), "w") as f:
            json.dump(sidecar, f, indent=1)
        integrity.write_manifest(tmp)  # last: an artifact with a manifest is complete
    return sidecar


def is_portable(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SIDECAR))


def verify_portable(path: str) -> dict:
    """Checks an artifact's files against its manifest (IntegrityError naming the file) and
    its sidecar's format; returns the sidecar."""
    path = os.path.abspath(path)
    not_portable = FileNotFoundError(
        f"{path} is not a portable artifact (no {SIDECAR}); write one with "
        "`python -m depthg_jax.export --format=portable`"
    )
    if not integrity.has_manifest(path) and not is_portable(path):
        raise not_portable
    integrity.verify_manifest(path)  # names a damaged or missing file, or a missing manifest
    if not is_portable(path):
        raise not_portable
    with open(os.path.join(path, SIDECAR)) as f:
        sidecar = json.load(f)
    if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
        raise ValueError(
            f"{os.path.join(path, SIDECAR)}: format {sidecar.get('format')!r} version "
            f"{sidecar.get('version')!r}; this package reads {FORMAT!r} version {VERSION}"
        )
    return sidecar


def load_portable(path: str) -> tuple[jax.export.Exported, dict]:
    """(the deserialised `infer`, its sidecar), verified first. `.call(images)` runs it."""
    sidecar = verify_portable(path)
    with open(os.path.join(os.path.abspath(path), sidecar["model_file"]), "rb") as f:
        return jax.export.deserialize(bytearray(f.read())), sidecar
