"""Sweep mode's member table: which settings a population trains, checked before anything runs.

`config.sweep` names the members in one of three ways (at most one may be set):

- `grid`: "loss.pos_intra_weight=0.5,0.58;loss.neg_inter_shift=0.7,0.76" is the product of the
  value lists (here 4 members, the last field varying fastest);
- `random` = N with `ranges` "loss.depth_weight=0.05:0.3;optim.lr=1e-4:1e-3:log": N members
  drawn uniformly (log-uniformly with ":log") from the ranges, seeded by `sweep.seed`;
- `members`: "name=stego,loss.depth_weight=0,loss.sampling=random|loss.depth_weight=0.19",
  one member per "|"-separated entry, each field not named keeping the config's value.

Only per-member fields may vary (config.MEMBER_FIELDS, the table's per_member ones): what the
members share (backbone, data, batch, S schedule, code dim, objective, ...) is refused with
the field named. `check_memory` refuses a population too large for the device before anything
is compiled, with its estimate.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import ml_collections
import numpy as np

from depthg_jax import config as config_lib

SAMPLING_FIELD = "loss.sampling"
MEMBER_FIELDS = config_lib.MEMBER_FIELDS


def is_sweep(config: ml_collections.ConfigDict) -> bool:
    """Whether the config names a population (any of sweep.grid / random / members)."""
    sweep = config.get("sweep")
    return bool(sweep and (sweep.grid or sweep.random or sweep.members))


def _field_value(field: str, text: str, where: str, *, check: bool = True):
    """The member's value of `field` parsed from text, checked against the field's rules."""
    text = text.strip()
    if config_lib.FIELDS[field].kind is str:
        value = text
    else:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{where}: {field}={text!r} is not a number") from None
    if check:
        _check_value(field, value, where)
    return value


def _check_value(field: str, value, where: str) -> None:
    try:
        config_lib.check_field(field, value)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_field(field: str, where: str) -> str:
    field = field.strip()
    if field not in MEMBER_FIELDS:
        raise ValueError(
            f"{where}: {field!r} cannot differ between members (they share the backbone, data, "
            f"batch, S schedule, code dim and objective); per-member fields: {list(MEMBER_FIELDS)}"
        )
    return field


def _pairs(text: str, sep: str, where: str) -> list[tuple[str, str]]:
    out = []
    for part in text.split(sep):
        if not part.strip():
            raise ValueError(f"{where}={text!r}: an empty entry (a stray {sep!r}?)")
        if part.count("=") != 1:
            raise ValueError(f"{where}={text!r}: entry {part!r} is not 'field=values'")
        field, values = part.split("=")
        out.append((field.strip(), values.strip()))
    return out


def parse_grid(text: str) -> list[dict]:
    """ "a=1,2;b=3" -> [{a: 1, b: 3}, {a: 2, b: 3}] (product; the last field fastest)."""
    where = "config.sweep.grid"
    axes = []
    for field, values in _pairs(text, ";", where):
        field = _check_field(field, where)
        if field in (f for f, _ in axes):
            raise ValueError(f"{where}={text!r}: {field} is listed twice")
        items = values.split(",")
        if not values or any(not v.strip() for v in items):
            raise ValueError(f"{where}={text!r}: {field} has an empty value in {values!r}")
        axes.append((field, [_field_value(field, v, where) for v in items]))
    return [dict(zip([f for f, _ in axes], combo, strict=True))
            for combo in itertools.product(*[v for _, v in axes])]  # fmt: skip


def parse_ranges(text: str, count: int, seed: int) -> list[dict]:
    """`count` members drawn from "field=lo:hi[:log];..." with numpy's PCG64(seed)."""
    where = "config.sweep.ranges"
    if not text:
        raise ValueError(f"config.sweep.random={count} needs config.sweep.ranges (field=lo:hi;...)")
    ranges = []
    for field, spec in _pairs(text, ";", where):
        field = _check_field(field, where)
        if field == SAMPLING_FIELD:
            raise ValueError(f"{where}: {field} is not numeric; list it in a grid or members")
        parts = spec.split(":")
        log = len(parts) == 3 and parts[2].strip() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ValueError(f"{where}={text!r}: {field}={spec!r} is not 'lo:hi' or 'lo:hi:log'")
        lo, hi = (_field_value(field, p, where, check=False) for p in parts[:2])
        if not lo <= hi or (log and lo <= 0):
            raise ValueError(f"{where}: {field}={spec!r} needs lo <= hi (and lo > 0 with :log)")
        for bound in (lo, hi):
            _check_value(field, bound, where)
        ranges.append((field, lo, hi, log))
    rng = np.random.default_rng(seed)
    members = []
    for _ in range(count):
        member = {}
        for field, lo, hi, log in ranges:
            u = rng.uniform()
            value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if log else (
                lo + u * (hi - lo))  # fmt: skip
            member[field] = float(value)
        members.append(member)
    return members


def parse_members(text: str) -> list[dict]:
    """ "name=a,loss.depth_weight=0|optim.lr=1e-4" -> one dict per member ("name" kept)."""
    where = "config.sweep.members"
    members = []
    for entry in text.split("|"):
        if not entry.strip():
            raise ValueError(f"{where}={text!r}: an empty member (a stray '|'?)")
        member = {}
        for field, value in _pairs(entry, ",", where):
            if field == "name":
                member["name"] = value
                continue
            field = _check_field(field, where)
            member[field] = _field_value(field, value, where)
        members.append(member)
    return members


def member_table(config: ml_collections.ConfigDict) -> list[dict]:
    """The resolved members: [{"name", "overrides": {field: value}, "settings": {every
    per-member field: value}}]. Raises ValueError on a malformed or unsupported sweep."""
    sweep = config.sweep
    given = [k for k in ("grid", "random", "members") if sweep[k]]
    if len(given) > 1:
        raise ValueError(f"config.sweep sets {given}: name the members one way only")
    if not given:
        raise ValueError("config.sweep names no members (set sweep.grid, random or members)")
    if sweep.grid:
        overrides = parse_grid(sweep.grid)
    elif sweep.random:
        if not isinstance(sweep.random, int) or sweep.random < 1:
            raise ValueError(f"config.sweep.random={sweep.random!r}; expected an integer >= 1")
        overrides = parse_ranges(sweep.ranges, sweep.random, sweep.seed)
    else:
        overrides = parse_members(sweep.members)
    table = []
    for i, over in enumerate(overrides):
        name = over.pop("name", None) or f"m{i}"
        settings = {}
        for field in MEMBER_FIELDS:
            section, leaf = field.split(".")
            settings[field] = over.get(field, config[section][leaf])
        table.append({"name": name, "overrides": over, "settings": settings})
    names = [m["name"] for m in table]
    if len(set(names)) != len(names):
        raise ValueError(f"config.sweep: member names repeat: {names}")
    return table


def member_config(config: ml_collections.ConfigDict, member: dict) -> ml_collections.ConfigDict:
    """The single-run config of one member (its settings in place, no sweep)."""
    out = ml_collections.ConfigDict(config.to_dict())
    for field, value in member["settings"].items():
        section, leaf = field.split(".")
        out[section][leaf] = value
    out.sweep.grid, out.sweep.random, out.sweep.members = "", 0, ""
    return out


def mixes_sampling(table: list[dict]) -> bool:
    return len({m["settings"][SAMPLING_FIELD] for m in table}) > 1


def swept_fields(table: list[dict]) -> list[str]:
    """The fields whose value differs between members, in MEMBER_FIELDS order."""
    return [f for f in MEMBER_FIELDS if len({m["settings"][f] for m in table}) > 1]


TABLE_FILE = "sweep_members.json"


def write_table(table: list[dict], workdir: str) -> str:
    """Writes <workdir>/sweep_members.json (the resolved member table); returns its path."""
    path = os.path.join(workdir, TABLE_FILE)
    from depthg_jax.runtime import files

    files.write_text_atomic(path, json.dumps(table, indent=2))
    return path


def read_table(workdir: str) -> list[dict]:
    """The member table a sweep run wrote (write_table)."""
    path = os.path.join(workdir, TABLE_FILE)
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"{workdir} holds a sweep's config but its member table {path} cannot be read ({e})"
        ) from e
    if not isinstance(table, list) or not all("name" in m and "settings" in m for m in table):
        raise ValueError(f"{path} is not a sweep member table")
    return table


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def _mesh_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(data, model) of the mesh a run of this config gets on this process's devices."""
    import jax

    from depthg_jax.runtime import sharding

    model = sharding.model_axis(config)
    return max(jax.device_count() // model, 1), model


def estimate_member_bytes(config: ml_collections.ConfigDict) -> int:
    """Device bytes one extra member costs in the training step (an upper estimate):
    training/planning.py's `member_bytes` at this run's mesh."""
    from depthg_jax.training import planning

    return planning.member_bytes(config, _mesh_shape(config)[0])


def estimate_shared_bytes(config: ml_collections.ConfigDict) -> int:
    """Bytes the members share on a device: the backbone's params as the mesh splits them, in
    their dtype, and the forward's largest activations (training/planning.py)."""
    from depthg_jax.training import planning

    est = planning.estimate(config, *_mesh_shape(config))
    return est.backbone_bytes + est.activation_bytes


def memory_budget_bytes(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(bytes, where it came from): sweep.memory_gb, else the device's limit, else host RAM
    per local device (training/planning.py `device_budget`)."""
    if config.sweep.memory_gb:
        return int(config.sweep.memory_gb * 2**30), "config.sweep.memory_gb"
    from depthg_jax.training import planning

    return planning.device_budget()


def check_memory(config: ml_collections.ConfigDict, num_members: int) -> dict:
    """Raises MemoryError (before compiling) when the estimate exceeds the budget; else
    returns {"members", "member_bytes", "shared_bytes", "estimate_bytes", "budget_bytes"}."""
    member = estimate_member_bytes(config)
    shared = estimate_shared_bytes(config)
    total = shared + num_members * member
    budget, source = memory_budget_bytes(config)
    if total > budget:
        fits = max((budget - shared) // member, 0)
        raise MemoryError(
            f"a population of {num_members} members needs about {total / 2**30:.2f} GiB "
            f"({shared / 2**30:.2f} GiB shared + {num_members} x {member / 2**30:.3f} GiB per "
            f"member) but {source} allows {budget / 2**30:.2f} GiB: at most {fits} members fit "
            f"(fewer members, a smaller train.batch_size, a larger config.mesh.model, or raise "
            f"config.sweep.memory_gb)"
        )
    return {
        "members": num_members,
        "member_bytes": member,
        "shared_bytes": shared,
        "estimate_bytes": total,
        "budget_bytes": budget,
    }
