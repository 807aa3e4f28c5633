"""The DepthG objective of one global batch: frozen features, sampled points, the loss terms
and their weights (docs/method.md), and the per-batch schedules (docs/release.md#schedule-timing).

Two values describe it, both resolved once per run:
- `Objective`: what is fixed for the run (mode, sampling, pointwise, negatives, dropout,
  lifting, decay intervals, the S schedule). Frozen and hashable: the step closes over it.
- the hyperparameters `hp` (`hparams`): the per-member settings as float32 scalars (a pytree;
  in a population every leaf gains a member axis), passed to the step as one traced value, so
  a single run and every member of a sweep share one code path and one compile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from depthg_jax import config as config_lib
from depthg_jax.method import losses, sampling, schedules
from depthg_jax.models import head as head_lib
from depthg_jax.models import model as model_lib

MIXED = "mixed"  # a population whose members differ in loss.sampling: hp["fps"] picks


@dataclasses.dataclass(frozen=True)
class Objective:
    """The objective's settings that are fixed for a run (the step closes over them)."""

    mode: str  # "reference" or "corrected" (docs/release.md)
    sampling: str  # "fps", "random", or MIXED (per member, hp["fps"])
    pointwise: bool
    neg_samples: int
    dropout: float  # the third channel-dropout mask, on the correlated features
    fov: float
    far: float
    depth_positive: bool
    depth_decay_every: int
    feature_samples: int
    samples_decay_every: int
    samples_decay_rate: float
    # Whether the supervised linear probe trains: False when the training data has no labels
    # (its loss is then 0 and its computation skipped).
    linear_probe: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, sampling: str | None = None):
        cl = config.loss
        return cls(
            mode=str(config.objective),
            sampling=sampling or str(cl.sampling),
            pointwise=bool(cl.pointwise),
            neg_samples=int(cl.neg_samples),
            dropout=float(config.model.dropout),
            fov=float(cl.fov),
            far=float(cl.far),
            depth_positive=bool(cl.depth_positive),
            depth_decay_every=int(cl.depth_decay_every),
            feature_samples=int(cl.feature_samples),
            samples_decay_every=int(cl.samples_decay_every),
            samples_decay_rate=float(cl.samples_decay_rate),
        )

    def samples_at(self, step: int) -> int:
        """S for the batch at `step` (host side; the step compiles once per distinct S)."""
        return schedules.num_samples_at(
            step,
            self.feature_samples,
            self.samples_decay_every,
            self.samples_decay_rate,
            mode=self.mode,
        )


def hparams(config: ml_collections.ConfigDict) -> dict:
    """The per-member hyperparameters of a config as float32 scalars (a pytree).

    Keys: config.HPARAM_FIELDS (the table's per-member numeric fields, by the name the loss
    and optimiser read them).
    """
    return {
        name: jnp.float32(config_lib.get_field(config, field))
        for name, field in config_lib.HPARAM_FIELDS.items()
    }


def pair_features(
    spec: model_lib.ModelSpec, backbone_params: dict, batch: dict
) -> tuple[jax.Array, jax.Array]:
    """Frozen features of anchors and positives, one backbone pass, float32, no gradient."""
    n = batch["image"].shape[0]
    feats = model_lib.frozen_features(
        spec, backbone_params, jnp.concatenate([batch["image"], batch["image_pos"]])
    )
    return feats[:n], feats[n:]


def sample_coords(
    batch: dict,
    grid_hw: tuple[int, int],
    keys: jax.Array,
    num_side: int,
    objective: Objective,
    hp: dict,
) -> tuple[jax.Array, jax.Array]:
    """(coords1, coords2) of anchors and positives: depth-guided FPS or uniform random.

    MIXED sampling (a population sweeping loss.sampling): both are drawn from the same keys
    and hp["fps"] > 0.5 picks FPS per member; both computations are shared by all members.
    """
    n = batch["depth"].shape[0]
    if objective.sampling == MIXED:
        fps = sample_coords(
            batch, grid_hw, keys, num_side, dataclasses.replace(objective, sampling="fps"), hp
        )
        rnd = sample_coords(
            batch, grid_hw, keys, num_side, dataclasses.replace(objective, sampling="random"), hp
        )
        use_fps = hp["fps"] > 0.5
        return tuple(jnp.where(use_fps, f, r) for f, r in zip(fps, rnd, strict=True))
    if objective.sampling == "fps":
        # Anchors and positives in one batched FPS: one sequential loop instead of two.
        coords = sampling.depth_fps_coords(
            jnp.concatenate([batch["depth"], batch["depth_pos"]]),
            feature_hw=grid_hw,
            num_side=num_side,
            mode=objective.mode,
            fov=objective.fov,
            far=objective.far,
        )
        return coords[:n], coords[n:]
    return (
        sampling.random_coords(keys[0], n, num_side),
        sampling.random_coords(keys[1], n, num_side),
    )


def loss_params(objective: Objective, depth_shift, hp: dict) -> losses.LossParams:
    return losses.LossParams(
        intra_shift=hp["intra_shift"],
        inter_shift=hp["inter_shift"],
        neg_shift=hp["neg_shift"],
        depth_shift=depth_shift,
        pointwise=objective.pointwise,
        depth_mode=objective.mode,
        fov=objective.fov,
        far=objective.far,
        depth_positive=objective.depth_positive,
    )


def depth_schedule_at(step: jax.Array, objective: Objective, hp: dict):
    """(λ_d, b_d) for the batch at `step` (docs/release.md#schedule-timing)."""
    return schedules.depth_schedule(
        step,
        hp["depth_weight"],
        hp["depth_shift"],
        objective.depth_decay_every,
        hp["depth_decay_rate"],
        mode=objective.mode,
    )


def losses_from_features(
    params: dict,
    feats: jax.Array,
    feats_pos: jax.Array,
    batch: dict,
    key: jax.Array,
    step: jax.Array,
    *,
    spec: model_lib.ModelSpec,
    objective: Objective,
    num_side: int,
    hp: dict,
) -> tuple[jax.Array, dict]:
    """Total DepthG loss of one global batch and its parts, given the frozen features."""
    n = feats.shape[0]
    keys = jax.random.split(key, 7)
    with spec.precision():
        code = spec.head.apply(
            {"params": params["head"]}, feats, deterministic=False, rngs={"dropout": keys[0]}
        )
        code_pos = spec.head.apply(
            {"params": params["head"]}, feats_pos, deterministic=False, rngs={"dropout": keys[1]}
        )
    # The third, independent dropout mask acts on the features entering the correlations.
    feats_d = head_lib.channel_dropout(keys[2], feats, objective.dropout)
    feats_pos_d = head_lib.channel_dropout(keys[3], feats_pos, objective.dropout)
    coords1, coords2 = sample_coords(batch, feats.shape[1:3], keys[4:6], num_side, objective, hp)
    perms = sampling.negative_permutations(keys[6], objective.neg_samples, n)
    depth_weight, depth_shift = depth_schedule_at(step, objective, hp)
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
        loss_params(objective, depth_shift, hp),
    )
    probe = probe_losses(spec, params, code, batch["label"], linear=objective.linear_probe)
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


def probe_losses(
    spec: model_lib.ModelSpec, params: dict, code: jax.Array, labels, *, linear: bool = True
) -> dict:
    """Cluster and linear probe losses on the detached code (they never train the head);
    linear=False (no labels to learn from) skips the linear probe: its loss is 0."""
    detached = jax.lax.stop_gradient(code)
    inner = spec.cluster_probe.apply({"params": params["cluster_probe"]}, detached)
    out = {"loss_cluster": losses.cluster_probe_loss(inner)}
    if linear:
        logits = spec.linear_probe.apply({"params": params["linear_probe"]}, detached)
        out["loss_linear"] = losses.linear_probe_loss(logits, labels)
    else:
        out["loss_linear"] = jnp.zeros((), jnp.float32)
    return out
