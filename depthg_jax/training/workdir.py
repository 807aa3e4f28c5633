"""The training workdir's guards: one trainer at a time, and resumes that continue the same run.

- `WorkdirLock`: `<workdir>/.lock` holds {"pid", "host", "started"} of the trainer running
  there, made with O_EXCL. A second trainer is refused with the holder named; a lock whose
  process is gone (same host, pid not running) is stale and taken over with a note. A lock
  from another host cannot be checked and is refused (remove the file if that host is down).
- `guard_resume(config, workdir)`: run before anything is written. The resolved config is
  compared with the run's saved config.json field by field: fields that change the run (the
  model, data, objective, loss, optimiser, batch size, seed: every field config.FIELDS does
  not mark on_resume) refuse with every field and both values; the allowed ones (logging and
  validation cadence, `train.num_steps` to extend a run, loader threads, the final protocol)
  are printed and appended to `<workdir>/resumes.jsonl`. A workdir with results but no
  checkpoint refuses unless `--config.train.restart=True`, which moves the old run's files to
  `<workdir>/previous-<time>/` (nothing is deleted) and starts over.
- `truncate_metrics(workdir, step)`: metrics.jsonl rows past the resumed step are dropped,
  so a resumed run's log has each step once.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time

import ml_collections

from depthg_jax import config as config_lib
from depthg_jax.runtime import files

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESUMES_FILE = "resumes.jsonl"

# What a run leaves in its workdir (moved aside together on restart).
RUN_FILES = (
    CONFIG_FILE, METRICS_FILE, RESUMES_FILE, "results.json", "checkpoints",
    "checkpoints_damaged", "tensorboard", "images", "export", "export_best",
)  # fmt: skip
# Files that show a run got somewhere: refuse to restart silently over them.
_PROGRESS_FILES = ("results.json", "export", "export_best", "checkpoints_damaged")


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------


class WorkdirLock:
    """`<workdir>/.lock` while this process trains there (context manager)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._held = False

    def acquire(self) -> WorkdirLock:
        files.check_writable(os.path.dirname(self.path), "--workdir")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = read_lock(self.path)
                if holder is not None and not _is_stale(holder):
                    raise WorkdirError(
                        f"{os.path.dirname(self.path)} is in use by another trainer (pid "
                        f"{holder.get('pid')} on host {holder.get('host')}, since "
                        f"{time.ctime(holder.get('started', 0))}); wait for it or use another "
                        f"--workdir (if that process is gone, remove {self.path})"
                    ) from None
                if holder is not None:
                    print(
                        f"note: taking over the stale lock of pid {holder.get('pid')} on "
                        f"{holder.get('host')} (no longer running)",
                        flush=True,
                    )
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise WorkdirError(f"could not take the lock {self.path}: another trainer races for it")

    def release(self) -> None:
        if self._held:
            holder = read_lock(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                os.unlink(self.path)
            self._held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def exclusive(train_fn):
    """Decorates train_fn(config, workdir, ...): the workdir lock (process 0) and the
    SIGTERM/SIGINT flag are held from the very start to the end."""
    from depthg_jax.runtime.preemption import Preemption

    @functools.wraps(train_fn)
    def wrapper(config, workdir, *args, **kwargs):
        import jax

        lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
        if lock is not None:
            lock.acquire()
        try:
            with Preemption():
                return train_fn(config, workdir, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    return wrapper


def read_lock(path: str) -> dict | None:
    """The holder recorded in a lock file; {} when unreadable (being written), None if absent."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        # Half-written by a starting trainer, or damaged: stale if old.
        try:
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return None
        return {"pid": -1, "host": socket.gethostname()} if age > 10 else {"pid": 0}


def _is_stale(holder: dict) -> bool:
    if holder.get("pid") == 0:
        return False  # being written right now
    if holder.get("host") != socket.gethostname():
        return False  # another host: cannot tell
    return not files.pid_alive(int(holder.get("pid", -1)))


# --------------------------------------------------------------------------------------
# The guarded resume
# --------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_allowed_on_resume(field: str) -> bool:
    return field in config_lib.ALLOWED_ON_RESUME


def config_changes(saved: dict, current: dict, defaults: dict | None = None):
    """(run-changing, allowed) lists of (field, saved value, current value).

    A field the saved config lacks (added to the code since) counts as allowed when its
    current value is the default.
    """
    a, b = _flatten(saved), _flatten(current)
    d = _flatten(defaults or {})
    refused, allowed = [], []
    for field in sorted(set(a) | set(b)):
        old, new = a.get(field, "<absent>"), b.get(field, "<absent>")
        if old == new or (isinstance(old, list | tuple) and list(old) == list(new or [])):
            continue
        if is_allowed_on_resume(field) or (field not in a and d.get(field, object()) == new):
            allowed.append((field, old, new))
        else:
            refused.append((field, old, new))
    return refused, allowed


def _saved_workdir(saved: dict) -> str | None:
    """Where a saved run's workdir was: the parent of its generated synthetic data, if any."""
    data = saved.get("data", {})
    root = str(data.get("root", ""))
    if data.get("name") == "synthetic" and os.path.basename(root) == "synthetic_data":
        return os.path.dirname(root)
    return None


def _under_workdir(tree: dict, workdir: str | None) -> dict:
    """Paths below the workdir written relative to it, so a moved workdir still resumes."""
    if not workdir:
        return tree
    prefix = workdir.rstrip("/") + "/"

    def rel(value):
        if isinstance(value, dict):
            return {k: rel(v) for k, v in value.items()}
        if isinstance(value, str) and value.startswith(prefix):
            return "<workdir>/" + value[len(prefix) :]
        return value

    return rel(tree)


def has_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _metric_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return steps


def guard_resume(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Checks that starting `config` in `workdir` continues its run or starts a clean one.

    Returns "resume", "new" or "restart". Writes nothing unless it returns "restart" (old run
    files moved aside) or records allowed changes in resumes.jsonl (on "resume").
    """
    import jax

    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0  # the workdir is shared: one process moves and records
    restart = bool(config.train.get("restart", False))
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
    if restart:
        if present and primary:
            target = move_aside(workdir, present)
            print(f"train.restart: moved the previous run's files to {target}", flush=True)
        return "restart"
    saved_file = os.path.join(workdir, CONFIG_FILE)
    if has_checkpoints(workdir):
        if not os.path.isfile(saved_file):
            raise WorkdirError(
                f"{workdir}/checkpoints exists but {saved_file} does not, so the resume cannot "
                "be checked; restore config.json or set --config.train.restart=True"
            )
        with open(saved_file) as f:
            saved = json.load(f)
        defaults = config_lib.get_config().to_dict()
        current = _under_workdir(config.to_dict(), workdir)
        refused, allowed = config_changes(
            _under_workdir(saved, _saved_workdir(saved)), current, defaults
        )
        if refused:
            listed = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, a, b in refused)
            raise WorkdirError(
                f"{workdir} holds a run with another config, and these fields change the run: "
                f"{listed}. Resume with the run's values, use another --workdir, or set "
                "--config.train.restart=True to start over (the old files are kept aside)"
            )
        if allowed and primary:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in allowed)
            print(f"Resuming with changed settings: {listed}", flush=True)
            record = {"time": time.time(), "changes": {k: [a, b] for k, a, b in allowed}}
            with open(os.path.join(workdir, RESUMES_FILE), "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        return "resume"
    progress = [n for n in _PROGRESS_FILES if os.path.exists(os.path.join(workdir, n))]
    steps = _metric_steps(workdir)
    # Rows before the first checkpoint could be due are a killed start: it restarts from 0.
    if steps and max(steps) >= config.train.checkpoint_every:
        progress.append(f"{METRICS_FILE} (up to step {max(steps)})")
    if progress:
        raise WorkdirError(
            f"{workdir} has a run's results ({', '.join(progress)}) but no checkpoint to resume "
            "from; set --config.train.restart=True to start over (the old "
            "files are moved to previous-*/), or use another --workdir"
        )
    return "new"


def move_aside(workdir: str, names) -> str:
    target = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(target):
        target, n = f"{target.split('.')[0]}.{n}", n + 1
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(workdir, name), os.path.join(target, name))
    return target


def truncate_metrics(workdir: str, step: int) -> int:
    """Drops metrics.jsonl rows with step > `step` (a resumed run rewrites them); returns the
    number dropped."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a half-written last line of a killed run
                continue
            if row_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        files.write_text_atomic(path, "".join(kept))
    return dropped


def finished_results(workdir: str, step: int, num_steps: int) -> dict | None:
    """results.json of a run that already finished at `num_steps` with its export intact."""
    from depthg_jax.runtime import checkpoint

    path = os.path.join(workdir, "results.json")
    if step != num_steps or not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if results.get("step") != num_steps:
        return None
    try:
        checkpoint.verify_export(os.path.join(workdir, "export"))
    except (OSError, ValueError):
        return None
    return results
