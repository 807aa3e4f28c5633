"""Atomic file writes: readers see a file whole or not at all, never half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

_TMP_MARK = "-w-"  # .<name>.<pid>-w-<random>.tmp: a temporary file of write_atomic
_cleaned_dirs: set[str] = set()


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Removes write_atomic's temporary files in `directory` whose writer process is gone (a
    killed run's leftovers); once per directory and process. Returns the names removed."""
    directory = os.path.abspath(directory)
    if directory in _cleaned_dirs:
        return []
    _cleaned_dirs.add(directory)
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            name = entry.name
            if not (name.startswith(".") and name.endswith(".tmp") and _TMP_MARK in name):
                continue
            pid = name.rsplit(_TMP_MARK, 1)[0].rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(name)
    return removed


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """`write(fileobj)` fills a temporary file beside `path`, then it is renamed over `path`.

    os.replace is atomic on POSIX within one filesystem. On any error, KeyboardInterrupt
    included, the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}{_TMP_MARK}", suffix=".tmp"
    )
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; follow the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, prefix: str) -> Iterator[str]:
    """Yields a new temporary folder beside `path` (mode per the umask) to fill; on success it
    is renamed to `path`, on any error removed, so `path` appears whole or not at all."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; choose a new output or remove it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=os.path.dirname(path))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_image_atomic(
    path: str | os.PathLike, array: np.ndarray, image_format: str = "PNG", **options
) -> None:
    """Writes a uint8/uint16 array as an image file (PNG by default) atomically."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(array))
    write_atomic(path, lambda f: image.save(f, format=image_format, **options))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def check_writable(directory: str | os.PathLike, what: str = "--out") -> None:
    """Creates `directory` and writes a probe file there, before any long work; an OSError
    naming the flag and the folder otherwise."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{what}={directory} is not writable ({e.strerror})") from e


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
