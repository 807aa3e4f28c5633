"""Read PyTorch ``torch.save`` files (zip format) into numpy, without torch, executing nothing.

A ``.pth``/``.bin`` file written by torch >= 1.6 is a zip archive holding ``<root>/data.pkl``
(a pickle of the saved object, with tensors referring to storages by key) and one raw
little-endian file per storage under ``<root>/data/``. We unpickle with a restricted
unpickler that resolves only the globals needed to rebuild tensors and ordered dicts, each
to our own numpy implementation, so a file can never run code: any other global (for
example ``os.system`` in a malicious ``__reduce__``) raises :class:`UnsafePickleError`.

A Lightning ``.ckpt`` is such a zip too, but its pickle holds more than tensors: the
hyper-parameters as OmegaConf containers, Lightning's ``AttributeDict``, callback classes
(the keys of ``callbacks`` in Lightning < 1.5) and the type references inside OmegaConf's
metadata. ``load_pth(path, lightning=True)`` loads exactly the names in
:data:`LIGHTNING_GLOBALS` as inert placeholders of ours (:class:`InertObject`,
:class:`InertDict`, :class:`TypeReference`) that record the name and the pickled state:
nothing is imported and no code of those classes runs. Every other name is still refused.
:func:`to_plain` turns the placeholders back into plain dicts, lists and scalars.

Resources are bounded by what the file declares, so a small hostile file cannot exhaust
memory or time: a tensor never has more elements than its storage (no stride-0 expansion); each
zip entry is streamed into a buffer of the size the pickle declares for it (a storage: numel x
itemsize; data.pkl: MAX_PICKLE_BYTES) and refused when it declares or holds more (a deflated
bomb); :func:`to_plain` refuses cyclic graphs and ones deeper than MAX_DEPTH or larger than
MAX_NODES (:class:`GraphError`). Each is a one-line error naming the file.

Legacy (pre-1.6, non-zip) torch pickles are refused with a clear error: torch.save has written
zip archives by default since torch 1.6 (2020), and Lightning saves checkpoints with
torch.save, so the STEGO (2022) and DepthG (2023, torch 2.0) releases are zip archives.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# The pickle (data.pkl) holds names and geometry only, never tensor data: a few MB at most.
MAX_PICKLE_BYTES = 256 << 20
# Bounds of the object graphs `to_plain` converts (Lightning hyper-parameters: ~10 levels and
# a few hundred values): deeper, larger (shared references count each time they are reached,
# as the plain copy repeats them) or cyclic graphs are refused with `GraphError`.
MAX_DEPTH = 64
MAX_NODES = 100_000

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
    numel = math.prod(size)
    if numel > storage.size:
        # Overlapping strides (an expanded view, or a hostile stride-0 geometry) would
        # materialise more elements than the file holds; weights never need that.
        raise pickle.UnpicklingError(
            f"tensor of size {size} (stride {stride}) has {numel} elements but its storage "
            f"holds {storage.size}: refusing to expand it"
        )
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


# ----------------------------------------------------------------------------- Lightning


class InertObject:
    """Placeholder for an allow-listed class of a Lightning checkpoint; holds data only.

    ``pickled_name`` is the class's dotted name; ``args`` what the pickle passed to its
    constructor (NEWOBJ or REDUCE); ``state`` what it passed to ``__setstate__`` (BUILD).
    """

    pickled_name = ""

    def __new__(cls, *args: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


class InertDict(dict):
    """Placeholder for an allow-listed dict subclass (Lightning's AttributeDict): its items."""

    pickled_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class TypeReference:
    """A type named in the pickle as data (OmegaConf metadata's ``typing.Any``, ``dict``...)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<type {self.name}>"


def _plain_defaultdict(*_factory: Any) -> dict:
    """collections.defaultdict(factory) in a pickle (OmegaConf's resolver cache): a plain dict."""
    return {}


_OMEGACONF_NODES = (
    "AnyNode",
    "StringNode",
    "IntegerNode",
    "FloatNode",
    "BooleanNode",
    "BytesNode",
    "PathNode",
)
# Classes that load as InertObject subclasses.
_INERT_CLASSES = (
    ("omegaconf.dictconfig", "DictConfig"),
    ("omegaconf.listconfig", "ListConfig"),
    ("omegaconf.base", "ContainerMetadata"),
    ("omegaconf.base", "Metadata"),
    *(("omegaconf.nodes", node) for node in _OMEGACONF_NODES),
    *(
        (f"{package}.callbacks.{module}", cls)
        for package in ("pytorch_lightning", "lightning.pytorch")
        for module, cls in (
            ("model_checkpoint", "ModelCheckpoint"),
            ("early_stopping", "EarlyStopping"),
        )
    ),
)
# Dict subclasses that load as InertDict subclasses.
_INERT_DICTS = (
    ("pytorch_lightning.utilities.parsing", "AttributeDict"),
    ("lightning_fabric.utilities.data", "AttributeDict"),
    ("lightning.fabric.utilities.data", "AttributeDict"),
)
# Types that appear as values (protocol 2 spells builtins "__builtin__", int "long").
_TYPE_NAMES = (
    ("typing", "Any"),
    *(
        (module, name)
        for module in ("builtins", "__builtin__")
        for name in ("dict", "list", "tuple", "int", "long", "str", "unicode", "float", "bool")
        + ("bytes", "object")
    ),
)


def _make_lightning_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("collections", "defaultdict"): _plain_defaultdict}
    for module, name in _INERT_CLASSES:
        table[(module, name)] = type(name, (InertObject,), {"pickled_name": f"{module}.{name}"})
    for module, name in _INERT_DICTS:
        table[(module, name)] = type(name, (InertDict,), {"pickled_name": f"{module}.{name}"})
    for module, name in _TYPE_NAMES:
        table[(module, name)] = TypeReference(f"{module}.{name}")
    return table


_LIGHTNING_TABLE = _make_lightning_globals()
#: The names a Lightning checkpoint may pickle besides tensors, as "module.name".
LIGHTNING_GLOBALS: tuple[str, ...] = tuple(sorted(f"{m}.{n}" for m, n in _LIGHTNING_TABLE))


def _is_omegaconf(obj: Any, name: str) -> bool:
    return isinstance(obj, InertObject) and obj.pickled_name == name


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


class GraphError(ValueError):
    """An object graph `to_plain` refuses: cyclic, too deep or too large."""


class _Walk:
    """Bounds a recursive walk: nodes reached (shared ones each time), depth, and cycles."""

    def __init__(self, max_depth: int, max_nodes: int):
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self.nodes = 0
        self.path: set[int] = set()  # ids of the containers being walked

    def visit(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > self.max_nodes:
            raise GraphError(f"hold more than {self.max_nodes} values (shared references repeat)")
        if depth > self.max_depth:
            raise GraphError(f"nest deeper than {self.max_depth} levels")

    @contextlib.contextmanager
    def inside(self, container: Any) -> Iterator[None]:
        if id(container) in self.path:
            raise GraphError(f"contain themselves (a cycle through a {type(container).__name__})")
        self.path.add(id(container))
        try:
            yield
        finally:
            self.path.discard(id(container))


def to_plain(obj: Any, *, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> Any:
    """Placeholders -> plain Python: OmegaConf containers to dicts/lists of their values.

    Arrays and scalars are returned as they are; an InertDict becomes a dict; any other
    placeholder becomes ``{"__class__": name, "state": to_plain(state)}``. Whole-string
    interpolations ``${a.b}`` are resolved against their root config (as OmegaConf does);
    other interpolations stay strings. A graph that is cyclic, nests deeper than max_depth or
    reaches more than max_nodes values (the result's size: shared references repeat) raises
    `GraphError`, as does a result that interpolations made so.
    """
    plain = _to_plain(obj, _Walk(max_depth, max_nodes), 0)
    _count(plain, _Walk(max_depth, max_nodes), 0)
    return plain


def _count(obj: Any, walk: _Walk, depth: int) -> None:
    """Walks a plain result as a consumer (JSON) would, with the same bounds."""
    walk.visit(depth)
    if isinstance(obj, (dict, list, tuple)):
        with walk.inside(obj):
            for v in obj.values() if isinstance(obj, dict) else obj:
                _count(v, walk, depth + 1)


def _to_plain(obj: Any, walk: _Walk, depth: int) -> Any:
    walk.visit(depth)
    if isinstance(obj, InertObject):
        with walk.inside(obj):
            return _inert_to_plain(obj, walk, depth)
    if isinstance(obj, TypeReference):
        return obj.name
    if isinstance(obj, dict):
        with walk.inside(obj):
            return {
                k if isinstance(k, (str, int)) else repr(k): _to_plain(v, walk, depth + 1)
                for k, v in obj.items()
            }
    if isinstance(obj, (list, tuple)):
        with walk.inside(obj):
            return type(obj)(_to_plain(v, walk, depth + 1) for v in obj)
    return obj


def _inert_to_plain(obj: InertObject, walk: _Walk, depth: int) -> Any:
    state = obj.state if isinstance(obj.state, dict) else {}
    if obj.pickled_name.startswith("omegaconf.nodes."):
        return _to_plain(state.get("_val"), walk, depth + 1)
    if _is_omegaconf(obj, "omegaconf.dictconfig.DictConfig"):
        content = state.get("_content")
        if not isinstance(content, dict):
            return content  # None, "???" (missing) or an interpolation string
        with walk.inside(content):
            plain = {str(k): _to_plain(v, walk, depth + 1) for k, v in content.items()}
        if state.get("_parent") is None:  # a root config: interpolations refer to it
            for _ in range(8):  # a few rounds resolve chains of interpolations
                if not _resolve(plain, plain, _Walk(walk.max_depth, walk.max_nodes), 0):
                    break
        return plain
    if _is_omegaconf(obj, "omegaconf.listconfig.ListConfig"):
        content = state.get("_content")
        if isinstance(content, list):
            with walk.inside(content):
                return [_to_plain(v, walk, depth + 1) for v in content]
        return content
    return {"__class__": obj.pickled_name, "state": _to_plain(obj.state, walk, depth + 1)}


def _lookup(root: dict, dotted: str) -> Any:
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _resolve(tree: Any, root: dict, walk: _Walk, depth: int) -> bool:
    """Replaces resolvable ``${a.b}`` strings in place; True if anything changed."""
    walk.visit(depth)
    changed = False
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    with walk.inside(tree):
        for key, value in list(items):
            if isinstance(value, str) and (match := _INTERPOLATION.match(value)):
                try:
                    tree[key] = _lookup(root, match.group(1))
                    changed = True
                except KeyError:
                    pass
            elif isinstance(value, (dict, list)):
                changed |= _resolve(value, root, walk, depth + 1)
    return changed


# ----------------------------------------------------------------------------- unpickling


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from the zip archive."""

    def __init__(
        self,
        data: bytes,
        archive: zipfile.ZipFile,
        root: str,
        byteorder: str,
        lightning: bool = False,
    ):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._byteorder = byteorder
        self._lightning = lightning
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if self._lightning and key in _LIGHTNING_TABLE:
            return _LIGHTNING_TABLE[key]
        allowed = (
            "tensor data and the OmegaConf/Lightning names of depthg_jax.models.pth."
            "LIGHTNING_GLOBALS are allowed in checkpoints"
            if self._lightning
            else "only tensor data is allowed in weight files"
        )
        raise UnsafePickleError(f"refusing to load global {module}.{name}: {allowed}")

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
        if numel < 0:
            raise pickle.UnpicklingError(f"storage {name} declares {numel} elements")
        raw = read_entry(self._archive, name, numel * dtype.itemsize, exact=True)
        order = "<" if self._byteorder == "little" else ">"
        return raw.view(dtype.newbyteorder(order)).astype(dtype, copy=False)


def read_entry(archive: zipfile.ZipFile, name: str, size: int, *, exact: bool) -> np.ndarray:
    """The bytes of a zip entry (uint8), streamed into a buffer of at most `size` bytes.

    An entry whose declared uncompressed size exceeds `size` is refused before anything is
    decompressed (a deflated entry of zeros can expand a thousandfold), and reading stops at
    `size` whatever the entry holds. exact: the entry must hold exactly `size` bytes.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise pickle.UnpicklingError(f"entry {name} missing from the archive") from None
    if info.file_size > size:
        raise pickle.UnpicklingError(
            f"entry {name} declares {info.file_size} bytes uncompressed, more than the {size} "
            "it may hold (a zip bomb?)"
        )
    # Compression never grows data by more than a fraction: a longer compressed stream holds
    # more than the entry declares (reading would stop at the declared size; refuse instead).
    if info.compress_type != zipfile.ZIP_STORED and info.compress_size > (
        info.file_size + info.file_size // 64 + 1024
    ):
        raise pickle.UnpicklingError(
            f"entry {name} has {info.compress_size} compressed bytes for the {info.file_size} it "
            "declares: it holds more than it says (a zip bomb?)"
        )
    buffer = np.empty(info.file_size, np.uint8)
    view, got = memoryview(buffer), 0
    with archive.open(info) as f:
        while got < info.file_size:
            n = f.readinto(view[got : got + (1 << 24)])
            if not n:
                break
            got += n
    if got < (size if exact else info.file_size):
        raise pickle.UnpicklingError(f"entry {name} holds {got} bytes, expected {size}")
    return buffer


def _find_root(archive: zipfile.ZipFile, path: Path) -> str:
    roots = [n[: -len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    roots = [r for r in roots if "/" not in r]
    if len(roots) != 1:
        raise ValueError(f"{path}: not a torch.save zip archive (found data.pkl at {roots})")
    return roots[0]


def load_pth(path: str | Path, *, lightning: bool = False) -> Any:
    """Loads a torch.save zip file as nested Python containers of numpy arrays.

    With ``lightning=True`` the names in LIGHTNING_GLOBALS (OmegaConf containers, Lightning's
    AttributeDict and callback classes, type references) load as inert placeholders.
    Raises ValueError for files that are not zip archives written by torch (including
    truncated ones), and UnsafePickleError if the pickle names any other global.
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
            byteorder = "little"
            if f"{root}/byteorder" in archive.namelist():
                byteorder = read_entry(archive, f"{root}/byteorder", 16, exact=False)
                byteorder = byteorder.tobytes().decode().strip()
            data = read_entry(archive, f"{root}/data.pkl", MAX_PICKLE_BYTES, exact=False)
            return _RestrictedUnpickler(data.tobytes(), archive, root, byteorder, lightning).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except MemoryError as e:
            raise ValueError(f"{path}: a tensor needs more memory than there is ({e})") from e
        except Exception as e:  # any other failure means a damaged file, never code run
            raise ValueError(f"{path}: corrupt torch file: {e}") from e
