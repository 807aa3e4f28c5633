"""The package's dataset assets (class lists, mappings, colours, curated lists).

Read through `importlib.resources`, so they are found in a plain (non-editable) install as
well as in a checkout. A missing asset is an error naming it, never a fallback.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

_ROOT = resources.files("depthg_jax.data") / "assets"


def asset(*parts: str):
    """A Traversable for assets/<parts...> (may not exist; see `has_asset`)."""
    return _ROOT.joinpath(*parts)


def has_asset(*parts: str) -> bool:
    return asset(*parts).is_file()


@functools.cache
def dataset_info(name: str) -> dict:
    """A dataset's class names, colours and mappings from assets/<name>.json."""
    path = asset(f"{name}.json")
    if not path.is_file():
        raise FileNotFoundError(f"no dataset asset {name}.json in the package ({path})")
    return json.loads(path.read_text())


def read_lines(*parts: str) -> list[str]:
    """The non-empty stripped lines of a text asset."""
    path = asset(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"no asset {'/'.join(parts)} in the package ({path})")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
