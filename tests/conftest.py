"""Test set-up: simulate 8 CPU devices before JAX starts, so multi-device tests run anywhere;
the `slow` marker; fixtures over tests/support.py's helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: subprocess, multi-process or whole-training tests (`pytest -m 'not slow'` skips "
        "them for a fast loop; CI runs everything)",
    )


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
