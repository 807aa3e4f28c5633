"""Manifests: a directory's files with sizes and SHA-256 checksums, written last, verified on load.

A training checkpoint step directory and an export each carry `MANIFEST.json` once complete:
{"format": 1, "files": {relative path: {"size": bytes, "sha256": hex}}}. It is written after
every other file (atomically), so a directory with a manifest is one that was finished; a flipped
bit, a truncated file or a deleted file then fails `verify_manifest` with the file named.

`python -m depthg_jax.export --verify DIR` checks an export or a checkpoint step by hand.
"""

from __future__ import annotations

import hashlib
import json
import os

from depthg_jax.runtime import files

MANIFEST = "MANIFEST.json"
_FORMAT = 1


class IntegrityError(ValueError):
    """A directory's files do not match its manifest (the message names the file)."""


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(directory: str) -> list[str]:
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(directory: str) -> dict:
    """Writes MANIFEST.json over every file now under `directory`; returns its content."""
    entries = {}
    for rel in _listing(directory):
        path = os.path.join(directory, rel)
        entries[rel] = {"size": os.path.getsize(path), "sha256": file_digest(path)}
    manifest = {"format": _FORMAT, "files": entries}
    files.write_text_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def verify_manifest(directory: str, *, allow_extra: tuple[str, ...] = ()) -> int:
    """Checks every file listed in `directory`'s manifest; returns how many were checked.

    Raises IntegrityError naming the first missing, resized or altered file, or a file that
    the manifest does not list (other than those under the top-level names in allow_extra).
    """
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        entries = manifest["files"]
    except FileNotFoundError:
        raise IntegrityError(f"{directory} has no {MANIFEST}: it was never completed") from None
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}): the manifest itself is damaged") from e
    for rel, entry in sorted(entries.items()):
        file = os.path.join(directory, rel)
        if not os.path.isfile(file):
            raise IntegrityError(f"{file} is missing (listed in {path})")
        size = os.path.getsize(file)
        if size != entry["size"]:
            raise IntegrityError(
                f"{file} has {size} bytes, its manifest {entry['size']}: truncated or altered"
            )
        if file_digest(file) != entry["sha256"]:
            raise IntegrityError(f"{file} fails its SHA-256 checksum (corrupted since written)")
    extra = [
        rel for rel in _listing(directory)
        if rel not in entries and rel.split(os.sep)[0] not in allow_extra
    ]  # fmt: skip
    if extra:
        raise IntegrityError(f"{directory} holds files its manifest does not list: {extra[:5]}")
    return len(entries)
