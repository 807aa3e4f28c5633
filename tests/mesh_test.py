"""The 2-D mesh ('data', 'model'): the backbone split over 'model' changes no result.

On the 8 simulated CPU devices, meshes (8, 1), (2, 4) and (1, 8) run the train step, the
population step and the evaluator exactly as one device does (within 1e-5), and the compiled
step holds 1 / M of the backbone's parameter bytes per device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import make_program, random_batch, tiny_config

from depthg_jax.evaluation import evaluator
from depthg_jax.method import objective as objective_lib
from depthg_jax.models import model as model_lib
from depthg_jax.models import partitioning, variants
from depthg_jax.runtime import sharding
from depthg_jax.training import planning, population, sweep
from depthg_jax.training import step as step_lib

MESHES = [(8, 1), (2, 4), (1, 8)]
STEPS = 3
# Backbones at width 32: DINO's block layout (qkv, proj, fc1, fc2, learned positions), and
# the DINOv3 7B's (no qkv bias, SwiGLU w1/w2/w3, layer scale, RoPE, storage tokens).
SEVEN_B_TINY = "v3-mu7B/16"
VARIANTS = ["mu/8", SEVEN_B_TINY]


def config_for(variant, **overrides):
    patch = variants.patch_size(variant)
    res = 8 * patch  # an 8 x 8 feature grid
    return tiny_config(
        **{"model.variant": variant, "data.train_res": res, "data.eval_res": res, **overrides}
    )


def mesh_of(shape):
    data, model = shape
    return sharding.make_mesh(jax.devices()[: data * model], model=model)


def run_steps(config, mesh, batches):
    """(losses, host params, placed backbone, the compiled step's analysis) after one step
    per batch; the backbone placed by the rules."""
    spec = model_lib.ModelSpec.from_config(config)
    hp = sharding.replicate(objective_lib.hparams(config), mesh)
    k_backbone, k_state, k_step = jax.random.split(jax.random.key(0), 3)
    backbone = partitioning.load_backbone(config.model, k_backbone, mesh)
    state = sharding.replicate(step_lib.create_train_state(spec, hp, k_state), mesh)
    k_step = jax.device_put(k_step, sharding.replicated(mesh))
    program = make_program(config, mesh)
    losses = []
    for batch in batches:
        g = sharding.host_to_global(batch, mesh)
        args = (state, backbone, g, k_step, hp)
        state, metrics = program(*args, num_side=3)
        losses.append(float(metrics["loss"]))
    # The program that ran (same shapes and shardings: JAX's compilation cache answers).
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          (state, backbone, g, k_step, hp))  # fmt: skip
    compiled = planning.analyse(program.lower(*shapes, num_side=3).compile(), shapes)
    return losses, jax.device_get(state.params), backbone, compiled


@pytest.fixture(scope="module", params=VARIANTS)
def reference(request):
    """The one-device run of each variant: (config, batches, losses, params)."""
    config = config_for(request.param)
    batches = [random_batch(config, s) for s in range(STEPS)]
    losses, params, _, _ = run_steps(config, mesh_of((1, 1)), batches)
    return config, batches, losses, params


def assert_trees_close(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5,
                                   err_msg=what)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_train_step_equals_one_device_and_holds_one_mth_of_the_backbone(reference, shape):
    config, batches, ref_losses, ref_params = reference
    mesh = mesh_of(shape)
    losses, params, backbone, compiled = run_steps(config, mesh, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert_trees_close(params, ref_params, f"head params on mesh {shape}")
    # The backbone really is split: every leaf holds 1 / M of itself on each device, in the
    # placed arrays and in the compiled program's own input shardings.
    model = shape[1]
    total = partitioning.total_bytes(backbone)
    assert partitioning.per_device_bytes(backbone) == total // model
    assert compiled.backbone_bytes == pytest.approx(total / model, rel=0.01)
    assert compiled.flops > 0 and compiled.temp_bytes > 0


MEMBERS = "name=a|name=b,loss.pos_intra_weight=0.3,optim.lr=1e-3|name=c,loss.sampling=random"


def run_population(config, mesh, batches):
    table = sweep.member_table(config)
    spec = model_lib.ModelSpec.from_config(config)
    k_backbone, k_state, k_step = jax.random.split(jax.random.key(0), 3)
    backbone = partitioning.load_backbone(config.model, k_backbone, mesh)
    state = step_lib.create_population_state(
        spec, objective_lib.hparams(config), k_state, len(table)
    )
    state = sharding.replicate(state, mesh)
    hp = sharding.replicate(population.member_hparams(table), mesh)
    program = population.make_population_step(
        "jit", spec, population.shared_objective(config, table), mesh
    )
    losses = []
    for batch in batches:
        g = sharding.host_to_global(batch, mesh)
        state, metrics = program(state, backbone, g, k_step, hp, num_side=3)
        losses.append(np.asarray(metrics["loss"]))
    return np.stack(losses), jax.device_get(state.params)


@pytest.mark.slow
def test_population_step_equals_one_device(reference):
    config = reference[0].copy_and_resolve_references()
    config.sweep.members = MEMBERS
    batches = reference[1]
    ref_losses, ref_params = run_population(config, mesh_of((1, 1)), batches)
    for shape in ((2, 4), (1, 8)):
        losses, params = run_population(config, mesh_of(shape), batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
        assert_trees_close(params, ref_params, f"population params on mesh {shape}")


def eval_batches(config, n=2):
    rng = np.random.default_rng(5)
    r, b = config.data.eval_res, config.eval.batch_size
    for _ in range(n):
        yield {
            "image": rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8),
            "label": rng.integers(-1, config.data.n_classes, (b, r, r)).astype(np.int32),
            "valid": np.ones((b,), bool),
        }


@pytest.mark.slow
def test_evaluation_equals_one_device(reference):
    config, _, _, trainable = reference
    spec = model_lib.ModelSpec.from_config(config)
    backbone = model_lib.init_backbone(config.model, jax.random.key(3))
    params = model_lib.full_params(backbone, trainable)
    results = {}
    for shape in [(1, 1), (2, 4), (1, 8)]:  # (8, 1) is evaluate_test's layout
        scorer = evaluator.Evaluator(
            evaluator.head_predictor(spec, flip=True), spec.n_classes, mesh_of(shape),
            progress=False,
        )  # fmt: skip
        results[shape] = scorer(params, list(eval_batches(config)))
    for shape in [(2, 4), (1, 8)]:
        for probe in ("cluster", "linear"):
            np.testing.assert_array_equal(
                results[shape]["confusion"][probe], results[(1, 1)]["confusion"][probe],
                err_msg=f"{probe} confusion on mesh {shape}",
            )  # fmt: skip


@pytest.mark.slow
def test_bfloat16_parameters_halve_the_backbone_and_keep_bf16_compute_results(reference):
    config, batches, _, _ = reference
    bf16_compute = config.copy_and_resolve_references()
    bf16_compute.model.dtype = "bfloat16"
    both = bf16_compute.copy_and_resolve_references()
    both.model.backbone_param_dtype = "bfloat16"
    mesh = mesh_of((2, 4))
    losses_f32, _, backbone_f32, _ = run_steps(bf16_compute, mesh, batches)
    losses_bf16, _, backbone_bf16, _ = run_steps(both, mesh, batches)
    assert {x.dtype for x in jax.tree.leaves(backbone_bf16)} == {np.dtype("bfloat16")}
    assert partitioning.per_device_bytes(backbone_bf16) * 2 == partitioning.per_device_bytes(
        backbone_f32
    )
    # bf16 compute already rounds the weights to bf16 in every matmul: holding them in bf16
    # changes at most the rounding of the learned-position resize (DINO; none with RoPE).
    np.testing.assert_allclose(losses_bf16, losses_f32, rtol=2e-2, atol=2e-2)


def test_rules_split_every_parameter_of_every_family():
    """Every parameter of every family's test variant has a rule that splits it on an axis
    that divides by 8, and the rules table names the tensor-parallel layout."""
    tiny = ["mu/8", "v2-mug/14", "v2reg-mu/14", "v3-mu/16", "v3-mu+/16", SEVEN_B_TINY]
    for variant in tiny:
        shapes = planning.backbone_shapes(variant)
        specs = partitioning.backbone_specs(shapes, 8)
        flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(
            x, jax.sharding.PartitionSpec))[0]  # fmt: skip
        names = {partitioning.path_name(p): s for p, s in flat}
        assert partitioning.replicated_leaves(shapes, 8) == [], variant
        assert names["blocks_0/attn/qkv/kernel"] == jax.P(None, "model")
        assert names["blocks_0/attn/proj/kernel"] == jax.P("model", None)
        assert names["blocks_0/attn/proj/bias"] == jax.P("model")
        assert names["patch_embed/proj/kernel"] == jax.P(None, None, None, "model")
        mlp = {k.split("/")[2] for k in names if "/mlp/" in k}
        for layer in mlp:
            want = jax.P("model", None) if layer in ("fc2", "w3") else jax.P(None, "model")
            assert names[f"blocks_0/mlp/{layer}/kernel"] == want, (variant, layer)


def test_a_mesh_model_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="mesh.model=3 does not divide the 8 devices"):
        sharding.make_mesh(model=3)
    mesh = sharding.make_mesh(model=4)
    with pytest.raises(ValueError, match="not divisible by the 2 devices of the mesh's 'data'"):
        sharding.check_batch_size(3, mesh, "config.train.batch_size")
    config = tiny_config(**{"mesh.model": 2, "train.parallelism": "pmap"})
    with pytest.raises(ValueError, match="mesh.model=1 only"):
        make_program(config, sharding.mesh_for(config))


# --------------------------------------------------------------------------------------
# Loading: a converted backbone restores into its shards; conversion streams
# --------------------------------------------------------------------------------------


def tensorstore_bytes_read() -> int:
    """Bytes this process's TensorStore has read from files so far (its own counter)."""
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(int(v["value"]) for m in metrics for v in m["values"])


def stored_bytes(directory) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted S/16 backbone (random, 86 MB in float32) and its params on the host."""
    from depthg_jax.models import convert

    variant = "S/16"
    config = tiny_config(**{"model.variant": variant})
    params = jax.device_get(model_lib.init_backbone(config.model, jax.random.key(7)))
    out = tmp_path_factory.mktemp("converted") / "s16"
    convert.save_backbone(params, variant, out, source="random init")
    return out, params


@pytest.mark.slow
def test_a_converted_backbone_restores_into_its_shards_reading_each_once(converted):
    out, params = converted
    config = tiny_config(**{"model.variant": "S/16", "model.weights": str(out)})
    mesh = mesh_of((2, 4))
    stored = stored_bytes(out / "params")
    before = tensorstore_bytes_read()
    restored = partitioning.load_backbone(config.model, jax.random.key(0), mesh)
    read = tensorstore_bytes_read() - before
    # Every shard read once: the two 'data' replicas of a shard and the four devices of a
    # row do not read the same chunks again (Orbax's default one-chunk-per-tensor layout
    # read ~1.5x here).
    assert 0.97 * stored <= read <= 1.03 * stored, (read, stored)
    expected = partitioning.backbone_shardings(mesh, params)
    for x, want, s in zip(jax.tree.leaves(restored), jax.tree.leaves(params),
                          jax.tree.leaves(expected), strict=True):  # fmt: skip
        assert x.sharding.is_equivalent_to(s, x.ndim)
        np.testing.assert_array_equal(np.asarray(x), want)
    total = partitioning.total_bytes(params)
    assert partitioning.per_device_bytes(restored) == total // 4

    config.model.backbone_param_dtype = "bfloat16"
    half = partitioning.load_backbone(config.model, jax.random.key(0), mesh)
    leaf = jax.tree.leaves(half)[0]
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(leaf), jax.tree.leaves(params)[0].astype(jnp.bfloat16))


def test_conversion_streams_tensor_by_tensor():
    """Converting never holds the weights twice: the peak over the loaded state dict is about
    one tensor, not the whole model (as converting a copy would cost)."""
    import tracemalloc

    from depthg_jax.models import convert

    rng = np.random.default_rng(0)
    shapes = convert.expected_shapes("S/16", 14 * 14)
    tracemalloc.start()  # before the weights exist: their frees count too
    try:
        state = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
        total = sum(v.nbytes for v in state.values())
        largest = max(v.nbytes for v in state.values())
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        params = convert.convert_state_dict(state, "S/16", consume=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert state == {}
    assert partitioning.total_bytes(params) == total
    assert peak < 3 * largest, (peak, largest, total)
    assert 3 * largest < total / 5  # the bound is far below a second copy
