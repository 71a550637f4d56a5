"""The train step's rung per step, chosen on the host from the step's own mask draw.

Why on the host: the work-proportional encoder and head loss need the step's visible and
masked counts as static sizes. Inside one program a ``lax.switch`` over rungs keeps every
branch's residuals under ``grad``, which cancelled the saving (docs/ARCHITECTURE.md). The
mask is a pure function of the run's key and the step number, so the host can draw it
before it dispatches the step, with the function the loss would use on device
(``losses.training_mask``; threefry gives the same bits on every platform), hand it in with
the batch, and call a plain program compiled for exactly that rung.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax import losses, models
from emigm_jax import sharding as shd
from emigm_jax.buckets import rung_at


def step_key(key_data: jax.Array, step: jax.Array) -> jax.Array:
    """The step's key: a pure function of the run's key and the step number."""
    return jax.random.fold_in(jax.random.wrap_key_data(key_data), step)


def micro_key(step_rng: jax.Array, i, accum: int) -> jax.Array:
    """The loss key of micro-batch ``i`` (the step's key itself without accumulation)."""
    return step_rng if accum == 1 else jax.random.fold_in(step_rng, i)


class StepRung(NamedTuple):
    """The static sizes one compiled train step runs at (0: the config's full size)."""
    encoder_capacity: int = 0  # encoder slots: buffer + visible tokens
    loss_rows: int = 0         # head-loss rows per sample: masked tokens


HOST_MASK_KEYS = ("mask", "mask_p")  # batch entries the host's mask draw adds


class StepDispatch:
    """The train step as the loop calls it: (state, step, host-local batch[, aux]) ->
    (state, metrics), with the batch put onto the mesh here.

    Work-proportional training (``train.ladders``, eMIGM's own loss): the host draws the step's
    mask from the step's key, the draw ``losses.training_mask`` makes on device (threefry, so
    the same bits on every platform), hands it to the step with the batch, and calls the step
    compiled for the smallest encoder rung holding buffer + the batch's most visible tokens and
    the smallest loss rung holding its most masked tokens. Each program is plain, with no
    ``lax.switch``: under ``grad`` a switch keeps every branch's residuals, which cancelled the
    saving (docs/ARCHITECTURE.md). A rung compiles at its first use; when the batch shares
    its count each encoder rung meets one loss rung (``rung``), so at most
    ``len(encoder_ladder)`` programs compile.

    Without ladders (or with a custom loss) there is one full-capacity program, and the step
    draws its mask on device.
    """

    def __init__(self, config, build: Callable[[StepRung], Callable], mesh,
                 key_data: np.ndarray | None):
        self.config, self.mesh, self._build = config, mesh, build
        self._steps: dict[StepRung, Callable] = {}
        self.key_data = key_data  # None: the step draws its own mask (one program)
        if key_data is not None:
            self._cpu = jax.local_devices(backend="cpu")[0]
            self._draw = jax.jit(functools.partial(_global_mask_draw, config))
            self._key = jax.device_put(np.asarray(key_data, np.uint32), self._cpu)
            self._ladders = train_ladders(config)

    def host_mask(self, step: int) -> dict[str, np.ndarray]:
        """The global batch's mask draw of ``step``: {'mask': [B, N] bool, 'mask_p': [B]}."""
        mask, p = self._draw(self._key, jax.device_put(np.int32(step), self._cpu))
        return {"mask": np.asarray(mask), "mask_p": np.asarray(p)}

    def rung(self, mask: np.ndarray) -> StepRung:
        """The smallest rungs holding buffer + the most visible, and the most masked, tokens.

        The loss rung is at least the one paired with the encoder rung (holding one more
        token than the fewest masked the encoder rung allows), so with a batch-shared count
        each encoder rung meets one loss rung: a count exactly at an encoder rung's top would
        otherwise meet a second pair, one more compile, to save a single row.
        """
        n, buffer = mask.shape[1], int(self.config.model.buffer_size)
        masked = mask.sum(axis=1)
        enc, rows = self._ladders
        cap = rung_at(enc, buffer + int(n - masked.min()))
        paired = n - (cap - buffer) + 1
        return StepRung(cap, rung_at(rows, max(int(masked.max()), min(paired, n))))

    def step_for(self, rung: StepRung) -> Callable:
        if rung not in self._steps:
            if self._steps:
                logging.info("train step: compiling rung %s (%d so far)", rung, len(self._steps))
            self._steps[rung] = self._build(rung)
        return self._steps[rung]

    @property
    def compiled_rungs(self) -> tuple[StepRung, ...]:
        return tuple(self._steps)

    def __call__(self, state, step: int, local_batch, *aux):
        if self.key_data is None:
            return self.step_for(StepRung())(state, shd.global_batch(local_batch, self.mesh), *aux)
        drawn = self.host_mask(step)
        rung = self.rung(drawn["mask"])
        b = len(jax.tree.leaves(local_batch)[0])  # this process's rows of the global batch
        lo = jax.process_index() * b
        local = {**local_batch, **{k: v[lo:lo + b] for k, v in drawn.items()}}
        return self.step_for(rung)(state, shd.global_batch(local, self.mesh), *aux)


def _global_mask_draw(config, key_data: jax.Array, step: jax.Array):
    """(mask [B, N], p [B]) of the global batch at ``step``: micro-batch i's draw (key
    ``micro_key``) on its rows i::k, as ``make_train_step`` splits them."""
    accum, b = int(config.train.grad_accum), int(config.train.batch_size)
    n, rng = models.seq_len(config), step_key(key_data, step)
    draws = [losses.training_mask(micro_key(rng, i, accum), b // accum, n, config)
             for i in range(accum)]
    interleave = lambda xs: jnp.swapaxes(jnp.stack(xs), 0, 1).reshape((b,) + xs[0].shape[1:])
    return interleave([d.mask for d in draws]), interleave([d.p for d in draws])


def uses_host_masks(config, loss_fn) -> bool:
    """Whether ``StepDispatch`` draws masks on the host: ``train.ladders`` with eMIGM's loss
    and a ladder of more than one rung."""
    if not config.train.ladders or loss_fn is not None or config.model.arch == "ar":
        return False
    return any(len(ladder) > 1 for ladder in train_ladders(config))


def train_ladders(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder rungs, loss-row rungs) of the train step; the categorical head's loss has no
    row rungs, (0,)."""
    rows = models.loss_ladder(config) if config.model.head == "diffusion" else (0,)
    return models.encoder_ladder(config), rows
