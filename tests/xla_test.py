"""xla.jit: our per-program XLA options take effect, and the wrapper is a transparent jax.jit."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthg_jax.runtime import xla


def _dense_and_reduce(w, x):
    return jnp.max(jnp.tanh(x @ w), axis=-1)


def _args():
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, 64), np.float32), rng.standard_normal((32, 64), np.float32)


def test_cpu_programs_compile_without_ynnpack_fusions():
    assert jax.default_backend() == "cpu"
    assert xla.compiler_options() == xla.CPU_OPTIONS
    w, x = _args()
    # jax 0.10's default sends this dot and reduction to YNNPACK; ours must not.
    default_hlo = jax.jit(_dense_and_reduce).lower(w, x).compile().as_text()
    ours_hlo = xla.jit(_dense_and_reduce).lower(w, x).compile().as_text()
    assert "%ynn_fusion" in default_hlo
    assert "%ynn_fusion" not in ours_hlo


def test_same_values_as_jax_jit_and_keyword_forms():
    w, x = _args()
    np.testing.assert_allclose(
        xla.jit(_dense_and_reduce)(w, x), jax.jit(_dense_and_reduce)(w, x), rtol=1e-5, atol=1e-5
    )

    @xla.jit(static_argnames=("power",))
    def pow_sum(v, power):
        return jnp.sum(v**power)

    assert float(pow_sum(jnp.arange(4.0), power=2)) == 14.0
    assert float(pow_sum(jnp.arange(4.0), power=3)) == 36.0
    assert pow_sum._cache_size() == 2  # delegated to the underlying jax.jit
    assert pow_sum.__name__ == "pow_sum"


def test_nested_inside_another_jit_takes_the_outer_programs_options():
    inner = xla.jit(_dense_and_reduce)

    @xla.jit
    def outer(w, x):
        return inner(w, x) * 2

    w, x = _args()
    np.testing.assert_allclose(outer(w, x), 2 * _dense_and_reduce(w, x), rtol=1e-5, atol=1e-5)
    assert "%ynn_fusion" not in outer.lower(w, x).compile().as_text()
    # Under a plain jax.jit the inner call compiles with XLA's defaults, like any nested jit.
    assert "%ynn_fusion" in jax.jit(outer).lower(w, x).compile().as_text()


def test_donation_passes_through():
    @xla.jit(donate_argnums=(0,))
    def add_one(v):
        return v + 1

    v = jnp.ones((1024,))
    out = add_one(v)
    assert float(out[0]) == 2.0
    assert v.is_deleted()


def test_choosing_compiler_options_is_refused():
    with pytest.raises(TypeError, match="compiler_options"):
        xla.jit(_dense_and_reduce, compiler_options={})


@pytest.mark.slow
def test_module_level_jits_do_not_start_backends_at_import():
    # jax.distributed.initialize() must be able to run after our modules are imported.
    code = (
        "import depthg_jax.models.model, depthg_jax.training.trainer, depthg_jax.evaluate\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
