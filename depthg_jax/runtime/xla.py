"""`jax.jit` with the XLA options our programs compile with: per program, never process-wide.

jax 0.10's XLA:CPU hands dots and reductions to YNNPACK by default. On the project's CPU
machines (AMD EPYC, AVX2, no AVX-512) our programs run markedly faster on XLA's own kernels:
the DINO ViT-S/8 forward ~1.2x at batch 4, the whole train step ~1.7x at batch 8
(bench/RESULTS.md, "XLA:CPU without YNNPACK"). Setting the option per program, rather than in
XLA_FLAGS, leaves the rest of a user's process alone. Other backends compile with XLA's
defaults.

The backend is looked up at the first call, not at import: a module-level `@xla.jit` must not
start JAX's backends before `jax.distributed.initialize()` runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

# An empty list of library fusion types: no YNNPACK fusions, XLA's own emitters throughout.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, Any] | None:
    """The per-program options for the default backend (None: XLA's defaults)."""
    return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else None


class _Jitted:
    """A `jax.jit` made at the first use, with `compiler_options()`; else transparent."""

    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        if "compiler_options" in jit_kwargs:
            raise TypeError("xla.jit sets compiler_options itself; use jax.jit to choose them")
        self._fun = fun
        self._jit_kwargs = jit_kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)

    @functools.cached_property
    def _nested(self):
        # Inside another jit the options belong to the outer program (JAX refuses them on a
        # nested jit); the inner one stays a jit for its name and sharding arguments.
        return jax.jit(self._fun, **self._jit_kwargs)

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._jitted)(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only reached for names the instance lacks: lower, trace, eval_shape, _cache_size...
        if name.startswith("__") or name in ("_fun", "_jit_kwargs", "_jitted", "_nested"):
            raise AttributeError(name)
        return getattr(self._jitted, name)


def jit(fun: Callable | None = None, /, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)` with our compiler options; also `@jit(static_argnames=...)`."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jitted(fun, jit_kwargs)


def as_jax_jit(program):
    """The `jax.jit` object behind an `xla.jit` program (what `jax.export` and other JAX APIs
    that take a jit expect); any other program is returned as it is."""
    return program._jitted if isinstance(program, _Jitted) else program
