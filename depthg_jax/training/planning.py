"""Will a run fit, and how long will it take: the one memory estimate, the chips, the planner's
compile on simulated devices.

`estimate(config, data, model, members)` is the per-device memory of a training step on a
(data, model) mesh from shapes alone (no compile, no allocation): the frozen backbone's
parameters as the rules split them (models/partitioning.py) in their dtype, the trainable
params with their gradient and Adam's two moments (per member of a population), and the
activations the step keeps. Training checks it against the device's memory at start
(`check_fits`), a sweep against its budget (training/sweep.py), and the planner against a
chip's HBM before it compiles anything (`depthg_jax.plan`).

`analyse` reads XLA's memory and cost analyses of a compiled step: argument, output and
temporary bytes per device and FLOPs per device per step (the planner compiles the real step
for abstract inputs on simulated CPU devices of the target mesh's shape, depthg_jax/plan.py).

`CHIPS` lists the accelerators the planner knows: HBM and peak dense bf16 FLOP/s per chip as
their vendors publish them (docs/pods.md#chips gives the sources), and chips per host.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

GIB = 2**30
# The share of a chip's HBM a plan may fill: XLA's runtime, fragmentation and the input
# pipeline's prefetched batches take the rest.
USABLE_FRACTION = 0.9
# Measured CPU time to decode and crop one training pair (anchor + positive, each image,
# depth and label), one thread, 224 px PNG loose files (bench/RESULTS.md, "Input pipeline").
CPU_SECONDS_PER_PAIR = 7.8e-3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # as the vendor states it (GB read as 10^9 bytes, GiB as 2^30)
    peak_bf16_flops: float  # dense
    host_chips: int  # chips per host (a smaller slice sits on one host)

    def chips_per_host(self, count: int) -> int:
        return min(count, self.host_chips)


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 4),
    "v5e": Chip("TPU v5e", 16 * 10**9, 197e12, 8),
    "v5p": Chip("TPU v5p", 95 * 10**9, 459e12, 4),
    "v6e": Chip("TPU v6e", 32 * 10**9, 918e12, 8),
    "H100": Chip("NVIDIA H100 SXM", 80 * 10**9, 989e12, 8),
    "H200": Chip("NVIDIA H200 SXM", 141 * 10**9, 989e12, 8),
    "A100": Chip("NVIDIA A100 SXM 80GB", 80 * 10**9, 312e12, 8),
}


def parse_chips(text: str) -> tuple[str, int]:
    """ "v5e-64" -> ("v5e", 64); also "H100-8" and "8xH100"."""
    text = text.strip()
    name, count = None, None
    if "x" in text and text.split("x", 1)[0].isdigit():
        count, name = text.split("x", 1)
    elif "-" in text:
        name, count = text.rsplit("-", 1)
    if name not in CHIPS or not (count or "").isdigit() or int(count) < 1:
        raise ValueError(
            f"--chips={text!r}: expected NAME-COUNT (e.g. v5e-64, H100-8) with NAME one of "
            f"{sorted(CHIPS)}"
        )
    return name, int(count)


# --------------------------------------------------------------------------------------
# The estimate from shapes
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-device bytes of a training step on a (data, model) mesh."""

    data: int
    model: int
    members: int  # 0: a single run
    backbone_bytes: int  # per device, as split by the rules
    backbone_total_bytes: int  # the whole backbone in its dtype
    trainable_bytes: int  # params + gradient + Adam moments (all members)
    activation_bytes: int
    replicated_params: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.backbone_bytes + self.trainable_bytes + self.activation_bytes

    def describe(self) -> str:
        return (
            f"{self.total_bytes / GIB:.2f} GiB per device (backbone {self.backbone_bytes / GIB:.2f}"
            f" of {self.backbone_total_bytes / GIB:.2f}, head/probes/Adam "
            f"{self.trainable_bytes / GIB:.3f}, activations {self.activation_bytes / GIB:.2f})"
        )


def backbone_shapes(variant: str):
    """The backbone's parameter shapes (cached per variant; no allocation)."""
    if variant not in _SHAPES:
        from depthg_jax.models import partitioning

        _SHAPES[variant] = partitioning.init_shapes(variant)
    return _SHAPES[variant]


_SHAPES: dict = {}


def backbone_bytes(variant: str, model: int, dtype: str) -> tuple[int, int, tuple[str, ...]]:
    """(bytes per device, bytes in all, names left whole) of a variant's backbone."""
    import jax

    from depthg_jax.models import partitioning

    shapes = backbone_shapes(variant)
    itemsize = np.dtype(partitioning.param_dtype(dtype)).itemsize
    per_device = 0
    total = 0

    def add(path, x):
        nonlocal per_device, total
        n = int(np.prod(x.shape, dtype=np.int64)) * itemsize
        total += n
        spec = partitioning.spec_for(partitioning.path_name(path), tuple(x.shape), model)
        per_device += n // model if any(s is not None for s in spec) else n

    jax.tree_util.tree_map_with_path(add, shapes)
    return per_device, total, tuple(partitioning.replicated_leaves(shapes, model))


def member_bytes(config, data: int = 1) -> int:
    """Device bytes one head (a single run's, or one member of a population) costs.

    Trainable params, gradients and Adam's two moments (4 copies, float32), plus the head's
    activations kept for the backward pass: for anchor and positive, the head's inputs after
    its two dropout masks and hidden layer (3 x C channels) and the code with its
    intermediates (4 x K), at every feature-grid point of the device's share of the batch.
    """
    from depthg_jax.models import variants

    c = variants.embed_dim(config.model.variant)
    k = config.model.dim
    n = config.data.n_classes
    head = c * k + k + c * c + c + c * k + k  # linear, nonlinear_1, nonlinear_2
    probes = n * k + n * k + n
    params = head + probes
    grid = (config.data.train_res // variants.patch_size(config.model.variant)) ** 2
    batch = math.ceil(config.train.batch_size / data)
    acts = 2 * batch * grid * (3 * c + 4 * k)
    return 4 * (4 * params + acts)


def shared_activation_bytes(config, data: int = 1) -> int:
    """The backbone forward's largest live activations on a device (frozen: none are kept for
    a backward pass): one block's working set over anchors and positives and its attention,
    plus the features, float32."""
    from depthg_jax.models import variants

    spec = variants.get_variant(config.model.variant)
    c = spec.dim
    tokens = (config.data.train_res // spec.patch) ** 2 + 1 + spec.registers
    b2 = 2 * math.ceil(config.train.batch_size / data)
    return 4 * (b2 * tokens * 8 * c + b2 * spec.heads * tokens * tokens)


def estimate(config, data: int, model: int, members: int = 0) -> Estimate:
    """The per-device memory of a training step of `config` on a (data, model) mesh."""
    dtype = str(config.model.get("backbone_param_dtype", "float32"))
    per_device, total, whole = backbone_bytes(config.model.variant, model, dtype)
    head = member_bytes(config, data)
    return Estimate(
        data=data,
        model=model,
        members=members,
        backbone_bytes=per_device,
        backbone_total_bytes=total,
        trainable_bytes=head * max(members, 1),
        activation_bytes=shared_activation_bytes(config, data),
        replicated_params=whole,
    )


# --------------------------------------------------------------------------------------
# Meshes that fit
# --------------------------------------------------------------------------------------


def mesh_problem(batch: int, devices: int, model: int, host_devices: int) -> str | None:
    """Why a (devices / model, model) mesh cannot run a batch (None: it can)."""
    if devices % model:
        return f"mesh.model={model} does not divide {devices} devices"
    if host_devices % model:
        return f"mesh.model={model} does not divide the {host_devices} devices of a host"
    data = devices // model
    if batch % data:
        return f"train.batch_size={batch} does not split over {data} data rows"
    return None


def fitting_meshes(config, devices: int, host_devices: int, budget: int, members: int = 0):
    """[(model, Estimate)] of every runnable mesh.model whose estimate fits `budget`."""
    out = []
    for model in range(1, devices + 1):
        if mesh_problem(config.train.batch_size, devices, model, host_devices):
            continue
        est = estimate(config, devices // model, model, members)
        if est.total_bytes <= budget:
            out.append((model, est))
    return out


def refusal(config, est: Estimate, budget: int, where: str, fits: list) -> str:
    """The message of a config that does not fit, with the numbers and a mesh that would."""
    msg = (
        f"{config.model.variant} with {config.model.get('backbone_param_dtype', 'float32')} "
        f"backbone parameters ({est.backbone_total_bytes / 1e9:.1f} GB) at train.batch_size="
        f"{config.train.batch_size} does not fit {where} on a ({est.data}, {est.model}) mesh: "
        f"{est.describe()} > {budget / GIB:.2f} GiB available per device."
    )
    if fits:
        model, good = fits[0]
        msg += (
            f" A mesh that fits: --config.mesh.model={model} ({good.data} x {model}: "
            f"{good.total_bytes / GIB:.2f} GiB per device)."
        )
    else:
        msg += " No mesh.model fits this batch on these devices: use more chips, "
        if config.model.get("backbone_param_dtype", "float32") == "float32":
            msg += "--config.model.backbone_param_dtype=bfloat16, "
        msg += "or a smaller train.batch_size."
    return msg


def device_budget() -> tuple[int, str]:
    """(bytes a device may use, where that came from): the device's own limit, else (CPU) the
    host's RAM shared by its local devices."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size) // jax.local_device_count(), "host RAM per local device"


def check_fits(config, mesh, members: int = 0) -> Estimate:
    """Refuses (MemoryError, with the numbers and a mesh that fits) a run whose estimate
    exceeds the devices' memory; run at the start of training, before any device work."""
    import jax

    from depthg_jax.runtime import sharding

    data, model = sharding.data_size(mesh), sharding.model_size(mesh)
    est = estimate(config, data, model, members)
    budget, source = device_budget()
    if est.total_bytes > budget:
        devices = mesh.devices.size
        fits = fitting_meshes(config, devices, jax.local_device_count(), budget, members)
        raise MemoryError(refusal(config, est, budget, f"{devices} devices ({source})", fits))
    return est


# --------------------------------------------------------------------------------------
# The compiled step on (simulated) devices
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's analyses of one compiled step, per device."""

    flops: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    backbone_bytes: int  # the backbone argument's bytes on one device, from its shardings

    @property
    def total_bytes(self) -> int:
        """Live bytes at the peak: arguments, temporaries, and outputs not aliasing an input."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def analyse(compiled, args) -> Compiled:
    """Compiled's memory and cost analyses; the backbone (args[1]) bytes per device from the
    program's own input shardings."""
    import jax

    from depthg_jax.runtime import sharding

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    # The program's own input shardings; a parameter it never reads (a mask token) is pruned
    # (None) but still lives on the devices as placed.
    in_shardings = jax.tree.leaves(compiled.input_shardings[0][1], is_leaf=lambda s: s is None)
    backbone = sum(
        sharding.shard_bytes(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s or x.sharding))
        for x, s in zip(jax.tree.leaves(args[1]), in_shardings, strict=True)
    )
    return Compiled(
        flops=float(cost.get("flops", 0.0)),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        backbone_bytes=int(backbone),
    )
