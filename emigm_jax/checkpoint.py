"""Checkpoints: Orbax CheckpointManager over the train state and the grain iterator state.

One step directory holds everything needed for an exact resume: ``state`` (params, optimizer
state, EMA params, step, rng key, non-finite counters; sharded arrays written by every
process) and ``data`` (the grain iterator position of each process, one JSON file each).
Saves are asynchronous (training continues while arrays are written); keep-last-N and
keep-every-K are Orbax preservation policies. A run resumes from the newest committed step;
a step directory killed mid-write is never committed, so it is ignored.

Preemption: SIGTERM sets a flag that the train loop reads at the next step boundary, where it
saves and exits. In a multi-process job JAX's coordination service owns SIGTERM and agrees on
a common step for all processes; Orbax exposes that as ``reached_preemption(step)``, which
``PreemptionWatcher`` also checks.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

STATE_ITEM = "state"
DATA_ITEM = "data"


def _grain_args():
    import grain  # pylint: disable=import-outside-toplevel
    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpointer:
    """Thin policy layer over ``ocp.CheckpointManager`` (what to keep, when, how to restore)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, every_steps: int = 0):
        """
        Args:
          directory: where step directories go (created if missing).
          keep: keep the newest ``keep`` checkpoints (>= 1).
          keep_every: also keep every checkpoint whose step is a multiple of this (0 = off).
          async_save: write arrays in a background thread.
          every_steps: periodic save interval used by ``should_save`` (0 = only final/preempt).
        """
        if keep < 1:
            raise ValueError(f"config.checkpoint.keep={keep} must be >= 1")
        if keep_every < 0 or every_steps < 0:
            raise ValueError(f"config.checkpoint.keep_every={keep_every} and every_steps="
                             f"{every_steps} must be >= 0")
        self.directory = epath.Path(directory)
        self.every_steps = int(every_steps)
        policies = [ocm.LatestN(n=int(keep))]
        if keep_every:
            policies.append(ocm.EveryNSteps(interval_steps=int(keep_every)))
        preservation = policies[0] if len(policies) == 1 else ocm.AnyPreservationPolicy(policies)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            enable_async_checkpointing=bool(async_save),
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def from_config(cls, config, workdir: str | os.PathLike) -> "Checkpointer":
        c = config.checkpoint
        return cls(epath.Path(workdir) / "checkpoints", keep=int(c.keep),
                   keep_every=int(c.get("keep_every", 0)), async_save=bool(c.async_save),
                   every_steps=int(c.every_steps))

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Orbax's multi-host preemption sync point (False when no coordination service)."""
        return bool(self.manager.reached_preemption(step))

    def should_save(self, step: int) -> bool:
        """Periodic schedule: every ``every_steps`` steps."""
        return self.every_steps > 0 and step % self.every_steps == 0

    # -- save / restore ------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> bool:
        """Starts saving ``state`` (a pytree of jax.Arrays) and the iterator position at ``step``.

        Returns False when ``step`` is already saved. The arrays are copied before this returns
        (so the caller may donate them); the write finishes in the background.
        """
        if step in self.manager.all_steps():
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            grain_save, _ = _grain_args()
            items[DATA_ITEM] = grain_save(data_iterator)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        logging.info("checkpoint: %s step %d to %s", "saving" if saved else "skipped", step,
                     self.directory)
        return bool(saved)

    def restore(self, abstract_state: Any, data_iterator: Any | None = None,
                step: int | None = None) -> tuple[int, Any]:
        """Restores ``step`` (default: latest) into ``abstract_state``'s structure and shardings.

        ``abstract_state``: pytree of jax.ShapeDtypeStruct with ``.sharding`` set, so each
        process reads only its shards. ``data_iterator`` is restored in place.
        Returns (step, state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            _, grain_restore = _grain_args()
            items[DATA_ITEM] = grain_restore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return step, restored[STATE_ITEM]

    def restore_params(self, abstract_params: Any, key: str = "ema_params",
                       step: int | None = None) -> tuple[int, Any]:
        """Only one parameter tree (default: the EMA weights) of a saved train state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        target = {key: abstract_params}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=getattr(x, "sharding", None)), target)
        # Partial restore reads only this subtree's arrays (PyTree handler, not the manager:
        # the manager registers ``state`` with the full-tree Standard handler).
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(
                self.directory / str(step) / STATE_ITEM,
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                            partial_restore=True))
        return step, restored[key]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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
