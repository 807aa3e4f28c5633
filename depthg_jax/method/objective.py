"""The DepthG objective of one global batch: frozen features, sampled points, the loss terms
and their weights (docs/method.md), and the per-batch schedules (docs/release.md#schedules).

Pure functions of params, batch and keys; per-member hyperparameters come in as a float32
pytree (`hparams`) so a single run and every member of a sweep share one code path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from depthg_jax import config as config_lib
from depthg_jax.method import losses, sampling, schedules
from depthg_jax.method.image_ops import normalize_images
from depthg_jax.models import head as head_lib
from depthg_jax.models import model as model_lib


def hparams(config: ml_collections.ConfigDict) -> dict:
    """The per-member hyperparameters of a config as float32 scalars (a pytree).

    The loss and the optimiser read these rather than the config's Python floats, so a single
    run and each member of a population (depthg_jax.training.population, where every leaf gains a
    member axis) share one code path. Keys: config_lib.HPARAM_FIELDS.
    """
    out = {}
    for name, field in config_lib.HPARAM_FIELDS.items():
        section, leaf = field.split(".")
        out[name] = jnp.float32(config[section][leaf])
    return out


def backbone_features(
    backbone_params: dict, batch: dict, *, model: model_lib.Model
) -> tuple[jax.Array, jax.Array]:
    """Frozen features of anchors and positives, one backbone pass, float32, no gradient."""
    n = batch["image"].shape[0]
    images = normalize_images(jnp.concatenate([batch["image"], batch["image_pos"]]))
    with model.precision():
        feats = model.backbone.apply({"params": backbone_params}, images)
    feats = jax.lax.stop_gradient(feats.astype(jnp.float32))
    return feats[:n], feats[n:]


def sample_coords(
    batch: dict, grid_hw: tuple[int, int], keys: jax.Array, num_side: int, *, config, hp=None
) -> tuple[jax.Array, jax.Array]:
    """(coords1, coords2) of anchors and positives: depth-guided FPS or uniform random.

    With hp["fps"] (a population sweeping loss.sampling), both are drawn from the same keys
    and hp["fps"] > 0.5 picks FPS per member: both computations are shared by all members.
    """
    cl = config.loss
    n = batch["depth"].shape[0]
    if hp is not None and "fps" in hp:
        fps = sample_coords(batch, grid_hw, keys, num_side, config=_with_sampling(config, "fps"))
        rnd = sample_coords(
            batch, grid_hw, keys, num_side, config=_with_sampling(config, "random")
        )
        use_fps = hp["fps"] > 0.5
        return tuple(jnp.where(use_fps, f, r) for f, r in zip(fps, rnd, strict=True))
    if cl.sampling == "fps":
        # Anchors and positives in one batched FPS: one sequential loop instead of two.
        coords = sampling.depth_fps_coords(
            jnp.concatenate([batch["depth"], batch["depth_pos"]]),
            feature_hw=grid_hw,
            num_side=num_side,
            mode=config.objective,
            fov=cl.fov,
            far=cl.far,
        )
        return coords[:n], coords[n:]
    return (
        sampling.random_coords(keys[0], n, num_side),
        sampling.random_coords(keys[1], n, num_side),
    )


def _with_sampling(config: ml_collections.ConfigDict, sampling: str):
    out = ml_collections.ConfigDict(config.to_dict())
    out.loss.sampling = sampling
    return out


def loss_params(
    config: ml_collections.ConfigDict, depth_shift, hp: dict | None = None
) -> losses.LossParams:
    hp = hparams(config) if hp is None else hp
    return losses.LossParams(
        intra_shift=hp["intra_shift"],
        inter_shift=hp["inter_shift"],
        neg_shift=hp["neg_shift"],
        depth_shift=depth_shift,
        pointwise=config.loss.pointwise,
        depth_mode=config.objective,
        fov=config.loss.fov,
        far=config.loss.far,
        depth_positive=config.loss.depth_positive,
    )


def depth_schedule_at(step: jax.Array, config: ml_collections.ConfigDict, hp=None):
    """(λ_d, b_d) for the batch at `step` (docs/release.md#schedules)."""
    cl = config.loss
    hp = hparams(config) if hp is None else hp
    return schedules.depth_schedule(
        step,
        hp["depth_weight"],
        hp["depth_shift"],
        cl.depth_decay_every,
        hp["depth_decay_rate"],
        mode=config.objective,
    )


def losses_from_features(
    params: dict,
    feats: jax.Array,
    feats_pos: jax.Array,
    batch: dict,
    key: jax.Array,
    step: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    model: model_lib.Model,
    num_side: int,
    hp: dict | None = None,
) -> tuple[jax.Array, dict]:
    """Total DepthG loss of one global batch and its parts, given the frozen features.

    `hp`: the per-member hyperparameters (`hparams`; default: the config's own).
    """
    cl = config.loss
    hp = hparams(config) if hp is None else hp
    n = feats.shape[0]
    keys = jax.random.split(key, 7)
    with model.precision():
        code = model.head.apply(
            {"params": params["head"]}, feats, deterministic=False, rngs={"dropout": keys[0]}
        )
        code_pos = model.head.apply(
            {"params": params["head"]}, feats_pos, deterministic=False, rngs={"dropout": keys[1]}
        )
    # The third, independent dropout mask acts on the features entering the correlations.
    feats_d = head_lib.channel_dropout(keys[2], feats, config.model.dropout)
    feats_pos_d = head_lib.channel_dropout(keys[3], feats_pos, config.model.dropout)
    coords1, coords2 = sample_coords(
        batch, feats.shape[1:3], keys[4:6], num_side, config=config, hp=hp
    )
    perms = sampling.negative_permutations(keys[6], cl.neg_samples, n)
    depth_weight, depth_shift = depth_schedule_at(step, config, hp)
    terms = losses.loss_terms(
        feats_d,
        feats_pos_d,
        code,
        code_pos,
        batch["depth"],
        batch["depth_pos"],
        coords1,
        coords2,
        perms,
        loss_params(config, depth_shift, hp),
    )
    probe = probe_losses(params, code, batch["label"], model=model)
    total = (
        hp["intra_weight"] * terms["intra"]
        + hp["inter_weight"] * terms["inter"]
        + hp["neg_weight"] * terms["neg"]
        + depth_weight * terms["depth"]
        + probe["loss_linear"]
        + probe["loss_cluster"]
    )
    metrics = {
        "loss": total,
        "loss_intra": terms["intra"],
        "loss_inter": terms["inter"],
        "loss_neg": terms["neg"],
        "loss_depth": terms["depth"],
        **probe,
        "depth_weight": depth_weight,
        "depth_shift": depth_shift,
    }
    return total, metrics


def probe_losses(params: dict, code: jax.Array, labels: jax.Array, *, model) -> dict:
    """Cluster and linear probe losses on the detached code (they never train the head)."""
    detached = jax.lax.stop_gradient(code)
    inner = model.cluster_probe.apply({"params": params["cluster_probe"]}, detached)
    logits = model.linear_probe.apply({"params": params["linear_probe"]}, detached)
    return {
        "loss_cluster": losses.cluster_probe_loss(inner),
        "loss_linear": losses.linear_probe_loss(logits, labels),
    }


def samples_at(config: ml_collections.ConfigDict, step: int) -> int:
    """S for the batch at `step` (host side; the step is recompiled once per distinct S)."""
    return schedules.num_samples_at(
        step,
        config.loss.feature_samples,
        config.loss.samples_decay_every,
        config.loss.samples_decay_rate,
        mode=config.objective,
    )
