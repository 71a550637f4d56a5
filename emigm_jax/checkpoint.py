"""Checkpoints: Orbax CheckpointManager over the train state and the grain iterator state.

One step directory holds everything needed for an exact resume: ``state`` (params, optimizer
state, EMA params, step, rng key, non-finite counters; sharded arrays written by every
process) and ``data`` (the grain iterator position of each process, one JSON file each).
Saves are asynchronous (training continues while arrays are written); keep-last-N and
keep-every-K are Orbax preservation policies. A run resumes from the newest committed step;
a step directory killed mid-write is never committed, so it is ignored.

Nothing is lost, nothing is guessed: a step that fails to restore (truncated or missing files)
is named with the reason, moved aside to ``<directory>_damaged/`` (never deleted), and the next
older step is tried. A step whose parameter shapes differ from the config is not damage but a
different model: that stops with ``CheckpointMismatchError``. The directory is probed before
every save (writable, room for one more checkpoint), so a full or read-only disk stops the run
in seconds with the directory named instead of hanging in a background write.

Preemption: SIGTERM sets a flag that the train loop reads at the next step boundary, where it
saves and exits; a SIGTERM that arrives while the main thread waits on a checkpoint write
stops at once (``SaveInterrupted``). In a multi-process job JAX's coordination service owns
SIGTERM and agrees on a common step for all processes; Orbax exposes that as
``reached_preemption(step)``, which ``PreemptionWatcher`` also checks.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import grain
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding
from orbax.checkpoint import checkpoint_managers as ocm

from emigm_jax import sharding as shd
from emigm_jax.config_validation import ConfigError
from emigm_jax.models.layout import is_scanned, to_layout
from emigm_jax.sharding import Rule

STATE_ITEM = "state"
DATA_ITEM = "data"
FREE_SPACE_MARGIN = 1.2  # a save needs this many times the state's bytes free


class CheckpointError(RuntimeError):
    """Checkpoints cannot be written or restored; the message names the directory."""


class CheckpointMismatchError(ConfigError):
    """A checkpoint holds a different model than the config builds."""


class SaveInterrupted(KeyboardInterrupt):
    """SIGTERM arrived while the main thread waited for a checkpoint write.

    An interrupt (not an Exception), so library code that catches Exception lets it through.
    """


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    return f"{type(error).__name__}: {(lines[0] if lines else '')[:300]}"


def _path_str(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _stored_tree(path: epath.Path) -> Any:
    """The saved pytree's metadata (shapes, dtypes) without reading arrays."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(path).tree
    finally:
        handler.close()


def check_param_shapes(stored: Any, wanted: Any, where: str) -> None:
    """Raises CheckpointMismatchError at the first parameter whose presence or shape differs."""
    def shapes(tree):
        return {_path_str(p): tuple(v.shape)
                for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = shapes(stored), shapes(wanted)
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise CheckpointMismatchError(
                f"{where} holds a different model than the config: parameter {name} is "
                f"{have.get(name, 'absent')} there and {want.get(name, 'absent')} in the config "
                f"(model.* fields must match the run that wrote it)")


def _field(tree: Any, key: str) -> Any:
    """``tree[key]`` of a mapping (a checkpoint's metadata), else the attribute (a TrainState)."""
    return tree[key] if isinstance(tree, Mapping) else getattr(tree, key)


def _layout_name(scanned: bool) -> str:
    return "scanned" if scanned else "unrolled"


def _layout_target(abstract: Any, saved_scanned: bool, rules: Sequence[Rule]) -> Any:
    """``abstract`` (ShapeDtypeStructs with shardings) when the checkpoint has its layer
    layout, else ``abstract`` in the saved layout, sharded by ``rules`` on the same mesh."""
    if is_scanned(abstract) == saved_scanned:
        return abstract
    shapes = jax.eval_shape(functools.partial(to_layout, scan_layers=saved_scanned), abstract)
    sharding = jax.tree.leaves(abstract)[0].sharding
    if isinstance(sharding, NamedSharding):
        shardings = shd.named_shardings(shapes, sharding.mesh, rules)
    else:  # one device (or no sharding asked for): the same for every array
        shardings = jax.tree.map(lambda _: sharding, shapes)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def _into_layout_of(tree: Any, abstract: Any, where: str) -> Any:
    """``tree`` (restored in the other layer layout) converted to ``abstract``'s layout and
    placed with its shardings."""
    scanned = is_scanned(abstract)
    leaves = jax.tree.leaves(abstract)
    placed = all(isinstance(getattr(a, "sharding", None), jax.sharding.Sharding) for a in leaves)
    out = {"out_shardings": jax.tree.map(lambda a: a.sharding, abstract)} if placed else {}
    converted = jax.jit(functools.partial(to_layout, scan_layers=scanned), **out)(tree)
    logging.info("%s was saved with the %s layer layout; converted it to the %s layout "
                 "(model.scan_layers=%s)", where, _layout_name(not scanned),
                 _layout_name(scanned), scanned)
    return converted


def _grain_args():
    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpointer:
    """Thin policy layer over ``ocp.CheckpointManager`` (what to keep, when, how to restore)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, every_steps: int = 0, read_only: bool = False):
        """
        Args:
          directory: where step directories go (created if missing, unless ``read_only``).
          keep: keep the newest ``keep`` checkpoints (>= 1).
          keep_every: also keep every checkpoint whose step is a multiple of this (0 = off).
          async_save: write arrays in a background thread.
          every_steps: periodic save interval used by ``should_save`` (0 = only final/preempt).
          read_only: for sampling/evaluation: never creates the directory, never saves.
        """
        if keep < 1:
            raise ValueError(f"config.checkpoint.keep={keep} must be >= 1")
        if keep_every < 0 or every_steps < 0:
            raise ValueError(f"config.checkpoint.keep_every={keep_every} and every_steps="
                             f"{every_steps} must be >= 0")
        self.directory = epath.Path(directory)
        self.damaged_directory = self.directory.parent / f"{self.directory.name}_damaged"
        self.every_steps = int(every_steps)
        self.saving = False  # the main thread is blocked in a save or wait
        if not read_only:
            self.ensure_writable()
        policies = [ocm.LatestN(n=int(keep))]
        if keep_every:
            policies.append(ocm.EveryNSteps(interval_steps=int(keep_every)))
        preservation = policies[0] if len(policies) == 1 else ocm.AnyPreservationPolicy(policies)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else preservation,
            enable_async_checkpointing=bool(async_save),
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def from_config(cls, config, workdir: str | os.PathLike,
                    read_only: bool = False) -> "Checkpointer":
        c = config.checkpoint
        return cls(epath.Path(workdir) / "checkpoints", keep=int(c.keep),
                   keep_every=int(c.keep_every), async_save=bool(c.async_save),
                   every_steps=int(c.every_steps), read_only=read_only)

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def damaged_steps(self) -> list[str]:
        """Step directories moved aside by an earlier failed restore."""
        d = self.damaged_directory
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def check_fresh_start(self, allow_fresh_start: bool) -> None:
        """Refuses a start from step 0 while damaged steps exist, unless allowed."""
        damaged = self.damaged_steps()
        if damaged and not allow_fresh_start:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored; the damaged steps "
                f"{damaged} were moved to {self.damaged_directory}. Starting over would discard "
                f"that training: pass --allow_fresh_start to train from step 0 anyway")
        if damaged:
            logging.warning("starting from step 0; damaged checkpoints stay in %s",
                            self.damaged_directory)

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (False when no coordination service)."""
        return bool(self.manager.reached_preemption(step))

    def should_save(self, step: int) -> bool:
        """Periodic schedule: every ``every_steps`` steps."""
        return self.every_steps > 0 and step % self.every_steps == 0

    # -- save ----------------------------------------------------------------------------------
    def ensure_writable(self, need_bytes: int = 0) -> None:
        """Raises CheckpointError naming the directory when it cannot take one more save."""
        if "://" in str(self.directory):  # remote storage: Orbax reports its own errors
            return
        path = os.fspath(self.directory)
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            free = shutil.disk_usage(path).free
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {path} is not writable "
                                  f"({e.strerror or e}); fix its permissions or free space, or "
                                  f"use another --workdir") from None
        if free < need_bytes * FREE_SPACE_MARGIN:
            raise CheckpointError(
                f"checkpoint directory {path} has {free / 2**20:.1f} MiB free but a checkpoint "
                f"needs about {need_bytes / 2**20:.1f} MiB; free space or use another --workdir")

    @contextlib.contextmanager
    def _blocking(self, what: str) -> Iterator[None]:
        """Marks the main thread as waiting on a write; write failures name the directory."""
        self.saving = True
        try:
            yield
        except (SaveInterrupted, KeyboardInterrupt):
            raise
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointError(f"{what} in {self.directory} failed: {one_line(e)}") from e
        finally:
            self.saving = False

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> bool:
        """Starts saving ``state`` (a pytree of jax.Arrays) and the iterator position at ``step``.

        Returns False when ``step`` is already saved. The arrays are copied before this returns
        (so the caller may donate them); the write finishes in the background.
        """
        if step in self.manager.all_steps():
            return False
        if jax.process_index() == 0:
            self.ensure_writable(sum(int(x.nbytes) for x in jax.tree.leaves(state)))
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            grain_save, _ = _grain_args()
            items[DATA_ITEM] = grain_save(data_iterator)
        with self._blocking(f"saving step {step}"):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        logging.info("checkpoint: %s step %d to %s", "saving" if saved else "skipped", step,
                     self.directory)
        return bool(saved)

    # -- restore -------------------------------------------------------------------------------
    def _move_aside(self, step: int, error: BaseException) -> None:
        source = self.directory / str(step)
        target = self.damaged_directory / str(step)
        n = 1
        while target.exists():
            n += 1
            target = self.damaged_directory / f"{step}-{n}"
        logging.warning("checkpoint %s cannot be restored (%s); moved it to %s and trying the "
                        "next older step", source, one_line(error), target)
        if jax.process_index() == 0:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        self.manager.reload()

    def newest_intact(self, restore_one: Callable[[int, Any], Any], abstract: Any, key: str,
                      rules: Sequence[Rule] = (), required: tuple[str, ...] = ()
                      ) -> tuple[int, Any] | None:
        """(step, tree) for the newest step that restores into ``abstract``'s structure, or None.

        ``restore_one(step, target)`` reads the step into ``target`` (``abstract`` itself, or
        ``abstract`` in the step's other layer layout, sharded by ``rules``; that result is
        converted back, see ``_layout_target``). The parameter subtree ``key`` is checked
        against the step's metadata first, and the saved state must hold the ``required``
        top-level entries (a mismatch raises, it is not damage).
        """
        for step in sorted(self.all_steps(), reverse=True):
            where = f"checkpoint {self.directory / str(step)}"
            try:
                stored = _stored_tree(self.directory / str(step) / STATE_ITEM)
                missing = sorted(set(required) - set(stored))
                if missing:
                    raise CheckpointMismatchError(
                        f"{where} holds {sorted(stored)} but not {missing}: it can sample and "
                        f"evaluate (e.g. a converted checkpoint) but not resume training; "
                        f"train in a new --workdir")
                target = _layout_target(abstract, is_scanned(_field(stored, key)), rules)
                check_param_shapes(_field(stored, key), _field(target, key), where)
                restored = restore_one(step, target)
            except (CheckpointMismatchError, KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # pylint: disable=broad-except
                if "RESOURCE_EXHAUSTED" in str(e):  # out of memory: the files are not at fault
                    raise
                self._move_aside(step, e)
                continue
            return step, (restored if target is abstract
                          else _into_layout_of(restored, abstract, where))
        return None

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                rules: Sequence[Rule] = ()) -> tuple[int, Any] | None:
        """Restores the newest intact step into ``abstract_state``'s structure and shardings.

        ``abstract_state``: pytree of jax.ShapeDtypeStruct with ``.sharding`` set, so each
        process reads only its shards. ``data_iterator`` is restored in place. A step saved in
        the other layer layout (``model.scan_layers``) is read sharded by ``rules`` and
        converted (parameters, EMA and optimizer state).
        Returns (step, state), or None when no step restores (damaged ones moved aside).
        """
        def restore_one(step, target):
            items = {STATE_ITEM: ocp.args.StandardRestore(target)}
            if data_iterator is not None:
                _, grain_restore = _grain_args()
                items[DATA_ITEM] = grain_restore(data_iterator)
            return self.manager.restore(step, args=ocp.args.Composite(**items))[STATE_ITEM]

        fields = {_path_str(path[:1])
                  for path, _ in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        return self.newest_intact(restore_one, abstract_state, "params", rules,
                                  required=tuple(sorted(fields)))

    def restore_params(self, abstract_params: Any, key: str = "ema_params",
                       rules: Sequence[Rule] = ()) -> tuple[int, Any] | None:
        """Only one parameter tree (default: the EMA weights) of the newest intact step, in
        ``abstract_params``' layer layout whichever layout the step was saved in."""
        def restore_one(step, target):
            restore_args = jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None)), target)
            # Partial restore reads only this subtree's arrays (PyTree handler, not the
            # manager: the manager registers ``state`` with the full-tree Standard handler).
            with ocp.PyTreeCheckpointer() as reader:
                return reader.restore(
                    self.directory / str(step) / STATE_ITEM,
                    args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                partial_restore=True))

        found = self.newest_intact(restore_one, {key: abstract_params}, key, rules)
        return None if found is None else (found[0], found[1][key])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        with self._blocking("finishing a checkpoint write"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class PreemptionWatcher:
    """SIGTERM (single process) or Orbax's preemption sync point (multi-process) -> stop flag.

    The signal handler only sets a flag; the train loop polls ``should_stop(step)`` at step
    boundaries, saves, and exits, so a checkpoint is never written from inside a handler.
    """

    def __init__(self, checkpointer: Checkpointer | None = None, install: bool = True):
        self._ckpt = checkpointer
        self._flag = threading.Event()
        self._previous = None
        self.signum: int | None = None
        # With several processes JAX's preemption service handles SIGTERM (and chooses the
        # common step); replacing its handler would hide the notice from it.
        self._installed = (install and jax.process_count() == 1
                           and threading.current_thread() is threading.main_thread())
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):  # pylint: disable=unused-argument
        self.signum = signum
        self._flag.set()
        if self._ckpt is not None and self._ckpt.saving:
            # The main thread waits on a write (slow or stuck storage): stop now; the step
            # being written is never committed, older checkpoints stay intact.
            raise SaveInterrupted(f"stopped by signal {signum} while a checkpoint write to "
                                  f"{self._ckpt.directory} was pending; the newest committed "
                                  f"checkpoint is step {self._ckpt.latest_step()}")
        logging.warning("received signal %d: will checkpoint and stop at the next step", signum)

    def should_stop(self, step: int) -> bool:
        if self._flag.is_set():
            return True
        if self._ckpt is not None and jax.process_count() > 1:
            return self._ckpt.reached_preemption(step)
        return False

    def restore_handler(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False
