"""Read PyTorch ``torch.save`` files (zip format) into numpy, without torch, executing nothing.

A ``.pth``/``.bin`` file written by torch >= 1.6 is a zip archive holding ``<root>/data.pkl``
(a pickle of the saved object, with tensors referring to storages by key) and one raw
little-endian file per storage under ``<root>/data/``. We unpickle with a restricted
unpickler that resolves only the globals needed to rebuild tensors and ordered dicts, each
to our own numpy implementation, so a file can never run code: any other global (for
example ``os.system`` in a malicious ``__reduce__``) raises :class:`UnsafePickleError`.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype of its elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for a global outside the tensor-rebuilding allow-list."""


class _StorageType:
    """Stand-in for a torch storage class: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """Numpy version of torch._utils._rebuild_tensor(_v2): a bounds-checked strided copy."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise pickle.UnpicklingError("tensor does not refer to a storage")
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
        raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size} at offset {offset} reads past its storage of "
            f"{storage.size} elements (truncated or corrupt file)"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from the zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only tensor data is allowed in "
                "weight files"
            ) from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self._root}/data/{key}"
        try:
            raw = self._archive.read(name)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {name} missing from the archive") from None
        if len(raw) < numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"storage {name} holds {len(raw)} bytes, expected {numel * dtype.itemsize}"
            )
        order = "<" if self._byteorder == "little" else ">"
        return np.frombuffer(raw, dtype.newbyteorder(order), count=numel).astype(dtype)


def _find_root(archive: zipfile.ZipFile, path: Path) -> str:
    roots = [n[: -len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    roots = [r for r in roots if "/" not in r]
    if len(roots) != 1:
        raise ValueError(f"{path}: not a torch.save zip archive (found data.pkl at {roots})")
    return roots[0]


def load_pth(path: str | Path) -> Any:
    """Loads a torch.save zip file as nested Python containers of numpy arrays.

    Raises ValueError for files that are not zip archives written by torch (including
    truncated ones), and UnsafePickleError if the pickle names any non-tensor global.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"{path}: not a readable torch.save zip archive ({e}); legacy pre-1.6 torch files "
            "are not supported: re-save with torch.save in a recent torch"
        ) from e
    with archive:
        root = _find_root(archive, path)
        try:
            byteorder = archive.read(f"{root}/byteorder").decode().strip()
        except KeyError:
            byteorder = "little"
        try:
            data = archive.read(f"{root}/data.pkl")
            return _RestrictedUnpickler(data, archive, root, byteorder).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except Exception as e:  # any other failure means a damaged file, never code run
            raise ValueError(f"{path}: corrupt torch file: {e}") from e
