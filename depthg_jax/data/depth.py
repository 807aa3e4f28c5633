"""Depth maps for a whole image folder, resumable, never touching the images.

Usage
-----
Install the optional extra once (transformers + torch for the PyTorch path, huggingface_hub for
hub downloads; the rest of depthg-jax does not need it):

    pip install -e '.[depth]'

Then, for each dataset, point `--images` at its image folder and `--out` at the depth folder
the dataset reads. Sub-folders of `--images` are mirrored under `--out`.

To reproduce the paper, generate the depth maps as the release did: ZoeDepth NYU (ZoeD_N)
with its input padding and flip test-time augmentation, min-max normalised per image to 8 bit:

    python -m depthg_jax.data.depth --images=COCO/images --out=COCO/depth \
        --model=Intel/zoedepth-nyu --flip_tta

Without those two flags the command runs Depth Anything V2 Small, much faster, as the
alternative (its maps differ from the released ones), on the JAX path (below):

    # `directory` layout: <root>/images/<split>/<id>.png -> <root>/depth/<split>/<id>_zoedepth.png
    python -m depthg_jax.data.depth --images=ROOT/images --out=ROOT/depth
    # COCO-Stuff: images/train2017/*.jpg -> depth/train2017/*_zoedepth.png
    python -m depthg_jax.data.depth --images=COCO/images --out=COCO/depth
    # Cityscapes: leftImg8bit/<split>/<city>/*.png -> depth/<split>/<city>/*_zoedepth.png
    python -m depthg_jax.data.depth --images=CITYSCAPES/leftImg8bit --out=CITYSCAPES/depth
    # Potsdam: imgs/*.mat (or .png) -> depth/*_zoedepth.png
    python -m depthg_jax.data.depth --images=POTSDAM/imgs --out=POTSDAM/depth

Flags: `--model` a Hugging Face hub name (needs network the first time, then cached) or a
local directory written by `save_pretrained` / `hf download NAME --local-dir DIR`; default
Depth Anything V2 Small; `Intel/zoedepth-nyu` for the release's maps. Any transformers
depth-estimation model works (Depth Anything, DPT/MiDaS, ZoeDepth, GLPN, Depth Pro).
`--backend` auto (default: JAX for Depth Anything, PyTorch for the rest), jax or torch.
`--flip_tta` also runs each image mirrored left-right and averages the prediction with the
mirrored-back prediction of the mirrored image (ZoeDepth's `infer(with_flip_aug=True)`).
`--batch_size` images per forward pass (default 8; per host with JAX).
`--format` png8 (default, what DepthG trains on), png16 or npy. `--device` auto (GPU if
present), cpu or cuda (PyTorch). `--dtype` float32 (full matmul precision) or bfloat16 (JAX).
`--nearest_is` overrides which end of the model's output is near. `--help` lists them all.

The JAX path (`--backend=jax`): Depth Anything V2 in flax (models/depth_anything.py) from a
`save_pretrained` / `-hf` folder, a hub name, or an official `depth_anything_v2_vit*.pth`
(read without torch). Preprocessing is transformers' DPT processor's (PIL resize keeping the
aspect ratio to multiples of 14, bit-exact normalisation), done on the host in reader threads;
the jitted forward (normalise, model, optional flip average) runs once per preprocessed shape,
the batch padded to a fixed size and split over this host's devices; the upsampling to the
image size (PyTorch's bicubic, as the processor's post-processing) and the PNG writes run in
writer threads. Images are ordered by preprocessed shape (read from their headers), so each
shape compiles once and only its last batch is partial. With several processes
(`--coordinator_address/--num_processes/--process_id`, or `--distributed` on TPU/SLURM) every
process lists the same images (checked), takes every n-th one of the sorted list, and writes
only those: hosts never wait on each other, and a rerun resumes each share.

Output files (see `depth_io`): png8 `<id>_zoedepth.png`, uint8, per-image min-max normalised,
floor(x·255), 0 = nearest; png16 `<id>_zoedepth_16.png`, the same ×65535; npy `<id>_depth.npy`,
float32, larger = farther, not normalised. Depth Anything (relative) and DPT/MiDaS predict
inverse depth (large = near) and are flipped; ZoeDepth, GLPN, Depth Pro and Depth Anything
metric predict depth (large = far) and are kept. Each map has its image's size: one forward
pass per image at the model's resolution (two with --flip_tta), no gradients, then bicubic
resize. ZoeDepth's processor pads each image by reflection, int(sqrt(H/2)·3) rows and
int(sqrt(W/2)·3) columns on each side, before resizing; the prediction is resized bicubically
to the padded size and the padding cropped off (as transformers'
`ZoeDepthImageProcessor.post_process_depth_estimation` does, which needs torchvision; ours
needs only torch), then min-max normalised as above.

Safety: files are written atomically (temporary file + rename) and only under `--out`;
`--out` inside `--images` is refused. Existing outputs are skipped, so rerunning after an
interruption resumes, and a finished folder costs nothing (the model is not even loaded).
Unreadable images are reported and skipped; the summary lists written / skipped / failed and
the exit code is 1 if anything failed (2 for bad arguments or an unloadable model).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from depthg_jax import commands
from depthg_jax.data import depth_io
from depthg_jax.data import images as images_lib
from depthg_jax.data.depth_io import NearestIs
from depthg_jax.runtime import distributed

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
# What the release generated its depth maps with (ZoeD_N), to use with flip_tta=True.
RELEASE_MODEL = "Intel/zoedepth-nyu"
# ZoeDepth's reflection padding: int(sqrt(side / 2) * 3) pixels on each side of each axis.
ZOEDEPTH_PAD_FACTOR = 3
DTYPES = ("float32", "bfloat16")
EXTRA_HINT = "pip install -e '.[depth]'  (installs requirements-depth.txt: transformers, torch)"
# Model types whose output is depth (large = far) or inverse depth (large = near).
_DEPTH_TYPES = {"zoedepth", "glpn", "depth_pro"}
_INVERSE_DEPTH_TYPES = {"dpt"}  # DPT checkpoints on the hub are MiDaS: relative inverse depth.


class DepthGenError(Exception):
    """A problem with the arguments or the model; the command exits with status 2."""


@dataclasses.dataclass
class Summary:
    """What a run did: counts and, for each failed image, the reason."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DepthModel:
    """A loaded transformers depth estimator with its preprocessing and output orientation."""

    model: Any
    processor: Any
    nearest_is: NearestIs
    device: Any


@dataclasses.dataclass
class _Item:
    rel: Path
    out_path: Path
    size: tuple[int, int] = (0, 0)  # (H, W) of the input image.
    pixel_values: Any = None  # (1, 3, h, w) torch tensor from the processor.
    error: str | None = None


def import_backend() -> tuple[Any, Any]:
    """Imports torch and transformers, or raises DepthGenError naming the optional extra."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise DepthGenError(
            f"depth generation needs the optional 'depth' extra ({e.name} is missing): {EXTRA_HINT}"
        ) from e
    return torch, transformers


def infer_nearest_is(config: Any) -> NearestIs:
    """Which end of a transformers depth model's raw output is near, from its config.

    "large" for inverse depth (Depth Anything relative, DPT/MiDaS), "small" for depth
    (Depth Anything metric, ZoeDepth, GLPN, Depth Pro). Unknown types raise DepthGenError.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in ("depth_anything", "prompt_depth_anything"):
        kind = getattr(config, "depth_estimation_type", "relative")
        return "large" if kind == "relative" else "small"
    if model_type in _INVERSE_DEPTH_TYPES:
        return "large"
    if model_type in _DEPTH_TYPES:
        return "small"
    raise DepthGenError(
        f"cannot tell whether model type {model_type!r} predicts depth or inverse depth; "
        "pass --nearest_is=small (depth, large = far) or --nearest_is=large (disparity)"
    )


def resolve_device(torch: Any, device: str) -> Any:
    """'auto' → CUDA if available else CPU; 'cuda' without a GPU raises DepthGenError."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DepthGenError(f"--device={device} asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect: avoids minutes of download retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_depth_model(
    name_or_path: str = DEFAULT_MODEL, device: str = "auto", nearest_is: NearestIs | None = None
) -> DepthModel:
    """Loads `AutoModelForDepthEstimation` + `AutoImageProcessor` by hub name or local path.

    Local directories load without network. A hub name is looked up in the local cache
    first; if missing and the hub is unreachable, or the name is unknown, DepthGenError says
    how to pass a local path. `nearest_is` overrides the orientation read from the config.
    """
    torch, transformers = import_backend()
    local = _looks_like_path(name_or_path)
    if local:
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise DepthGenError(
                f"--model={name_or_path}: no such directory; pass a folder written by "
                "save_pretrained (config.json, weights, preprocessor_config.json) or a hub name"
            )
        name_or_path = str(path)

    def load(local_only: bool) -> tuple[Any, Any]:
        processor = transformers.AutoImageProcessor.from_pretrained(
            name_or_path, local_files_only=local_only
        )
        model = transformers.AutoModelForDepthEstimation.from_pretrained(
            name_or_path, local_files_only=local_only
        )
        return model, processor

    how = (
        "pass --model=DIR, a local folder holding the model (on a machine with network: "
        f"`hf download {name_or_path} --local-dir DIR`, or save_pretrained)"
    )
    try:
        model, processor = load(local_only=True)
    except (OSError, ValueError, KeyError) as e:
        if local:
            raise DepthGenError(f"could not load depth model from {name_or_path}: {e}") from e
        if not _hub_reachable():
            raise DepthGenError(
                f"depth model {name_or_path!r} is not in the local Hugging Face cache and the hub "
                f"is unreachable (no network or HF_HUB_OFFLINE set); {how}"
            ) from e
        try:
            model, processor = load(local_only=False)
        except (OSError, ValueError, KeyError) as e2:
            raise DepthGenError(
                f"could not load depth model {name_or_path!r} (unknown hub name, or not a "
                f"depth-estimation model?): {e2}; check the name or {how}"
            ) from e2
    dev = resolve_device(torch, device)
    model.to(dev).eval()
    return DepthModel(model, processor, nearest_is or infer_nearest_is(model.config), dev)


def check_locations(images_dir: Path, out_dir: Path) -> None:
    """Refuses an --out that is --images or lies inside it (outputs would mix with inputs)."""
    if not images_dir.is_dir():
        raise DepthGenError(f"--images={images_dir}: not a directory")
    if depth_io.is_within(out_dir, images_dir):
        raise DepthGenError(
            f"--out={out_dir} is inside --images={images_dir}; choose a folder outside the "
            "images (e.g. a sibling 'depth' folder) so inputs are never touched"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise DepthGenError(f"--out={out_dir} exists and is not a directory")


def plan_outputs(
    images_dir: Path, out_dir: Path, fmt: str, share: tuple[int, int] = (0, 1)
) -> tuple[list[_Item], int]:
    """Lists the images still to do (output missing) and counts those already done, among
    this process's share: `share` = (index, count) takes every count-th image of the sorted
    list from the index-th, so processes split the folder the same way however much of it
    is already done."""
    rels = images_lib.find_images(images_dir)
    if share[1] > 1:
        check_same_listing(rels)
    collisions = depth_io.find_output_collisions(rels, fmt)
    if collisions:
        out, ins = next(iter(collisions.items()))
        raise DepthGenError(
            f"{len(collisions)} outputs would be written by several images, e.g. {out} by "
            f"{', '.join(map(str, ins))}; keep one image per name"
        )
    todo, done = [], 0
    nested = depth_io.is_within(images_dir, out_dir)
    for rel in rels[share[0] :: share[1]]:
        out_path = out_dir / depth_io.map_output_path(rel, fmt)
        # --images inside --out: an output must still never land in the images' tree.
        if nested and depth_io.is_within(out_path.parent, images_dir):
            raise DepthGenError(f"output {out_path} would lie inside --images={images_dir}")
        if out_path.exists():
            done += 1
        else:
            todo.append(_Item(rel, out_path))
    return todo, done


def check_same_listing(rels: Sequence[Path]) -> None:
    """Raises DepthGenError on every process unless all processes listed the same images (a
    collective: every process must call it)."""
    from jax.experimental import multihost_utils

    digest = hashlib.sha256("\n".join(map(str, rels)).encode()).digest()[:8]
    mine = np.frombuffer(digest, np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
    if not np.all(every == every[0]):
        raise DepthGenError(
            f"the processes list different images under --images ({len(rels)} here): every "
            "host must see the same folder (a shared filesystem or identical copies)"
        )


def _prepare(item: _Item, images_dir: Path, preprocess: Callable[[np.ndarray], Any]) -> _Item:
    """Reads and preprocesses one image (runs in a worker thread); errors are recorded."""
    try:
        image = images_lib.read_image(images_dir / item.rel)
        item.size = image.shape[:2]
        item.pixel_values = preprocess(image)
    except Exception as e:  # Any unreadable file is reported, the run goes on.
        item.error = f"unreadable image: {type(e).__name__}: {e}"
    return item


def zoedepth_padding(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) ZoeDepth's processor pads on each side of an height x width image."""
    return (
        int(np.sqrt(height / 2) * ZOEDEPTH_PAD_FACTOR),
        int(np.sqrt(width / 2) * ZOEDEPTH_PAD_FACTOR),
    )


def remove_zoedepth_padding(predicted: Any, sizes: Sequence[tuple[int, int]], padded: bool = True):
    """ZoeDepth predictions (B, h, w) -> one (H, W) torch map per source size (H, W).

    Each map is resized (bicubic, align_corners False, no antialiasing) to the padded input
    size (H + 2·pad_h, W + 2·pad_w) and the padding cropped off; `padded=False` (a processor
    with do_pad off) resizes straight to (H, W).
    """
    import torch

    if len(predicted) != len(sizes):
        raise ValueError(f"{len(predicted)} predictions for {len(sizes)} source sizes")
    maps = []
    for depth, (h, w) in zip(predicted, sizes, strict=True):
        ph, pw = zoedepth_padding(h, w) if padded else (0, 0)
        full = torch.nn.functional.interpolate(
            depth[None, None].float(),
            size=(h + 2 * ph, w + 2 * pw),
            mode="bicubic",
            align_corners=False,
        )[0, 0]
        maps.append(full[ph : ph + h, pw : pw + w])
    return maps


def flip_average(predicted: Any, predicted_flipped: Any) -> Any:
    """Flip test-time augmentation: mean of the prediction and the mirrored-back prediction of
    the mirrored input, both (B, h, w)."""
    import torch

    if predicted.shape != predicted_flipped.shape:
        raise ValueError(
            f"prediction {tuple(predicted.shape)} and flipped prediction "
            f"{tuple(predicted_flipped.shape)} differ in shape"
        )
    return (predicted + torch.flip(predicted_flipped, dims=[-1])) / 2


def _post_process(dm: DepthModel, predicted: Any, items: Sequence[_Item]) -> list[np.ndarray]:
    """Model output → one (H, W) float32 map per item, at the input image's size."""
    sizes = [tuple(int(s) for s in it.size) for it in items]
    if dm.model.config.model_type == "zoedepth":
        padded = bool(getattr(dm.processor, "do_pad", True))
        maps = remove_zoedepth_padding(predicted.predicted_depth, sizes, padded)
        return [m.cpu().numpy().reshape(s) for m, s in zip(maps, sizes, strict=True)]
    post = getattr(dm.processor, "post_process_depth_estimation", None)
    if post is None:  # Older processors: resize ourselves, bicubic like the pipelines.
        import torch

        maps = [
            torch.nn.functional.interpolate(p[None, None], size=s, mode="bicubic")[0, 0]
            for p, s in zip(predicted.predicted_depth, sizes, strict=True)
        ]
    else:
        maps = [r["predicted_depth"] for r in post(predicted, target_sizes=sizes)]
    return [m.float().cpu().numpy().reshape(s) for m, s in zip(maps, sizes, strict=True)]


def predict_depth(
    dm: DepthModel, items: Sequence[_Item], flip_tta: bool = False
) -> list[np.ndarray]:
    """One no-grad forward for items whose preprocessed tensors share a shape.

    flip_tta: a second forward on the inputs mirrored left-right; the raw predictions are
    averaged with `flip_average` before post-processing (for ZoeDepth that is transformers'
    `outputs_flipped` and the released `infer(with_flip_aug=True)`).
    """
    import torch
    from transformers.modeling_outputs import DepthEstimatorOutput

    batch = torch.cat([it.pixel_values for it in items]).to(dm.device)
    with torch.inference_mode():
        out = dm.model(pixel_values=batch)
        if flip_tta:
            flipped = dm.model(pixel_values=torch.flip(batch, dims=[-1]))
            averaged = flip_average(out.predicted_depth, flipped.predicted_depth)
            out = DepthEstimatorOutput(predicted_depth=averaged)
    return _post_process(dm, out, items)


def _prefetch(
    items: Sequence[_Item], prepare: Callable[[_Item], _Item], pool: ThreadPoolExecutor, depth: int
) -> Iterator[_Item]:
    """Prepares items in the pool, at most `depth` ahead, yielding them in order."""
    queue: collections.deque[Future] = collections.deque()
    it = iter(items)
    for item in it:
        queue.append(pool.submit(prepare, item))
        if len(queue) >= depth:
            break
    while queue:
        yield queue.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(prepare, nxt))


# --- The JAX backend ---------------------------------------------------------------------------


@dataclasses.dataclass
class JaxDepthModel:
    """A Depth Anything in flax: its shape, float32 numpy params, preprocessing, orientation."""

    spec: Any  # depth_anything.DepthAnythingSpec
    params: Any
    preprocess: Any  # convert_depth_anything.PreprocessSpec
    nearest_is: NearestIs
    source: str = ""


def _hub_hint(name: str) -> str:
    return (
        "pass --model=DIR, a local folder holding the model (on a machine with network: "
        f"`hf download {name} --local-dir DIR`, or save_pretrained)"
    )


def locate_model(name_or_path: str) -> Path:
    """A local folder or weights file as is; a hub name -> its snapshot folder in the local
    Hugging Face cache, downloaded first if missing and the hub is reachable (config.json,
    model.safetensors, preprocessor_config.json only). Raises DepthGenError naming what to
    download and where otherwise."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise DepthGenError(
                f"--model={name_or_path}: no such directory; pass a folder written by "
                "save_pretrained (config.json, weights, preprocessor_config.json), an official "
                "depth_anything_v2_vit*.pth, or a hub name"
            )
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DepthGenError(
            f"--model={name_or_path} is a hub name, which needs huggingface_hub ({EXTRA_HINT}); "
            f"or {_hub_hint(name_or_path)}"
        ) from e
    files = ["config.json", "preprocessor_config.json", "*.safetensors"]
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=files, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any miss: not cached
        if not _hub_reachable():
            raise DepthGenError(
                f"depth model {name_or_path!r} is not in the local Hugging Face cache and the "
                f"hub is unreachable (no network or HF_HUB_OFFLINE set); {_hub_hint(name_or_path)}"
            ) from e
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=files))
    except Exception as e:  # noqa: BLE001 - unknown names, gated repos, network errors
        raise DepthGenError(
            f"could not download depth model {name_or_path!r} (unknown hub name?): {e}; check "
            f"the name or {_hub_hint(name_or_path)}"
        ) from e


def choose_backend(model: str | Path, backend: str = "auto") -> str:
    """ "jax" or "torch": `backend` unless "auto"; auto runs Depth Anything (a folder or hub
    model whose config says depth_anything, or an official .pth / a .safetensors file) with
    JAX and everything else (ZoeDepth, DPT, GLPN, ...) with PyTorch."""
    if backend in ("jax", "torch"):
        return backend
    if backend != "auto":
        raise DepthGenError(f"--backend={backend}: expected auto, jax or torch")
    path = locate_model(str(model))
    if path.is_file():
        return "jax"
    config = path / "config.json"
    if not config.is_file():
        raise DepthGenError(f"--model={model}: {path} has no config.json")
    model_type = json.loads(config.read_text()).get("model_type")
    return "jax" if model_type == "depth_anything" else "torch"


def load_jax_model(name_or_path: str, nearest_is: NearestIs | None = None) -> JaxDepthModel:
    """A Depth Anything V2 for the JAX path from a save_pretrained / -hf folder, a hub name
    (cached or downloaded) or an official ``depth_anything_v2_vit{s,b,l}.pth``."""
    from depthg_jax.models import convert_depth_anything as convert_da

    path = locate_model(name_or_path)
    try:
        if path.is_file():
            if path.suffix == ".safetensors":
                state = convert_da.read_state_dict(path)
                spec = convert_da.infer_spec(state)
                spec_params = spec, convert_da.convert_state_dict(state, spec)
                loaded = (*spec_params, convert_da.PreprocessSpec())
            else:
                loaded = convert_da.load_official(path)
        else:
            loaded = convert_da.load_hf_folder(path)
    except (OSError, ValueError, KeyError) as e:
        raise DepthGenError(f"could not load Depth Anything from {path}: {e}") from e
    spec, params, preprocess = loaded
    orientation = nearest_is or ("large" if spec.depth_type == "relative" else "small")
    return JaxDepthModel(spec, params, preprocess, orientation, str(path))


@functools.lru_cache(maxsize=8)
def _jax_forward(spec: Any, dtype: str, flip_tta: bool, stats: tuple, mesh: Any) -> Callable:
    """The jitted forward (uint8 images -> depth at the input size), one per model shape and
    options, so its compiled programs are reused by every run in the process."""
    import jax
    import jax.numpy as jnp

    from depthg_jax.models import depth_anything as da
    from depthg_jax.runtime import sharding, xla

    # On XLA:CPU the einsum/softmax attention beats jax.nn.dot_product_attention's XLA path
    # (the whole Small model: 2.8 against 3.4 CPU-s per 518x686 image, bench/RESULTS.md);
    # elsewhere the ViT picks (cuDNN flash attention on CUDA in bfloat16).
    attention = "explicit" if jax.default_backend() == "cpu" else "auto"
    model = da.DepthAnything(spec, jnp.dtype(dtype), attention=attention)
    table = da.normalisation_table(*stats)
    exact = jnp.dtype(dtype) == jnp.float32  # float32 at full matmul precision everywhere

    def forward(params, images):
        with jax.default_matmul_precision("float32") if exact else contextlib.nullcontext():
            x = da.normalise(images, jnp.asarray(table))
            pred = model.apply({"params": params}, x)
            if flip_tta:
                flipped = model.apply({"params": params}, x[:, :, ::-1])
                pred = (pred + flipped[:, :, ::-1]) / 2
        return pred

    return xla.jit(forward, out_shardings=sharding.batch_sharding(mesh))


class JaxPredictor:
    """The JAX path's per-host runner: the model replicated on this host's devices, batches
    split over them (runtime.sharding's 1-D 'data' mesh of the local devices), one jitted
    forward compiled once per preprocessed shape, every batch padded to the same size.

    Hosts never exchange data: each writes its own share of the images (see plan_outputs).
    `submit` dispatches asynchronously; `collect` waits and upsamples each map to its image.
    """

    def __init__(self, jm: JaxDepthModel, batch_size: int, dtype: str, flip_tta: bool):
        import jax

        from depthg_jax.runtime import sharding

        self.jm = jm
        self.mesh = sharding.make_mesh(jax.local_devices())
        n = sharding.data_size(self.mesh)
        self.batch = -(-batch_size // n) * n  # padded to a multiple of the local devices
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.params = jax.device_put(jm.params, sharding.replicated(self.mesh))
        pre = jm.preprocess
        self.forward = _jax_forward(
            jm.spec, dtype, flip_tta, (pre["mean"], pre["std"], pre["rescale"]), self.mesh
        )
        self.shapes: set[tuple[int, int]] = set()

    def preprocessed_size(self, height: int, width: int) -> tuple[int, int]:
        from depthg_jax.models import depth_anything as da

        pre = self.jm.preprocess
        return da.preprocessed_size(
            height, width, pre["size"], pre["multiple"], pre["keep_aspect_ratio"]
        )

    def input_shape(self, path: Path) -> tuple[int, int]:
        """The preprocessed (h, w) of an image file, from its header where PIL reads one;
        (0, 0) if unreadable (it fails, and is reported, when read)."""
        try:
            if path.suffix.lower() == ".mat":
                return self.preprocessed_size(*images_lib.read_image(path).shape[:2])
            with Image.open(path) as image:
                return self.preprocessed_size(image.height, image.width)
        except Exception:  # noqa: BLE001 - reported by _prepare
            return (0, 0)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        from depthg_jax.models import depth_anything as da

        size = self.preprocessed_size(*image.shape[:2])
        return da.resize_image(image, size, self.jm.preprocess["resample"])

    def submit(self, items: Sequence[_Item]) -> Any:
        import jax

        if len(items) > self.batch:
            raise ValueError(f"{len(items)} images for a batch of {self.batch}")
        images = np.stack([it.pixel_values for it in items])
        if len(images) < self.batch:  # the same batch every call: one compile per image shape
            pad = np.repeat(images[-1:], self.batch - len(images), axis=0)
            images = np.concatenate([images, pad])
        self.shapes.add(images.shape[1:3])
        return self.forward(self.params, jax.device_put(images, self.batch_sharding))

    def collect(self, handle: Any, items: Sequence[_Item]) -> list[np.ndarray]:
        from depthg_jax.models import depth_anything as da

        pred = np.asarray(handle)
        return [da.upsample_depth(p, tuple(it.size)) for p, it in zip(pred, items, strict=False)]


class TorchPredictor:
    """The PyTorch path (any transformers depth model): synchronous, one forward per batch."""

    def __init__(self, dm: DepthModel, flip_tta: bool):
        self.dm, self.flip_tta = dm, flip_tta

    def preprocess(self, image: np.ndarray) -> Any:
        return self.dm.processor(images=image, return_tensors="pt")["pixel_values"]

    def submit(self, items: Sequence[_Item]) -> Any:
        return predict_depth(self.dm, items, self.flip_tta)

    def collect(self, handle: Any, items: Sequence[_Item]) -> list[np.ndarray]:
        return handle


def _done_future(fn: Callable[[], Any]) -> Future:
    """Runs fn now; its result or exception in a completed Future."""
    future: Future = Future()
    try:
        future.set_result(fn())
    except Exception as e:  # noqa: BLE001 - handed to whoever reads the future
        future.set_exception(e)
    return future


def _failed_future(error: Exception) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def generate_depth(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | DepthModel | JaxDepthModel = DEFAULT_MODEL,
    *,
    fmt: str = "png8",
    batch_size: int = 8,
    device: str = "auto",
    nearest_is: NearestIs | None = None,
    flip_tta: bool = False,
    progress: bool = True,
    on_image_done: Callable[[Path, Path], None] | None = None,
    backend: str = "auto",
    dtype: str = "float32",
) -> Summary:
    """Writes one depth file under `out_dir` for every image under `images_dir` lacking one.

    `model` is a hub name, a local path or an already loaded DepthModel (PyTorch) or
    JaxDepthModel (loaded only if there is work to do). `backend` "auto" runs Depth Anything
    with JAX and other models with PyTorch (`choose_backend`). Images whose preprocessed
    inputs share a shape are batched, up to `batch_size` per forward pass on this host (with
    `flip_tta` also once mirrored). With several JAX processes each writes its share
    (`plan_outputs`). `on_image_done(rel, out_path)` runs after each write, in order.
    Raises DepthGenError for bad locations, formats or models; per-image failures are
    collected in the returned Summary instead.
    """
    if fmt not in depth_io.FORMATS:
        raise DepthGenError(f"--format={fmt}: expected one of {', '.join(depth_io.FORMATS)}")
    if batch_size < 1:
        raise DepthGenError(f"--batch_size={batch_size}: must be at least 1")
    if dtype not in DTYPES:
        raise DepthGenError(f"--dtype={dtype}: expected one of {', '.join(DTYPES)}")
    images_dir, out_dir = Path(images_dir).expanduser(), Path(out_dir).expanduser()
    check_locations(images_dir, out_dir)
    if isinstance(model, JaxDepthModel | DepthModel):
        backend = "jax" if isinstance(model, JaxDepthModel) else "torch"
    share = (0, 1)
    if backend != "torch":
        import jax

        share = (jax.process_index(), jax.process_count())
    todo, done = plan_outputs(images_dir, out_dir, fmt, share)
    summary = Summary(skipped=done)
    where = f" (process {share[0]} of {share[1]}: its share)" if share[1] > 1 else ""
    print(
        f"depth: {len(todo) + done} images under {images_dir}{where}, {done} already done, "
        f"{len(todo)} to write into {out_dir}",
        file=sys.stderr,
    )
    if not todo:
        return summary
    if isinstance(model, str | os.PathLike):
        backend = choose_backend(model, backend)
    if backend == "jax":
        jm = model if isinstance(model, JaxDepthModel) else load_jax_model(str(model), nearest_is)
        predictor = JaxPredictor(jm, batch_size, dtype, flip_tta)
        orientation, writers = nearest_is or jm.nearest_is, max(1, min(4, os.cpu_count() or 1))
    else:
        dm = model if isinstance(model, DepthModel) else load_depth_model(model, device, nearest_is)
        predictor = TorchPredictor(dm, flip_tta)
        orientation, writers = nearest_is or dm.nearest_is, 0
    print(f"depth: {backend} backend, batch {batch_size} per forward", file=sys.stderr)

    bar = tqdm(total=len(todo), unit="img", desc="depth", disable=not progress, file=sys.stderr)
    pending: collections.deque[tuple[list[_Item], Future]] = collections.deque()
    start = time.perf_counter()

    def write(items: list[_Item], handle: Any) -> None:
        """Waits for a batch, upsamples, encodes and writes it (a writer thread for JAX)."""
        maps = predictor.collect(handle, items)
        for item, depth in zip(items, maps, strict=True):
            try:
                depth_io.save_depth(item.out_path, depth_io.encode_depth(depth, fmt, orientation))
            except (OSError, ValueError) as e:
                item.error = f"could not write {item.out_path}: {type(e).__name__}: {e}"

    def finish(items: list[_Item]) -> None:
        try:
            handle = predictor.submit(items)
        except Exception as e:  # noqa: BLE001 - isolated below
            pending.append((items, _failed_future(e)))
        else:
            task = lambda: write(items, handle)
            pending.append((items, writer_pool.submit(task) if writers else _done_future(task)))
        while pending and (len(pending) > writers or pending[0][1].done()):
            drain()

    def drain() -> None:
        items, future = pending.popleft()
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - a failed batch: isolate the image that breaks it
            if len(items) > 1:
                for item in items:
                    finish([item])
                    while pending:
                        drain()
                return
            items[0].error = f"depth model failed: {type(e).__name__}: {e}"
        for item in items:
            record(item)

    def record(item: _Item) -> None:
        item.pixel_values = None
        if item.error is None:
            summary.written += 1
            if on_image_done is not None:
                on_image_done(item.rel, item.out_path)
        else:
            summary.failed.append((item.rel, item.error))
            tqdm.write(f"depth: {item.rel}: {item.error}", file=sys.stderr)
        bar.update(1)

    # Group by preprocessed shape (images of other aspect ratios cannot share a batch) and
    # bound what waits in memory: past `window` images pending, the fullest group runs. The
    # JAX path first orders the images by their preprocessed shape (from the files' headers),
    # so each shape's batches run together: full batches but one per shape, and a group is
    # done as soon as the next shape starts.
    window = 2 * batch_size if backend == "torch" else max(8 * batch_size, 64)
    groups: dict[tuple[int, ...], list[_Item]] = {}
    workers = max(1, min(4, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="depth-read")
    writer_pool = ThreadPoolExecutor(max_workers=max(writers, 1), thread_name_prefix="depth-write")
    try:
        if isinstance(predictor, JaxPredictor):
            shapes = list(pool.map(lambda it: predictor.input_shape(images_dir / it.rel), todo))
            order = sorted(range(len(todo)), key=lambda i: (shapes[i], str(todo[i].rel)))
            todo = [todo[i] for i in order]
        prepare = lambda item: _prepare(item, images_dir, predictor.preprocess)
        for item in _prefetch(todo, prepare, pool, depth=max(2 * batch_size, 8)):
            if item.error is not None:
                record(item)
                continue
            key = tuple(item.pixel_values.shape)
            if isinstance(predictor, JaxPredictor):  # in shape order: other groups are done
                for done_key in [k for k in groups if k != key]:
                    finish(groups.pop(done_key))
            group = groups.setdefault(key, [])
            group.append(item)
            if len(group) >= batch_size:
                finish(groups.pop(key))
            elif sum(map(len, groups.values())) > window:
                finish(groups.pop(max(groups, key=lambda k: len(groups[k]))))
        for key in list(groups):
            finish(groups.pop(key))
        while pending:
            drain()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer_pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    seconds = time.perf_counter() - start
    compiled = ""
    if isinstance(predictor, JaxPredictor):
        compiled = f", {len(predictor.shapes)} input shape(s), one compiled program each"
    print(
        f"depth: {summary.written + len(summary.failed)} images in {seconds:.1f} s "
        f"({(summary.written + len(summary.failed)) / max(seconds, 1e-9):.2f} images/s){compiled}",
        file=sys.stderr,
    )
    return summary


def report(summary: Summary) -> None:
    """Prints the written / skipped / failed summary, failures listed by file."""
    print(
        f"depth: written {summary.written}, skipped {summary.skipped} (already present), "
        f"failed {len(summary.failed)}",
        file=sys.stderr,
    )
    for rel, why in summary.failed:
        print(f"  failed: {rel}: {why}", file=sys.stderr)


def define_flags(fv: flags.FlagValues) -> None:
    """The command-line flags (see the module docstring)."""
    flags.DEFINE_string("images", None, "Folder of input images (walked).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder, mirrors --images' tree.", flag_values=fv)
    flags.DEFINE_string(
        "model",
        DEFAULT_MODEL,
        "Hub name, local folder (save_pretrained / hf download) or, for the JAX backend, an "
        "official depth_anything_v2_vit{s,b,l}.pth.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "backend",
        "auto",
        ["auto", "jax", "torch"],
        "auto: JAX for Depth Anything models, PyTorch (transformers) for the others.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_size", 8, "Images per forward pass (per host with JAX).", flag_values=fv
    )
    flags.DEFINE_enum("format", "png8", list(depth_io.FORMATS), "Output format.", flag_values=fv)
    flags.DEFINE_enum(
        "device", "auto", ["auto", "cpu", "cuda"], "Torch device (PyTorch backend).", flag_values=fv
    )
    flags.DEFINE_enum(
        "dtype",
        "float32",
        list(DTYPES),
        "JAX compute dtype (float32 at full matmul precision; bfloat16 on accelerators).",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "nearest_is",
        None,
        ["small", "large"],
        "Override: which end of the model's raw output is near (default: from the model).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "flip_tta",
        False,
        "Average with the mirrored-back prediction of the mirrored image (the release: "
        f"--model={RELEASE_MODEL} --flip_tta).",
        flag_values=fv,
    )
    flags.DEFINE_bool("progress", True, "Show the progress bar.", flag_values=fv)
    distributed.define_flags(fv)
    flags.mark_flags_as_required(["images", "out"], flag_values=fv)


def run(fv: flags.FlagValues) -> int:
    """Runs the command; returns 0 (all written or present), 1 (some images failed) or 2."""
    if fv.backend != "torch":
        distributed.initialize(fv)
    try:
        summary = generate_depth(
            fv.images,
            fv.out,
            fv.model,
            fmt=fv.format,
            batch_size=fv.batch_size,
            device=fv.device,
            nearest_is=fv.nearest_is,
            flip_tta=fv.flip_tta,
            progress=fv.progress,
            backend=fv.backend,
            dtype=fv.dtype,
        )
    except DepthGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(summary)
    if fv.backend != "torch":
        distributed.sync("depth_maps_written")
    return 1 if summary.failed else 0


def main(argv: Sequence[str]) -> int:
    """Parses argv (without the program name) with this command's own flags and runs it."""
    return commands.run_with_own_flags(
        "python -m depthg_jax.data.depth", define_flags, run, argv, doc=__doc__
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
