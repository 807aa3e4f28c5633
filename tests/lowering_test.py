"""Every jitted program of the package lowers for TPU, GPU and CPU on this CPU-only machine
(depthg_jax/programs.py), and the table of programs is complete.

- The table covers every `jit`/`pmap` in the package's source (an `ast` scan), except the
  sites `programs.UNLISTED` names with a reason; a planted jit is found by the scan.
- Each program, at the real shapes of configs/coco.py (ViT-S/8 in bfloat16 as on
  accelerators, batch 32 at 224 px, evaluation at 320 px with flip; ViT-B/8 in full fp32 as
  released), exports with `jax.export` for "tpu", "cuda" and "cpu" from abstract inputs, with
  no host callback and no custom call outside `programs.ALLOWED_CUSTOM_CALLS` (slow: ~1 min).
- A planted program with `jax.pure_callback`, and one with a CPU LAPACK kernel, are refused.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from depthg_jax import config as config_lib
from depthg_jax import programs

PACKAGE = Path(__file__).resolve().parents[1] / "depthg_jax"
REPO_CONFIGS = PACKAGE.parent / "configs"
JIT_NAMES = {"jit", "pmap", "pjit", "xmap"}


# --------------------------------------------------------------------------------------
# The table is complete
# --------------------------------------------------------------------------------------


class _JitSites(ast.NodeVisitor):
    """Every use of a name `jit`/`pmap`/`pjit` (jax.jit, xla.jit, a partial of one, ...):
    at a decorator, the site is the decorated function; elsewhere, the enclosing one."""

    def __init__(self, module: str):
        self.module = module
        self.scope: list[str] = []
        self.sites: collections.Counter[str] = collections.Counter()

    def _site(self) -> str:
        return f"{self.module}:{'.'.join(self.scope) or '<module>'}"

    def _uses_jit(self, node: ast.AST) -> bool:
        return any(
            (isinstance(n, ast.Attribute) and n.attr in JIT_NAMES)
            or (isinstance(n, ast.Name) and n.id in JIT_NAMES)
            for n in ast.walk(node)
        )

    def _function(self, node):
        self.scope.append(node.name)
        for decorator in node.decorator_list:
            if self._uses_jit(decorator):
                self.sites[self._site()] += 1
        for child in [*node.args.defaults, *node.args.kw_defaults, *node.body]:
            if child is not None:
                self.visit(child)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        for child in node.body:
            self.visit(child)
        self.scope.pop()

    def visit_Attribute(self, node):
        if node.attr in JIT_NAMES:
            self.sites[self._site()] += 1
        self.generic_visit(node)

    def visit_Name(self, node):
        if node.id in JIT_NAMES:
            self.sites[self._site()] += 1


def jit_sites(package: Path = PACKAGE) -> collections.Counter[str]:
    """ "module:qualified name" of each function holding (or decorated by) a jit, counted."""
    sites: collections.Counter[str] = collections.Counter()
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        visitor = _JitSites(module.removesuffix(".__init__"))
        visitor.visit(ast.parse(path.read_text()))
        sites.update(visitor.sites)
    return sites


def test_every_jitted_program_of_the_package_is_in_the_table_or_unlisted_with_a_reason():
    found = set(jit_sites())
    listed = {site for entry in programs.ENTRIES for site in entry.sites}
    missing = sorted(found - listed - set(programs.UNLISTED))
    assert not missing, (
        f"jitted programs not in depthg_jax/programs.py: {missing}; add an Entry that builds "
        "each with abstract inputs (or, for an internal helper, a reason in UNLISTED)"
    )
    stale = sorted((listed | set(programs.UNLISTED)) - found)
    assert not stale, f"the table names jit sites that no longer exist: {stale}"
    assert all(reason.strip() for reason in programs.UNLISTED.values())
    assert len(programs.BY_NAME) == len(programs.ENTRIES)


def test_the_scan_finds_a_planted_jit_in_each_form(tmp_path):
    package = tmp_path / "depthg_jax"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "planted.py").write_text(
        "import functools\nimport jax\nfrom depthg_jax.runtime import xla\n"
        "@xla.jit\ndef decorated(x):\n    return x\n"
        "class Holder:\n    def method(self):\n"
        "        @functools.partial(jax.jit, static_argnums=0)\n"
        "        def inner(n):\n            return n\n"
        "        return jax.pmap(lambda x: x)\n"
        "called = jax.jit(lambda x: x)\n"
        "def mentions_jit_in_a_docstring():\n    '''jax.jit is not used here.'''\n"
    )
    assert jit_sites(package) == {
        "depthg_jax.sub.planted:decorated": 1,
        "depthg_jax.sub.planted:Holder.method.inner": 1,
        "depthg_jax.sub.planted:Holder.method": 1,
        "depthg_jax.sub.planted:<module>": 1,
    }


# --------------------------------------------------------------------------------------
# Planted faults are caught
# --------------------------------------------------------------------------------------


def _tiny(name: str, fn, *args) -> programs.Lowerable:
    return programs.Lowerable(name, jax.jit(fn), args)


@pytest.mark.parametrize("platform", programs.PLATFORMS)
def test_a_planted_host_callback_is_refused_naming_the_program(platform):
    def step(x):
        doubled = jax.pure_callback(
            lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x
        )
        return jax.lax.cond(x.sum() > 0, lambda: doubled, lambda: x)  # nested: found too

    planted = _tiny("planted_callback", step, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(programs.LoweringError, match=rf"planted_callback for {platform}: host "
                       r"callback\(s\) \['pure_callback'\]"):  # fmt: skip
        programs.lower(planted, platform)


def test_a_planted_debug_print_is_a_host_callback_too():
    def step(x):
        jax.debug.print("x = {}", x)
        return x + 1

    planted = _tiny("planted_print", step, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(programs.LoweringError, match="planted_print for tpu: host callback"):
        programs.lower(planted, "tpu")


def test_a_planted_cpu_only_kernel_is_refused_and_clean_programs_pass():
    """eigh lowers to a LAPACK custom call on CPU: outside the allow-list, it is refused;
    the same program's other platforms and a plain program pass."""
    matrix = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    planted = _tiny("planted_lapack", lambda a: jnp.linalg.eigh(a @ a.T)[0], matrix)
    with pytest.raises(programs.LoweringError, match=r"planted_lapack for cpu: custom call\(s\) "
                       r"\['lapack_\w+'\]"):  # fmt: skip
        programs.lower(planted, "cpu")
    clean = _tiny("clean", lambda a: jnp.tanh(a @ a.T).sum(), matrix)
    for platform in programs.PLATFORMS:
        assert programs.lower(clean, platform).platforms == (platform,)


def test_custom_calls_are_read_in_both_syntaxes():
    text = (
        'stablehlo.custom_call @Sharding(%0) {mhlo.sharding = "{replicated}"}\n'
        '"stablehlo.custom_call"(%1) {call_target_name = "lapack_sgesdd_ffi"}\n'
    )
    assert programs.custom_calls(text) == {"Sharding", "lapack_sgesdd_ffi"}


# --------------------------------------------------------------------------------------
# Every program at the real shapes, for every platform
# --------------------------------------------------------------------------------------

# (configs/coco.py variant, overrides): S/8 as on accelerators, B/8 as the release ran it.
SETTINGS = {
    "S8-bf16": ("S/8", {"dtype": "bfloat16"}),
    "B8-fp32-highest": ("B/8", {"matmul_precision": "highest"}),
}


@pytest.fixture(scope="module")
def shapes():
    made = {}

    def get(setting: str) -> programs.Shapes:
        if setting not in made:
            variant, model = SETTINGS[setting]
            config = config_lib.sibling_config(str(REPO_CONFIGS / "coco.py"), "coco", variant)
            config.model.update(model)
            made[setting] = programs.Shapes(config)
        return made[setting]

    return get


def test_the_real_settings_have_the_released_shapes(shapes):
    s = shapes("S8-bf16")
    spec = s.spec
    assert (spec.variant, spec.dtype, spec.dim, spec.n_classes) == ("S/8", "bfloat16", 70, 27)
    lowerable = programs.build("train_step", s)
    assert lowerable.args[2]["image"].shape == (32, 224, 224, 3)
    assert lowerable.kwargs == {"num_side": 11}
    images = programs.build("evaluation_step", s).args[1]
    assert images.shape == (16, 320, 320, 3) and images.dtype == jnp.uint8
    assert programs.build("predict", s).kwargs["flip"] is True
    b = shapes("B8-fp32-highest")
    assert (b.spec.variant, b.spec.matmul_precision, b.spec.dim) == ("B/8", "highest", 90)
    assert b.params["backbone"]["cls_token"].shape[-1] == 768


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", [e.name for e in programs.ENTRIES])
def test_every_program_lowers_for_tpu_cuda_and_cpu_at_real_shapes(shapes, setting, name):
    lowerable = programs.build(name, shapes(setting))
    for platform in programs.PLATFORMS:
        exported = programs.lower(lowerable, platform)
        assert exported.platforms == (platform,)
        assert (
            all(isinstance(d, int) for a in exported.out_avals for d in a.shape)
            or name == "portable_inference"
        ), f"{name}: an output shape is symbolic by accident"
