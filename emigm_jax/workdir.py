"""The run directory's bookkeeping: one run at a time, the resume contract, training time.

A workdir belongs to one training run. Its ``config.json`` is the record of what that run is
training; a resume must train the same model with the same objective, so the fields that
shape parameters or give the optimizer state its meaning are compared with the record before
anything is written (README, "Resuming and recovering"). ``run.lock`` names the process that
owns the workdir (host and pid); a lock whose process is gone is detected and replaced.
``train_time.json`` holds one entry per training segment, so a run that was preempted or
killed and resumed still reports its whole training time.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
from typing import Any

import jax
import numpy as np

from emigm_jax.config_validation import ConfigError

RECORD = "config.json"
LOCK = "run.lock"
TRAIN_TIME = "train_time.json"

# Fields a resume may never change: parameter shapes, token meaning and the training objective.
FIXED_PREFIXES = ("model.", "mask.", "tokenizer.name", "tokenizer.scale")
# Runtime-only model settings (compute precision, rematerialisation, the work ladders, which
# give the same loss and gradients as the full-capacity step, and the layer layout, which a
# restore converts, see ``emigm_jax.checkpoint``): free to change.
FREE_FIELDS = ("model.dtype", "model.remat", "model.encoder_buckets", "model.loss_buckets",
               "model.loss_capacity", "model.scan_layers", "train.ladders")
# The optimizer's recipe (lr = base_lr * batch / 256, warmup, AdamW, EMA): changes are refused
# unless the user accepts them explicitly.
RECIPE_PREFIXES = ("train.batch_size", "optim.")


class WorkdirError(RuntimeError):
    """The workdir cannot be used by this run (locked by another, or a broken record)."""


class ResumeMismatchError(ConfigError):
    """The config differs from the workdir's record in a field a resume cannot change."""


# ---------------------------------------------------------------------------------------------
# One run per workdir.

_held: dict[str, int] = {}  # lock path -> nesting depth held by this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_owner(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_stale(owner: dict | None, host: str) -> bool:
    """A lock is stale when unreadable or held by a dead process on this host."""
    if not owner or "pid" not in owner:
        return True
    return owner.get("host") == host and not _pid_alive(int(owner["pid"]))


def acquire_lock(workdir: str) -> str:
    """Takes ``workdir/run.lock`` for this process (re-entrant); returns the lock path.

    Raises WorkdirError naming the owner when another live process holds it. Remote
    (``gs://``) workdirs are not locked.
    """
    if "://" in workdir:
        return ""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    if path in _held:
        _held[path] += 1
        return path
    host, me = socket.gethostname(), {"host": socket.gethostname(), "pid": os.getpid(),
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if owner and owner.get("host") == host and int(owner.get("pid", -1)) == os.getpid():
                break  # ours (e.g. taken by main before train)
            if not _is_stale(owner, host):
                raise WorkdirError(
                    f"workdir {workdir} is in use by another run (host {owner.get('host')}, "
                    f"pid {owner.get('pid')}, since {owner.get('started', '?')}); wait for it "
                    f"to finish, or delete {path} if that run is gone") from None
            logging.warning("removing stale lock %s (owner %s is gone)", path, owner)
            os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    _held[path] = 1
    return path


def release_lock(path: str) -> None:
    """Drops one hold; the file is removed when the outermost holder releases it."""
    if not path:
        return
    depth = _held.get(path, 0) - 1
    if depth > 0:
        _held[path] = depth
        return
    _held.pop(path, None)
    owner = _read_owner(path)
    if owner and int(owner.get("pid", -1)) == os.getpid():
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# The resume contract.

def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def config_as_json(config) -> dict:
    """The config exactly as ``config.json`` stores it (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _field_group(name: str) -> str | None:
    if name in FREE_FIELDS:
        return None
    if name.startswith(FIXED_PREFIXES):
        return "fixed"
    if name.startswith(RECIPE_PREFIXES):
        return "recipe"
    return None


def read_record(workdir: str) -> dict | None:
    """The workdir's config.json, or None when there is none."""
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); it is this run's config record: "
                           f"restore it, or start a new --workdir") from None


def contract_changes(record: dict, config) -> list[tuple[str, str, Any, Any]]:
    """[(group, field, old, new)] for contract fields that differ; fields the record lacks
    (written by an older version) are not compared."""
    old, new = flatten(record), flatten(config_as_json(config))
    changes = []
    for name in sorted(set(old) & set(new)):
        group = _field_group(name)
        if group and old[name] != new[name]:
            changes.append((group, name, old[name], new[name]))
    return changes


def check_resume(config, workdir: str, accept_recipe_change: bool = False) -> list[str]:
    """Compares ``config`` with the workdir's record before a resume writes anything.

    Returns the accepted recipe changes as 'field old -> new' (empty when none). Raises
    ResumeMismatchError naming every differing field when the resume cannot proceed.
    """
    record = read_record(workdir)
    if record is None:
        return []
    changes = contract_changes(record, config)
    described = [f"{name} {old!r} -> {new!r}".replace("'", "") for _, name, old, new in changes]
    fixed = [d for (group, *_), d in zip(changes, described) if group == "fixed"]
    recipe = [d for (group, *_), d in zip(changes, described) if group == "recipe"]
    where = os.path.join(workdir, RECORD)
    if fixed:
        raise ResumeMismatchError(
            f"cannot resume {workdir}: the config changes {', '.join(described)} against "
            f"{where}; architecture, tokenizer and masking fields must match the checkpoint "
            f"(drop those overrides, or train in a new --workdir)")
    if recipe and not accept_recipe_change:
        raise ResumeMismatchError(
            f"cannot resume {workdir}: the config changes {', '.join(recipe)} against {where}, "
            f"which changes the learning rate (base_lr * batch_size / 256) or optimizer; pass "
            f"--accept_changed_recipe to resume with the new values, or drop those overrides")
    return recipe


def write_record(config, workdir: str, accepted: list[str], step: int) -> None:
    """Writes config.json; an accepted recipe change keeps the old record beside it."""
    path = os.path.join(workdir, RECORD)
    if accepted and os.path.exists(path):
        os.replace(path, os.path.join(workdir, f"config_until_step_{step}.json"))
        logging.warning("resuming at step %d with changed %s", step, ", ".join(accepted))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Training time across segments.

def read_segments(workdir: str) -> list[dict]:
    path = os.path.join(workdir, TRAIN_TIME)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def record_segment(workdir: str, segment: dict) -> None:
    """Adds or updates (same ``started``) one segment's entry in train_time.json."""
    runs = [r for r in read_segments(workdir) if r.get("started") != segment["started"]]
    runs.append(segment)
    tmp = os.path.join(workdir, TRAIN_TIME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(runs, f, indent=1)
    os.replace(tmp, os.path.join(workdir, TRAIN_TIME))


def total_train_seconds(workdir: str) -> float:
    """Training wall time summed over every segment of the run (resumes included)."""
    return float(sum(r["seconds"] for r in read_segments(workdir)))


class SegmentClock:
    """This segment's training time, written to train_time.json at every save and at exit."""

    def __init__(self, workdir: str, start_step: int):
        self.workdir, self.start_step = workdir, start_step
        self.t0 = time.perf_counter()
        # The segment's key in train_time.json: to the microsecond, because one process can
        # start two segments within a second (a preempted train() resumed in-process).
        now = datetime.datetime.now(datetime.timezone.utc)
        self.started = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + f"/{os.getpid()}"

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def record(self, step: int) -> None:
        if jax.process_index() == 0:
            record_segment(self.workdir, {
                "started": self.started, "start_step": self.start_step, "end_step": int(step),
                "seconds": self.seconds()})


def truncate_log(path: str, last_step: int) -> int:
    """Drops rows of a JSONL step log after ``last_step`` (steps a resume will run again).

    Returns the number of rows dropped. A torn last line (killed mid-write) is dropped too.
    """
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if int(row.get("step", 0)) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return dropped


# ---------------------------------------------------------------------------------------------
# The step log.

class MetricWriter:
    """JSONL + TensorBoard scalars and images; a no-op on processes other than 0.

    ``resume_step``: rows after it (steps the resumed run trains again) are dropped first,
    so train_log.jsonl keeps one row per step across kills and resumes.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled and jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            path = os.path.join(workdir, "train_log.jsonl")
            if resume_step is not None:
                dropped = truncate_log(path, resume_step)
                if dropped:
                    logging.info("train_log.jsonl: dropped %d rows after step %d (re-run)",
                                 dropped, resume_step)
            self._jsonl = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
            # Imported here: tensorboardX imports torch when it is installed (~4 s), which
            # commands that write no metrics (sample, evaluate, plan, errors) need not pay.
            from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", float(v), int(step))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: [H, W] or [H, W, 3] uint8."""
        if not (self.enabled and self._tb is not None):
            return
        img = image if image.ndim == 3 else image[..., None]
        self._tb.add_image(name, img, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
