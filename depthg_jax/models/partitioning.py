"""How the frozen backbone's parameters split over the mesh's 'model' axis: one rules table.

`RULES` maps parameter-name patterns of the ViT (every family: DINO, DINOv2, DINOv3; names as
in models/vit.py) to the axis that splits over 'model', in the tensor-parallel layout:

* the projections that widen a token (attention ``qkv``; the feed-forward ``fc1``, and
  SwiGLU's ``w1``, ``w2`` or fused ``w12``) split by output columns, bias with them;
* the projections that narrow it back (attention ``proj``; ``fc2``; SwiGLU's ``w3``) split by
  input rows;
* everything else (the patch embedding's output channels, CLS/register/mask tokens, learned
  positions, LayerNorms, LayerScales, the narrowing projections' biases) splits along its
  channel axis, so that a device holds 1 / M of every parameter.

A parameter whose axis does not divide by M stays whole on every device (and is named by
`replicated_leaves`). Heads, probes and optimiser state are never split: they are small, and
the trainer keeps them replicated. The compiler (XLA's SPMD partitioner) derives the
communication from this layout; docs/pods.md says why this layout rather than FSDP.

Placement lives here too: `place_backbone` (a host or device tree onto its shardings, cast to
the configured dtype), `place_params` (a whole model's params: the backbone by the rules, the
rest replicated) and `load_backbone` (a converted Orbax backbone restored straight into its
shardings, each host reading only the shards its devices hold).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from depthg_jax.runtime import sharding

# (pattern on the "/"-joined parameter path, axis split over 'model', why). First match wins.
RULES: tuple[tuple[str, int, str], ...] = (
    (r"(^|/)attn/qkv/(kernel|bias)$", -1, "column-parallel: output features"),
    (r"(^|/)mlp/(fc1|w1|w2|w12)/(kernel|bias)$", -1, "column-parallel: output features"),
    (r"(^|/)attn/proj/kernel$", 0, "row-parallel: input features"),
    (r"(^|/)mlp/(fc2|w3)/kernel$", 0, "row-parallel: input features"),
    (r".*", -1, "channels"),
)
_COMPILED = tuple((re.compile(pattern), axis, why) for pattern, axis, why in RULES)
PARAM_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def path_name(path) -> str:
    """ "blocks_0/attn/qkv/kernel" from a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def rule_for(name: str) -> tuple[int, str]:
    """(axis, why) of the first rule matching a parameter path."""
    for pattern, axis, why in _COMPILED:
        if pattern.search(name):
            return axis, why
    raise AssertionError("the last rule matches every name")


def spec_for(name: str, shape: tuple[int, ...], model: int) -> P:
    """The PartitionSpec of one backbone parameter on a 'model' axis of size `model`."""
    if model == 1 or not shape:
        return P()
    axis = rule_for(name)[0] % len(shape)
    if shape[axis] % model:
        return P()
    return P(*[sharding.MODEL_AXIS if i == axis else None for i in range(len(shape))])


def backbone_specs(tree, model: int):
    """A tree of PartitionSpecs for a backbone tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(path_name(path), tuple(x.shape), model), tree
    )


def backbone_shardings(mesh, tree):
    """A tree of NamedShardings placing a backbone tree on `mesh` by the rules."""
    model = sharding.model_size(mesh)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), backbone_specs(tree, model))


def replicated_leaves(tree, model: int) -> list[str]:
    """The parameters that stay whole on every device at this 'model' size (axis not
    divisible)."""
    out = []

    def visit(path, x):
        if model > 1 and spec_for(path_name(path), tuple(x.shape), model) == P() and x.shape:
            out.append(path_name(path))

    jax.tree_util.tree_map_with_path(visit, tree)
    return out


def param_dtype(name: str):
    """jnp dtype of config.model.backbone_param_dtype."""
    if name not in PARAM_DTYPES:
        raise ValueError(
            f"config.model.backbone_param_dtype={name!r}; expected one of {tuple(PARAM_DTYPES)}"
        )
    return PARAM_DTYPES[name]


def place_backbone(params, mesh, dtype: str | None = None):
    """Backbone params (host or device) on `mesh` by the rules, cast to `dtype` if given."""
    shardings = backbone_shardings(mesh, params)
    return sharding.place(params, shardings, None if dtype is None else param_dtype(dtype))


def is_backbone(tree) -> bool:
    return isinstance(tree, dict) and "patch_embed" in tree and "cls_token" in tree


def place_params(params, mesh):
    """Model params on `mesh`: a whole model's {"backbone", ...} or a bare backbone tree by
    the rules, everything else replicated; leaves already where they belong stay put."""
    replicated = sharding.replicated(mesh)
    if is_backbone(params):
        return place_backbone(params, mesh)
    if isinstance(params, dict) and "backbone" in params:
        rest = {k: v for k, v in params.items() if k != "backbone"}
        rest = sharding.place(rest, jax.tree.map(lambda _: replicated, rest))
        return {"backbone": place_backbone(params["backbone"], mesh), **rest}
    return sharding.place(params, jax.tree.map(lambda _: replicated, params))


def abstract_backbone(shapes, mesh, dtype: str = "float32"):
    """ShapeDtypeStructs (with their shardings) of a backbone whose leaves have `shapes`."""
    shardings = backbone_shardings(mesh, shapes)
    jdtype = param_dtype(dtype)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(tuple(x.shape), jdtype, sharding=s), shapes, shardings
    )


def init_shapes(variant: str):
    """The backbone tree's shapes as a random init makes them (no allocation)."""
    from depthg_jax.models import model as model_lib

    spec = model_lib.ModelSpec(variant=variant, dim=1, n_classes=1)
    dummy = jax.ShapeDtypeStruct((1, 2 * spec.patch, 2 * spec.patch, 3), jnp.float32)
    return jax.eval_shape(spec.backbone.init, jax.random.key(0), dummy)["params"]


def load_backbone(model_cfg, key: jax.Array, mesh, variant: str | None = None):
    """The configured backbone placed on `mesh` in config.model.backbone_param_dtype.

    A converted (Orbax) backbone restores straight into its shardings and dtype: each host
    reads only the shards its devices hold, and no host holds the whole tree. A weight file
    or a random init is made on the host and placed (`place_backbone`).
    """
    from pathlib import Path

    from depthg_jax.models import convert
    from depthg_jax.models import model as model_lib

    dtype = str(model_cfg.get("backbone_param_dtype", "float32"))
    variant = variant or model_cfg.variant
    weights = model_cfg.weights
    if weights and variant == model_cfg.variant and convert.is_converted(Path(weights)):
        model_lib.check_backbone_weights(model_cfg)
        return convert.load_backbone(
            weights, variant, target=lambda shapes: abstract_backbone(shapes, mesh, dtype)
        )
    params = model_lib.init_backbone(model_cfg, key, variant)
    return place_backbone(params, mesh, dtype)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a placed (or abstract) backbone: the largest over devices."""
    return max(_device_bytes(tree).values(), default=0)


def _device_bytes(tree) -> dict:
    totals: dict = {}
    for x in jax.tree.leaves(tree):
        for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
            shape = [len(range(*s.indices(n))) for s, n in zip(index, x.shape, strict=True)]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
            totals[device] = totals.get(device, 0) + nbytes
    return totals


def total_bytes(tree) -> int:
    """Bytes of a whole (unsplit) tree."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))  # fmt: skip
