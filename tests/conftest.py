"""Test set-up: simulate 8 CPU devices before JAX starts, so multi-device tests run anywhere;
one XLA compilation cache for the session; the `slow` marker; fixtures over tests/support.py's
helpers."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Dozens of tests (and the commands they start as subprocesses) compile the same tiny
# programs; a persistent cache shared by the session's workers and their children compiles
# each once. The directory is new for every session (nothing carries over between runs) and
# is set before xdist starts its workers, so they and their subprocesses inherit it.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="depthg_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: subprocess, multi-process, whole-training, multi-device-step or real-width "
        "parity tests (`pytest -m 'not slow'` skips them for a fast loop; CI runs everything)",
    )


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:  # the process that made the cache (xdist's controller) ends last
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def tiny_config():
    """A factory: tiny_config(**{"train.num_steps": 2}) -> the demo config shrunk to seconds."""
    import support

    return support.tiny_config


@pytest.fixture
def random_batch():
    """A factory: random_batch(config, seed) -> a random training batch."""
    import support

    return support.random_batch
