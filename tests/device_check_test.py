"""bench/device_check.py, the prepared accelerator check, runs end to end on the CPU (--smoke)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import device_check  # noqa: E402


@pytest.mark.slow
def test_device_check_smoke_runs_every_section_and_writes_markdown(tmp_path):
    out = tmp_path / "check.md"
    lines = device_check.main(["--smoke", f"--out={out}", "--budget_s=1e6"])
    text = out.read_text()
    assert text.strip() == "\n".join(lines).strip()
    assert "Backbone attention (auto, platform cpu): mu/8 bfloat16: explicit." in lines
    rows = [line for line in lines if line.startswith("| mu/8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["bfloat16"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[2]) > 0 and float(cells[3]) > 0  # step s, images/s
        assert float(cells[6]) > 0  # the backbone's XLA FLOP count
        assert cells[8].endswith("%")  # FPS share
    sweep_rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(sweep_rows) == 2 and "failed" not in "".join(sweep_rows)
    assert any(line.startswith("Evaluation (mu/8") for line in lines)
    assert any("PyTorch statement of the released step" in line for line in lines), lines
    assert not any(line.startswith("Skipped") for line in lines)
    assert any(line.startswith("Depth maps (tiny Depth Anything") for line in lines), lines
    assert not any(line.startswith("Depth maps failed") for line in lines), lines
