"""Checks and tree surgery shared by the weight converters of every backbone family."""

from __future__ import annotations

import math

import numpy as np


def num_positions(state: dict[str, np.ndarray]) -> int:
    """Patch positions of a state dict's pos_embed (0 without one); a non-square grid is refused."""
    pos = state.get("pos_embed")
    n = pos.shape[1] - 1 if pos is not None and pos.ndim == 3 else 0
    if pos is not None and math.isqrt(n) ** 2 != n:
        raise ValueError(f"pos_embed has shape {pos.shape}: {n} positions is not a square grid")
    return n


def check_against_shapes(
    state: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], variant: str
) -> None:
    """Raises naming every unknown and missing key, or the first key of another shape."""
    unknown = sorted(set(state) - set(shapes))
    missing = sorted(set(shapes) - set(state))
    if unknown or missing:
        raise ValueError(
            f"state dict does not fit variant {variant!r}: unknown keys {unknown}, "
            f"missing keys {missing}"
        )
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"{key}: expected shape {shape} for variant {variant!r}, got "
                f"{tuple(state[key].shape)}"
            )


def set_in_tree(tree: dict, path: list[str], value: np.ndarray) -> None:
    """tree[path[0]][path[1]]... = value, creating the nested dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def to_flax_params(
    state: dict[str, np.ndarray], *, tokens: tuple[str, ...], consume: bool = False
) -> dict:
    """Official (PyTorch) names -> flax "params": float32, Linear (out, in) -> Dense kernel
    (in, out), patch Conv2d (C, 3, p, p) -> Conv kernel (p, p, 3, C), LayerNorm weight ->
    scale, `blocks.N.` -> `blocks_N/`; biases, LayerScale gammas and `tokens` as they are.

    consume: take each tensor out of `state` as it is converted, so that the source and the
    result never both hold the whole model (a 7B converts in one model's memory plus one
    tensor); `state` is left empty."""
    params: dict = {}
    for key in list(state):
        value = state.pop(key) if consume else state[key]
        value = np.asarray(value).astype(np.float32, copy=not consume)
        if key in tokens:
            set_in_tree(params, [key], value)
            continue
        *module, leaf = key.split(".")
        if module[0] == "blocks":
            module = [f"blocks_{module[1]}", *module[2:]]
        if key == "patch_embed.proj.weight":
            set_in_tree(params, [*module, "kernel"], value.transpose(2, 3, 1, 0))
        elif leaf == "weight" and value.ndim == 2:
            set_in_tree(params, [*module, "kernel"], value.T.copy())
        elif leaf == "weight":  # LayerNorm
            set_in_tree(params, [*module, "scale"], value)
        else:
            set_in_tree(params, [*module, leaf], value)
    return params
