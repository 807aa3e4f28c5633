"""Import the authors' released DepthG and STEGO checkpoints as depthg-jax exports.

python -m depthg_jax.models.release --checkpoint=FILE.ckpt --out=DIR [--variant=B/8]
    [--dataset=cityscapes27]

The releases are PyTorch Lightning checkpoints of STEGO's ``LitUnsupervisedSegmenter``
(DepthG keeps STEGO's module layout). Their ``state_dict`` holds:

* ``net.model.*``: the DINO ViT (``DinoFeaturizer.model``), official DINO names;
* ``net.cluster1.0``: the linear 1x1 convolution C -> K of the segmentation head;
* ``net.cluster2.0`` and ``net.cluster2.2``: its nonlinear branch, 1x1 convolutions
  C -> C, ReLU, C -> K (``code = cluster1(f) + cluster2(f)``, dropout off at evaluation);
* ``cluster_probe.clusters`` (n_classes + extra_clusters, K): the evaluated cluster probe;
* ``linear_probe.weight/bias``: a 1x1 convolution K -> n_classes;
* training-only parts, listed and skipped: ``decoder``, ``train_cluster_probe``, DepthG's
  ``lhp_module`` (only its training loss uses it) and any loss or metric state.

Any other state_dict entry is an error (for example DepthG's ``dino_depth`` featurizer, whose
depth branch changes the features and has no counterpart here). The variant, code dimension K
and class count come from the shapes and are cross-checked with the hyper-parameters when the
checkpoint has them. The checkpoint is read without torch and without running code (see
``depthg_jax.models.pth``). The export (``checkpoint.save_export``) gains ``source.json``: the
source file, its sha256, the skipped entries and the hyper-parameters. ``evaluate`` and
``segment`` take it like any export.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from depthg_jax import commands
from depthg_jax.models import pth
from depthg_jax.models.convert import convert_state_dict, infer_architecture
from depthg_jax.models.variants import VARIANTS, get_variant

SOURCE_FILE = "source.json"
BACKBONE_PREFIX = "net.model."
# Release key -> (our flax module path, param name); 1x1 convolutions become Dense layers.
HEAD_KEYS: dict[str, tuple[str, str]] = {
    "net.cluster1.0": ("head", "linear"),
    "net.cluster2.0": ("head", "nonlinear_1"),
    "net.cluster2.2": ("head", "nonlinear_2"),
    "linear_probe": ("linear_probe", "linear"),
}
CLUSTERS_KEY = "cluster_probe.clusters"
# state_dict entries that inference does not use: listed in source.json and skipped.
UNUSED_PREFIXES = (
    "decoder.",
    "train_cluster_probe.",
    "lhp_module.",
    "crf_loss_fn.",
    "contrastive_corr_loss_fn.",
    "linear_probe_loss_fn.",
    "cluster_metrics.",
    "linear_metrics.",
    "test_cluster_metrics.",
    "test_linear_metrics.",
)
# The release's dataset names -> ours, with their class counts.
DATASETS = {"cocostuff27": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3"}
DATASET_CLASSES = {"cocostuff27": 27, "cityscapes27": 27, "potsdam3": 3}
# DINO's architecture names (cfg.model_type) -> our variant prefix.
MODEL_TYPES = {"vit_tiny": "Ti", "vit_small": "S", "vit_base": "B"}
# Released backbones are DINO v1: preferred when the shapes fit more than one variant.
DINO_VARIANTS = ("S/8", "S/16", "B/8", "B/16")


class ReleaseError(ValueError):
    """The checkpoint is not a release this importer can convert; the message says why."""


# ----------------------------------------------------------------------------- reading


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Names only a bare ViT backbone's state dict has at its top level (DINO / timm / DINOv2 hub).
BACKBONE_KEYS = frozenset({"cls_token", "pos_embed", "patch_embed.proj.weight"})


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint as a dict of numpy arrays and plain data (restricted unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = pth.load_pth(path, lightning=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        if isinstance(ckpt, dict) and BACKBONE_KEYS & set(map(str, ckpt)):
            raise ReleaseError(
                f"{path} holds backbone weights ({len(ckpt)} tensors such as "
                f"{sorted(BACKBONE_KEYS & set(map(str, ckpt)))[0]!r}), not a trained DepthG/STEGO "
                f"model: convert it with `python -m depthg_jax.models.convert --variant=VARIANT "
                f"--weights={path} --out=DIR` (VARIANT: S/8, B/8, ... as the file's) and pass "
                "DIR as --config.model.weights"
            )
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        if isinstance(keys, list) and len(keys) > 8:
            keys = keys[:8] + [f"... {len(keys) - 8} more"]
        raise ReleaseError(
            f"{path}: not a Lightning checkpoint (no 'state_dict' entry; found {keys})"
        )
    try:  # Converted here, once and bounded, so every later use holds plain, finite data.
        ckpt["hyper_parameters"] = pth.to_plain(ckpt.get("hyper_parameters") or {})
    except pth.GraphError as e:
        raise ReleaseError(
            f"{path}: its hyper_parameters {e}, which no Lightning checkpoint does; refusing it"
        ) from None
    return ckpt


def hyper_parameters(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyper-parameters as plain data ({} when it has none)."""
    plain = pth.to_plain(ckpt.get("hyper_parameters") or {})
    return plain if isinstance(plain, dict) else {}


def _hparam(hparams: dict[str, Any], name: str) -> Any:
    """A hyper-parameter from the top level, ``cfg`` or ``cfg.train`` (newer STEGO)."""
    cfg = hparams.get("cfg") if isinstance(hparams.get("cfg"), dict) else {}
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    for scope in (hparams, cfg, train):
        if name in scope:
            return scope[name]
    return None


def split_state_dict(
    state: dict[str, Any],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[int]]]:
    """state_dict -> (backbone with DINO names, head/probe arrays by release key, skipped).

    Raises ReleaseError listing every entry that is neither used nor known to be unused.
    """
    backbone: dict[str, np.ndarray] = {}
    parts: dict[str, np.ndarray] = {}
    skipped: dict[str, list[int]] = {}
    unknown: list[str] = []
    used = {f"{k}.{leaf}" for k in HEAD_KEYS for leaf in ("weight", "bias")} | {CLUSTERS_KEY}
    for key, value in state.items():
        key = str(key)
        if key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX) :]] = np.asarray(value)
        elif key in used:
            parts[key] = np.asarray(value)
        elif key.startswith(UNUSED_PREFIXES):
            skipped[key] = list(np.shape(value))
        else:
            unknown.append(key)
    if unknown:
        raise ReleaseError(
            f"state_dict has entries this importer does not know: {sorted(unknown)} (known: "
            f"{BACKBONE_PREFIX}*, {sorted(used)}, unused {list(UNUSED_PREFIXES)}); it is not a "
            "DepthG/STEGO release with the DINO featurizer"
        )
    missing = sorted(used - set(parts))
    if missing or not backbone:
        raise ReleaseError(
            f"state_dict lacks {missing + ([BACKBONE_PREFIX + '*'] if not backbone else [])}"
            " (a release with projection_type 'nonlinear' has them all)"
        )
    return backbone, parts, skipped


# ----------------------------------------------------------------------------- checks


def choose_variant(
    backbone: dict[str, np.ndarray], hparams: dict[str, Any], variant: str | None = None
) -> str:
    """The ViT variant: --variant, else what the shapes and hyper-parameters agree on."""
    arch = infer_architecture(backbone)
    fits = [
        name
        for name, spec in VARIANTS.items()
        if (spec.patch, spec.dim, spec.depth)
        == (arch.get("patch"), arch.get("dim"), arch.get("depth"))
    ]
    model_type, patch = _hparam(hparams, "model_type"), _hparam(hparams, "dino_patch_size")
    named = None
    if model_type in MODEL_TYPES and patch is not None:
        named = f"{MODEL_TYPES[model_type]}/{patch}"
        if named not in fits:
            raise ReleaseError(
                f"hyper-parameters name model_type={model_type!r}, dino_patch_size={patch} "
                f"(variant {named}), but the backbone weights have patch {arch.get('patch')}, "
                f"width {arch.get('dim')}, {arch.get('depth')} blocks (variants {fits})"
            )
    elif patch is not None and arch.get("patch") != patch:
        raise ReleaseError(
            f"hyper-parameters say dino_patch_size={patch}, but net.model.patch_embed has "
            f"patch {arch.get('patch')}"
        )
    if variant is not None:
        get_variant(variant)  # unknown names fail here; convert_state_dict checks the fit
        if named is not None and variant != named:
            raise ReleaseError(
                f"--variant={variant} disagrees with the hyper-parameters (variant {named})"
            )
        return variant
    if named is not None:
        return named
    preferred = [v for v in DINO_VARIANTS if v in fits]
    if len(fits) == 1 or preferred:
        return preferred[0] if preferred else fits[0]
    raise ReleaseError(
        f"the backbone (patch {arch.get('patch')}, width {arch.get('dim')}, "
        f"{arch.get('depth')} blocks) fits variants {fits}; pass --variant"
        if fits
        else f"the backbone (patch {arch.get('patch')}, width {arch.get('dim')}, "
        f"{arch.get('depth')} blocks) fits none of the variants {sorted(VARIANTS)}"
    )


def check_shapes(parts: dict[str, np.ndarray], width: int) -> tuple[int, int]:
    """Checks head and probe shapes against each other; returns (code dim K, n_classes)."""
    ref_k, ref_n = "net.cluster1.0.weight", "linear_probe.weight"
    k, n = int(parts[ref_k].shape[0]), int(parts[ref_n].shape[0])
    expected = {
        "net.cluster1.0.weight": (k, width, 1, 1),
        "net.cluster1.0.bias": (k,),
        "net.cluster2.0.weight": (width, width, 1, 1),
        "net.cluster2.0.bias": (width,),
        "net.cluster2.2.weight": (k, width, 1, 1),
        "net.cluster2.2.bias": (k,),
        "linear_probe.weight": (n, k, 1, 1),
        "linear_probe.bias": (n,),
        CLUSTERS_KEY: (n, k),
    }
    basis = (
        f"backbone width {width}; code dim {k} from {ref_k} {tuple(parts[ref_k].shape)}; "
        f"{n} classes from {ref_n} {tuple(parts[ref_n].shape)}"
    )
    for key, want in expected.items():
        got = tuple(parts[key].shape)
        if got == want:
            continue
        if key == CLUSTERS_KEY and len(got) == 2 and got[1] == k and got[0] > n:
            raise ReleaseError(
                f"{key} has shape {got}: {got[0] - n} extra cluster(s) beyond the {n} classes "
                f"of {ref_n} {tuple(parts[ref_n].shape)}; checkpoints trained with "
                "extra_clusters > 0 are not supported (the export has one probe size)"
            )
        raise ReleaseError(f"{key} has shape {got}, expected {want} ({basis})")
    return k, n


def check_hparams(hparams: dict[str, Any], k: int, n: int) -> None:
    """Hyper-parameters that contradict the weights, or name a forward we do not have."""
    bad = []
    for name, want in (("n_classes", n), ("dim", k)):
        got = _hparam(hparams, name)
        if (
            got is not None
            and got != want
            and not (name == "dim" and _hparam(hparams, "continuous") is False)
        ):
            bad.append(f"{name}={got!r} but the weights say {want}")
    for name, allowed in (
        ("arch", ("dino",)),
        ("projection_type", ("nonlinear",)),
        ("dino_feat_type", ("feat",)),
    ):
        got = _hparam(hparams, name)
        if got is not None and got not in allowed:
            bad.append(f"{name}={got!r} (only {list(allowed)} can be imported)")
    if bad:
        raise ReleaseError("the checkpoint's hyper-parameters do not fit: " + "; ".join(bad))


def choose_dataset(hparams: dict[str, Any], n: int, dataset: str | None = None) -> str:
    """Our dataset name: --dataset, else from cfg.dataset_name ("directory" if unknown)."""
    if dataset is None:
        released = _hparam(hparams, "dataset_name")
        released = released if isinstance(released, str) else ""
        dataset = next(
            (ours for theirs, ours in DATASETS.items() if released.startswith(theirs)),
            "directory",
        )
    want = DATASET_CLASSES.get(dataset)
    if want is not None and want != n:
        raise ReleaseError(f"dataset {dataset!r} has {want} classes, the probes have {n}")
    return dataset


# ----------------------------------------------------------------------------- conversion


def _conv1x1(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """A (out, in, 1, 1) Conv2d -> Dense params {kernel (in, out), bias (out,)}, float32."""
    return {
        "kernel": np.ascontiguousarray(weight[:, :, 0, 0].T, np.float32),
        "bias": np.asarray(bias, np.float32),
    }


def convert_release(
    ckpt: dict[str, Any], *, variant: str | None = None, dataset: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A read checkpoint -> (export params, facts: variant, dim, n_classes, dataset, skipped)."""
    hparams = hyper_parameters(ckpt)
    backbone, parts, skipped = split_state_dict(ckpt["state_dict"])
    variant = choose_variant(backbone, hparams, variant)
    try:  # first: a wrong --variant is best explained by the backbone's own shapes
        backbone_params = convert_state_dict(backbone, variant)
    except ValueError as e:
        raise ReleaseError(f"backbone ({BACKBONE_PREFIX}*): {e}") from e
    k, n = check_shapes(parts, get_variant(variant).dim)
    check_hparams(hparams, k, n)
    dataset = choose_dataset(hparams, n, dataset)
    params: dict[str, Any] = {
        "backbone": backbone_params,
        "head": {},
        "cluster_probe": {"clusters": np.asarray(parts[CLUSTERS_KEY], np.float32)},
        "linear_probe": {},
    }
    for key, (group, module) in HEAD_KEYS.items():
        params[group][module] = _conv1x1(parts[f"{key}.weight"], parts[f"{key}.bias"])
    facts = {
        "variant": variant,
        "dim": k,
        "n_classes": n,
        "dataset": dataset,
        "skipped_state_dict": skipped,
        "skipped_entries": sorted(str(key) for key in ckpt if key != "state_dict"),
        "hyper_parameters": _json_safe(hparams),
        "layout": "depthg" if _is_depthg(hparams, skipped) else "stego",
    }
    for key in ("epoch", "global_step", "pytorch-lightning_version"):
        if isinstance(ckpt.get(key), (int, str)):
            facts[key.replace("-", "_")] = ckpt[key]
    return params, facts


def _is_depthg(hparams: dict[str, Any], skipped: dict[str, list[int]]) -> bool:
    """DepthG's config adds depth fields to STEGO's; its LHP module only exists there."""
    depth_fields = ("use_depth", "depth_feat_weight", "depth_sampling")
    return any(k.startswith("lhp_module.") for k in skipped) or any(
        _hparam(hparams, name) is not None for name in depth_fields
    )


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 16 else {"array_shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def export_config(variant: str, dim: int, n_classes: int, dataset: str):
    """The base training config with the imported model's variant, dim, classes, dataset."""
    from depthg_jax.config import get_config

    config = get_config()
    config.model.variant = variant
    config.model.dim = dim
    config.model.weights = ""  # the export carries its backbone
    config.data.n_classes = n_classes
    config.data.name = dataset
    return config


def import_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    variant: str | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Converts a released Lightning checkpoint into an export at `out`; returns source.json."""
    from depthg_jax.models import model as model_lib
    from depthg_jax.runtime import checkpoint as export_io

    checkpoint, out = Path(checkpoint).absolute(), Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"output {out} already exists; choose a new --out directory")
    ckpt = read_checkpoint(checkpoint)
    params, facts = convert_release(ckpt, variant=variant, dataset=dataset)
    spec = model_lib.ModelSpec(
        variant=facts["variant"], dim=facts["dim"], n_classes=facts["n_classes"]
    )
    model_lib.check_params(params, spec, where=str(checkpoint))
    source = {
        "source": str(checkpoint),
        "source_name": checkpoint.name,
        "sha256": file_sha256(checkpoint),
        "size_bytes": checkpoint.stat().st_size,
        **facts,
    }
    config = export_config(facts["variant"], facts["dim"], facts["n_classes"], facts["dataset"])
    export_io.save_export(str(out), config, params, extra_files={SOURCE_FILE: source})
    return source


def read_source(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The source.json of an imported export."""
    with open(Path(export_dir) / SOURCE_FILE) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
    """Command-line flags, defined only when run as a program."""
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "A released DepthG/STEGO Lightning .ckpt file.")
    flags.DEFINE_string("out", None, "Export directory to create (must not exist).")
    flags.DEFINE_string("variant", None, "ViT variant (default: read from the weights).")
    flags.DEFINE_string(
        "dataset",
        None,
        "Our dataset name (cocostuff27, cityscapes27, potsdam3, directory); default: from "
        "the checkpoint's cfg.dataset_name.",
    )
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    flag_values = flags.FLAGS
    try:
        source = import_checkpoint(
            flag_values.checkpoint,
            flag_values.out,
            variant=flag_values.variant,
            dataset=flag_values.dataset,
        )
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"imported {source['source_name']} (sha256 {source['sha256'][:12]}..., "
        f"{source['layout']} layout): {source['variant']} backbone, code dim {source['dim']}, "
        f"{source['n_classes']} classes, dataset {source['dataset']}"
    )
    skipped = source["skipped_state_dict"]
    print(
        f"skipped {len(skipped)} unused state_dict entries "
        f"({sorted({k.split('.')[0] for k in skipped})}) and {source['skipped_entries']}"
    )
    print(f"wrote {flag_values.out} (evaluate / segment take it with --checkpoint)")


if __name__ == "__main__":
    define_flags()
    commands.run_main(main)
