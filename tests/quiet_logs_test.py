"""Commands print their own output, not absl/JAX/Orbax INFO lines, unless --verbosity asks."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from depthg_jax import commands
from depthg_jax.models import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl's INFO prefix: "I1203 13:44:45.582879 140508278041472 xla_bridge.py:849] ..."
ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.M)
LIBRARY_LINES = ("Unable to initialize backend", "_NonBlockingMetadataStore", "orbax-checkpoint")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A mu/8 export of the demo config on a generated 5-image synthetic validation split,
    and a folder with one image to segment."""
    from support import synthetic_export

    root = tmp_path_factory.mktemp("quiet")
    spec = model_lib.ModelSpec("mu/8", 32, 6)
    synthetic_export(root, model_lib.init_params(spec, jax.random.key(0)))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    return root


def run_command(module, args):
    """As a user runs it: no JAX_PLATFORMS, so JAX probes (and logs about) every backend."""
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("JAX_PLATFORMS", None)
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def library_lines(output: str) -> list[str]:
    return [
        line for line in output.splitlines()
        if ABSL_INFO.match(line) or any(s in line for s in LIBRARY_LINES)
    ]  # fmt: skip


@pytest.mark.slow
def test_segment_and_evaluate_print_no_library_info_lines_unless_asked(export_dir):
    segment_args = [
        f"--checkpoint={export_dir / 'export'}", f"--images={export_dir / 'images'}",
        "--res=32", "--batch_size=1",
    ]  # fmt: skip
    quiet = run_command("depthg_jax.segment", segment_args + [f"--out={export_dir / 's1'}"])
    assert "wrote 1 segmentations" in quiet
    assert library_lines(quiet) == [], quiet
    evaluate_args = [f"--checkpoint={export_dir / 'export'}", f"--out={export_dir / 'eval'}"]
    quiet = run_command("depthg_jax.evaluate", evaluate_args)
    assert "cluster" in quiet and "5 images" in quiet
    assert library_lines(quiet) == [], quiet
    # The same lines are there when asked for: the filter, not the libraries, hides them.
    loud = run_command(
        "depthg_jax.segment", segment_args + [f"--out={export_dir / 's2'}", "--verbosity=0"]
    )
    assert any("_NonBlockingMetadataStore" in line for line in library_lines(loud)), loud
    loud = run_command("depthg_jax.evaluate", evaluate_args + ["--verbosity", "0"])
    assert library_lines(loud), loud


def test_pop_verbosity_takes_every_spelling_out_of_argv():
    assert commands.pop_verbosity(["--a=1", "--verbosity=0", "b"]) == (["--a=1", "b"], 0)
    assert commands.pop_verbosity(["-v", "1", "--x"]) == (["--x"], 1)
    assert commands.pop_verbosity(["--verbosity", "info"]) == ([], 0)
    assert commands.pop_verbosity(["--out=v"]) == (["--out=v"], None)
    with pytest.raises(commands.flags.Error, match="needs a value"):
        commands.pop_verbosity(["--verbosity"])
    with pytest.raises(commands.flags.Error, match="loud"):
        commands.pop_verbosity(["-v=loud"])


def test_a_private_flag_command_accepts_verbosity(capsys):
    seen = {}

    def define(fv):
        from absl import flags

        flags.DEFINE_integer("size", 3, "A size.", flag_values=fv)

    def run(fv):
        from absl import logging

        seen["verbosity"] = logging.get_verbosity()
        return 0

    from absl import logging

    before = logging.get_verbosity()
    try:
        assert commands.run_with_own_flags("prog", define, run, ["--verbosity=1", "--size=2"]) == 0
        assert seen["verbosity"] == 1
        assert commands.run_with_own_flags("prog", define, run, ["--verbosity"]) == 2
        assert "needs a value" in capsys.readouterr().err
    finally:
        logging.set_verbosity(before)
