"""Where the data commands write: inside their output folder, one writer at a time.

- `confine`: a path built from an id must stay inside the command's output folder (five_crop).
- `WriterLock`: one writer per output folder (an advisory `flock`, released by the kernel when
  the holder dies, so a killed run never blocks the next one) (prepare).
- `remove_stale`: what a killed run left, removed by the next run once it holds the lock.
(The temporary files of `runtime.files.write_atomic` are removed by its next write instead.)
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def confine(path: str | os.PathLike, out: str | os.PathLike, what: str) -> str:
    """`path` if it lies inside `out` (lexically: no '..' escape, no absolute id), else an error
    naming `what` (the id or list that made the path) and the folder."""
    path, out = os.path.normpath(path), os.path.normpath(out)
    if not (path == out or path.startswith(out.rstrip(os.sep) + os.sep)):
        raise ValueError(f"{what} would write {path}, outside the output folder {out}")
    return path


class WriterLock:
    """An exclusive, non-blocking lock on `<folder>/<name>` for the life of a `with` block.

    A second writer (another process, or another lock in this one) gets a ValueError naming
    the folder and the holder's pid. Local folders only: other paths (gs://) are not locked.
    """

    def __init__(self, folder: str | os.PathLike, name: str, command: str):
        self.path = os.path.join(os.fspath(folder), name)
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        if "://" in self.path:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(
                f"another {self.command} (pid {holder}) is writing into "
                f"{os.path.dirname(self.path)}; wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race)
            self._fd = None


def remove_stale(paths: Iterable[Path], what: str) -> list[str]:
    """Removes files and folders a killed run left (call while holding the `WriterLock`);
    prints and returns their names."""
    removed = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path))
    if removed:
        print(f"removed {len(removed)} {what} left by a killed run, e.g. {removed[0]}")
    return removed
