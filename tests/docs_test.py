"""Every `docs/<page>.md#<anchor>` cited in the code and the docs resolves to a heading."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {
        slug(line.lstrip("#"))
        for line in page.read_text().splitlines()
        if re.match(r"^#{1,6} ", line)
    }


def citations() -> list[tuple[str, str, str]]:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".ipynb") or not path.is_file():
            continue
        for page, anchor in CITATION.findall(path.read_text(errors="ignore")):
            found.append((name, page, anchor))
    return found


def test_every_cited_docs_anchor_resolves():
    cited = citations()
    assert len(cited) > 10  # the scan found the citations
    broken = [
        f"{name}: docs/{page}#{anchor}"
        for name, page, anchor in cited
        if not (REPO / "docs" / page).is_file() or anchor not in anchors(REPO / "docs" / page)
    ]
    assert not broken, broken


def test_slugs_follow_github():
    assert slug("Schedule timing") == "schedule-timing"
    assert slug("COCO-Stuff lists") == "coco-stuff-lists"
    assert slug("Optimisers and total loss") == "optimisers-and-total-loss"
