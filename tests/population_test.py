"""Sweep mode's population step: member i trains exactly as a single run with its settings."""

import jax
import numpy as np
import pytest
from support import make_program, random_batch, setup, setup_population, tiny_config

from depthg_jax.runtime import sharding
from depthg_jax.training import step as step_lib
from depthg_jax.training import sweep

pytestmark = pytest.mark.slow  # trains, or runs several processes

# Four members that differ in every kind of per-member setting (weights, shifts, depth,
# decay rate, both learning rates, and the sampling: member 3 is a STEGO-like member).
MEMBERS = (
    "name=a|"
    "name=b,loss.pos_intra_weight=0.3,loss.neg_inter_shift=0.5,optim.lr=1e-3|"
    "name=c,loss.depth_weight=0.5,loss.depth_shift=0.1,loss.depth_decay_rate=0.3,"
    "loss.pos_inter_shift=0.1,optim.probe_lr=1e-2|"
    "name=stego,loss.depth_weight=0,loss.sampling=random,loss.pos_inter_weight=0.6"
)
STEPS = 10


def population_config():
    # A depth decay every 4 batches puts the per-member decay rate to work within 10 steps.
    config = tiny_config(**{"loss.depth_decay_every": 4, "train.num_steps": STEPS})
    config.sweep.members = MEMBERS
    return config


def run_single(config, devices, batches):
    mesh = sharding.make_mesh(devices)
    _, backbone, state, k_step, hp = setup(config, mesh)
    step_fn = make_program(config, mesh)
    out = []
    for batch in batches:
        g = sharding.host_to_global(batch, mesh)
        state, m = step_fn(state, backbone, g, k_step, hp, num_side=3)
        out.append(jax.device_get(m))
    return jax.device_get(state.params), out


def run_population(config, table, devices, batches):
    mesh = sharding.make_mesh(devices)
    _, backbone, state, k_step, hp, step_fn = setup_population(config, table, mesh)
    out = []
    for batch in batches:
        g = sharding.host_to_global(batch, mesh)
        state, m = step_fn(state, backbone, g, k_step, hp, num_side=3)
        out.append(jax.device_get(m))
    assert step_fn._cache_size() == 1
    return jax.device_get(state.params), out


# On 8 devices two members are rerun as single runs (each single run compiles its own step).
@pytest.mark.parametrize("num_devices, checked", [(1, (0, 1, 2, 3)), (8, (1, 3))])
def test_member_i_equals_a_single_run_with_its_settings(num_devices, checked):
    config = population_config()
    table = sweep.member_table(config)
    assert [m["name"] for m in table] == ["a", "b", "c", "stego"]
    batches = [random_batch(config, s) for s in range(STEPS)]
    devices = jax.devices()[:num_devices]
    pop_params, pop_metrics = run_population(config, table, devices, batches)
    assert config.model.dropout > 0  # dropout on: every member draws the step's masks
    for i in checked:
        member = table[i]
        single_params, single_metrics = run_single(
            sweep.member_config(config, member), devices, batches
        )
        for step in range(STEPS):
            for key in ("loss", "loss_intra", "loss_inter", "loss_neg", "loss_depth",
                        "loss_cluster", "loss_linear", "depth_weight", "depth_shift"):  # fmt: skip
                np.testing.assert_allclose(
                    pop_metrics[step][key][i], single_metrics[step][key], rtol=1e-5, atol=1e-5,
                    err_msg=f"member {member['name']} step {step} {key}",
                )  # fmt: skip
        mine = step_lib.member_params(pop_params, i)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(single_params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=member["name"])
    # The members did train differently (the comparison above is not vacuous).
    losses = [pop_metrics[-1]["loss"][i] for i in range(len(table))]
    assert len(set(np.round(losses, 6))) == len(table), losses
