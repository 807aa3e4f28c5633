"""The README's demo and sweep figures come from docs/make_figures.py: its blocks are filled,
dated and name the script, and the pictures it writes to docs/figures/ are there and small."""

import re
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))

import make_figures  # noqa: E402

README = (REPO / "README.md").read_text()


def block(name: str) -> str:
    found = re.findall(rf"<!-- figures:{name} -->\n(.*?)<!-- /figures:{name} -->", README, re.S)
    assert len(found) == 1, name
    return found[0]


@pytest.mark.parametrize("name", ["demo", "sweep"])
def test_readme_figures_are_written_by_the_script_with_a_date(name):
    text = block(name)
    assert "written by `python docs/make_figures.py`" in " ".join(text.split())
    assert re.search(r"20\d\d-\d\d-\d\d", text)
    assert re.search(r"\d+\s(min\s\d+\s)?s\swall", text)


def test_demo_block_holds_the_printed_scores_and_the_pictures():
    text = block("demo")
    assert "trained head, cluster probe" in text and "backbone features, k-means" in text
    for name in ("demo_grid.png", "demo_confusion.png", "demo_overlay.png"):
        assert f"docs/figures/{name}" in text
        path = REPO / "docs" / "figures" / name
        assert path.stat().st_size < 300_000, name
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width <= make_figures.MAX_PICTURE_WIDTH


def test_sweep_block_holds_the_table():
    text = block("sweep")
    assert "member" in text and "cluster mIoU" in text and "best member:" in text


def test_replace_block_rewrites_only_between_the_markers():
    text = "a\n<!-- figures:x -->\nold\n<!-- /figures:x -->\nb\n"
    assert make_figures.replace_block(text, "x", "new\n") == (
        "a\n<!-- figures:x -->\nnew\n<!-- /figures:x -->\nb\n"
    )
    with pytest.raises(ValueError, match="figures:y"):
        make_figures.replace_block(text, "y", "new")


def test_printed_lines_drop_progress_bars_and_keep_the_block():
    output = "train: 10%\rtrain: 100%\nUnsupervised x\n  row 1\ncheckpoint a\ncheckpoint b\nbye\n"
    lines = make_figures.printed_lines(output, "Unsupervised", "checkpoint ")
    assert lines == ["Unsupervised x", "  row 1", "checkpoint a", "checkpoint b"]
