"""The package's shape: imports run one way, and the package works installed anywhere."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "depthg_jax"
REPO = PACKAGE.parent
# The layers, by folder (README, Layout): commands -> drivers (training/, evaluation/) ->
# runtime/, data/, models/ -> method/.
COMMANDS = {"main", "evaluate", "segment", "export"}
DRIVERS = ("depthg_jax.training", "depthg_jax.evaluation")


def import_graph() -> dict[str, set[str]]:
    """Module -> our modules it imports, at any depth (function-level imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    keep = len(parts) - node.level + (1 if is_package else 0)
                    base = ".".join(parts[:keep] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module and not module.startswith(target + "."):
                    if target != "depthg_jax":
                        edges[module].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]


def _layer_violations(sources: tuple[str, ...], forbidden) -> list[tuple[str, str]]:
    return [
        (m, t)
        for m, targets in import_graph().items()
        if m.startswith(sources)
        for t in targets
        if forbidden(t)
    ]


def _is_command(target: str) -> bool:
    return target.removeprefix("depthg_jax.") in COMMANDS


def test_method_models_data_and_runtime_import_no_driver_and_no_command():
    lower = ("depthg_jax.method", "depthg_jax.models", "depthg_jax.data", "depthg_jax.runtime")
    bad = _layer_violations(lower, lambda t: t.startswith(DRIVERS) or _is_command(t))
    assert not bad, bad


def test_evaluation_imports_nothing_from_training():
    bad = _layer_violations(("depthg_jax.evaluation",), lambda t: t.startswith(DRIVERS[0]))
    assert not bad, bad


def test_no_module_imports_a_command():
    bad = _layer_violations(("depthg_jax",), _is_command)
    assert not bad, bad


def test_the_layer_check_finds_a_planted_upward_import(tmp_path, monkeypatch):
    graph = {"depthg_jax.data.x": {"depthg_jax.training.loop"}, "depthg_jax.training.loop": set()}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    assert _layer_violations(("depthg_jax.data",), lambda t: t.startswith(DRIVERS)) == [
        ("depthg_jax.data.x", "depthg_jax.training.loop")
    ]


@pytest.mark.slow
def test_loading_a_config_file_imports_no_jax_and_works_from_any_directory(tmp_path):
    check = (
        "import importlib.util, sys\n"
        "for name in ('coco', 'cityscapes', 'potsdam', 'demo', 'demo_sweep'):\n"
        f"    path = {str(REPO / 'configs')!r} + '/' + name + '.py'\n"
        "    spec = importlib.util.spec_from_file_location('c_' + name, path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    module.get_config()\n"
        "bad = [m for m in ('jax', 'flax', 'PIL', 'orbax') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_no_file_of_the_repo_cites_material_outside_it():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    citing = [
        f
        for f in tracked
        if not f.startswith(".ci/")
        and (REPO / f).is_file()
        and "../" + "shared" in (REPO / f).read_text(errors="ignore")
    ]
    assert not citing, citing


@pytest.mark.slow
def test_a_plain_install_works_from_any_directory(tmp_path):
    """pip install (not editable) into a fresh folder, then class names and 2 demo steps from
    another working directory with the config given by absolute path."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(REPO)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (site / "depthg_jax" / "data" / "assets" / "cocostuff27.json").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    check = (
        f"import depthg_jax; assert depthg_jax.__file__.startswith({str(site)!r})\n"
        "from depthg_jax.data import palette\n"
        "names = palette.class_names('cocostuff27', 27)\n"
        "assert names[0] != 'class_0' and len(names) == 27, names\n"
        "from depthg_jax.data import datasets\n"
        "print(len(datasets.coco_curated_ids('/nonexistent', 'train2017')[0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "97702"
    run = subprocess.run(
        [
            sys.executable, "-m", "depthg_jax.main", f"--config={REPO / 'configs' / 'demo.py'}",
            f"--workdir={tmp_path / 'wd'}", "--config.train.num_steps=2",
            "--config.train.eval_every=0", "--config.train.image_every=0",
            "--config.train.report_baselines=False", "--config.data.synthetic_train=8",
            "--config.data.synthetic_val=4", "--config.data.synthetic_size=64",
            "--config.data.train_res=64", "--config.data.eval_res=64",
            "--config.loss.feature_samples=3", "--config.train.batch_size=4",
            "--config.eval.batch_size=4", "--config.train.log_every=1",
        ],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "wd" / "export" / "config.json").is_file()
