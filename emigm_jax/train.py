"""Train state, optimizer, the sharded train step, and the training loop.

Recipe (eMIGM paper, App. D): AdamW (b1 0.9, b2 0.95, weight decay 0.02 on the transformer's >=2-D
weights only), lr = base_lr * global_batch / 256 with linear warmup then constant, gradient
clipping to global norm 3.0, EMA of the parameters (decay 0.9999; the EMA weights are the ones
used for sampling), fp32 master parameters with the compute dtype from ``config.model.dtype``.

Design points:
  * The whole state is one pytree (``TrainState``), sharded by ``emigm_jax.sharding`` rules and
    donated to a single ``jax.jit`` step with explicit in/out shardings.
  * The step's randomness is ``fold_in(base_key, step)``: a pure function of the step number,
    so a resumed run draws exactly what an uninterrupted run draws.
  * Non-finite guard: a step whose loss or gradient norm is not finite leaves params, optimizer
    state and EMA unchanged (the step counter and data still advance). The longest streak of
    such steps is kept in the state; the loop stops with a clear error once it reaches
    ``train.max_nonfinite_steps`` (0: at the first non-finite step). The streak is only read
    at log time, so the guard adds no per-step host synchronisation.
  * ``StepDispatch`` (``emigm_jax.step_dispatch``) runs each step at the smallest capacity
    rung holding its mask, one plain compiled program per rung; the recipe's schedule and
    optimizer are ``emigm_jax.optim``.
  * Gradient accumulation splits the global batch into ``train.grad_accum`` micro-batches
    (rows i::k, so every device keeps its own rows) and averages their gradients in a
    ``lax.scan``; each micro-batch draws its own masking time.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm.auto import tqdm

from emigm_jax import losses, models
from emigm_jax import sharding as shd
from emigm_jax import workdir as workdir_lib
from emigm_jax.checkpoint import Checkpointer, PreemptionWatcher
from emigm_jax.data import pipeline
from emigm_jax.data.step_encoder import IMAGE_SOURCES, PrepareFn, image_encoder
from emigm_jax.optim import (lr_schedule, make_optimizer, peak_lr, steps_per_epoch,  # noqa: F401
                             total_steps, warmup_steps)
from emigm_jax.step_dispatch import (HOST_MASK_KEYS, StepDispatch, StepRung, micro_key,  # noqa: F401
                                     step_key, uses_host_masks)

LossFn = Callable[..., tuple[jax.Array, dict]]  # (params, batch, rng, config, train) -> (loss, metrics)


@flax.struct.dataclass
class TrainState:
    step: jax.Array                  # [] int32, optimisation steps taken (incl. skipped ones)
    params: Any                      # fp32 master parameters
    ema_params: Any                  # EMA of params (used for sampling)
    opt_state: Any                   # optax state
    rng: jax.Array                   # [2] uint32 raw key data (serialisable)
    nonfinite_streak: jax.Array      # [] int32, current run of non-finite steps
    nonfinite_max_streak: jax.Array  # [] int32, longest run so far
    nonfinite_total: jax.Array       # [] int32, all skipped steps


# ---------------------------------------------------------------------------------------------
# State.

def init_train_state(params, optimizer: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
    """Fresh state: EMA starts as a copy of the parameters (as in the reference)."""
    zero = jnp.zeros((), jnp.int32)
    key_data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    return TrainState(step=zero, params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=key_data.astype(jnp.uint32),
                      nonfinite_streak=zero, nonfinite_max_streak=zero, nonfinite_total=zero)


# ---------------------------------------------------------------------------------------------
# The step.

_PREPARE_STREAM = 0x5EED  # fold_in tag: the input-encoding noise stream of a step


def _split_microbatches(batch, k: int):
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i::k (no cross-device movement)."""
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(config, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_fn: LossFn | None = None, prepare_batch: PrepareFn | None = None,
                    rung: StepRung = StepRung()) -> Callable[..., tuple[TrainState, dict]]:
    """Pure (state, batch[, aux]) -> (state, metrics); jit it with ``jit_train_step``.

    The step is one plain program at ``rung`` (default: full capacity, exact for any mask);
    ``StepDispatch`` picks the rung per step. ``prepare_batch(aux, batch, rng)`` runs first,
    on device, when the input pipeline yields something other than tokens (images from a
    folder/TFDS source: ``aux`` holds the frozen tokenizer weights that encode them).
    """
    loss_fn = losses.loss_fn if loss_fn is None else loss_fn
    step_config = models.at_rung(config, *rung)
    accum = int(config.train.grad_accum)
    ema_decay = float(config.optim.ema_decay)

    def loss_and_grad(params, batch, rng):
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)  # w.r.t. params
        (loss, metrics), grads = value_and_grad(params, batch, rng, step_config, train=True)
        return loss, metrics, grads

    def step_fn(state: TrainState, batch, aux=None) -> tuple[TrainState, dict]:
        step_rng = step_key(state.rng, state.step)
        if prepare_batch is not None:
            drawn = {k: batch[k] for k in HOST_MASK_KEYS if k in batch}
            batch = prepare_batch(aux, {k: v for k, v in batch.items() if k not in drawn},
                                  jax.random.fold_in(step_rng, _PREPARE_STREAM))
            batch = {**batch, **drawn}
        if accum == 1:
            loss, metrics, grads = loss_and_grad(state.params, batch, step_rng)
        else:
            micro = _split_microbatches(batch, accum)

            def body(carry, xs):
                i, mb = xs
                l, m, g = loss_and_grad(state.params, mb, micro_key(step_rng, i, accum))
                acc = jax.tree.map(jnp.add, carry, (l, m, g))
                return acc, None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                loss_and_grad, state.params, jax.tree.map(lambda x: x[0], micro), step_rng))
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))

        new_state, grad_norm, ok = apply_gradients(state, grads, loss, optimizer, ema_decay)
        out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        out.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                   lr=jnp.asarray(schedule(state.step), jnp.float32),
                   nonfinite=(~ok).astype(jnp.float32))
        return new_state, out

    return step_fn


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation,
                    ema_decay: float) -> tuple[TrainState, jax.Array, jax.Array]:
    """(new state, grad norm, ok): the optimizer and EMA update, skipped (state kept, streak
    counted) when the loss or the gradient norm is not finite."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                           state.ema_params, new_params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        ema_params=keep(new_ema, state.ema_params),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite_streak=streak,
        nonfinite_max_streak=jnp.maximum(state.nonfinite_max_streak, streak),
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
    )
    return new_state, grad_norm, ok


def jit_train_step(step_fn, state_sharding, mesh, donate: bool = True, aux_sharding=None):
    """jax.jit with explicit shardings: state as given, batch over (data, fsdp), metrics
    replicated; ``aux_sharding`` (e.g. replicated tokenizer weights) adds a third argument."""
    in_sh = (state_sharding, shd.batch_sharding(mesh))
    if aux_sharding is not None:
        in_sh = in_sh + (aux_sharding,)
    return jax.jit(shd.with_mesh_context(step_fn, mesh), in_shardings=in_sh,
                   out_shardings=(state_sharding, shd.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def make_step_dispatch(config, optimizer, schedule, mesh, state_sharding, key_data,
                       loss_fn: LossFn | None = None, prepare_batch: PrepareFn | None = None,
                       aux_sharding=None, donate: bool = True) -> StepDispatch:
    """``StepDispatch`` over ``jit_train_step(make_train_step(...))`` programs; ``key_data``:
    the state's ``rng`` as numpy (read once: it never changes during a run)."""
    def build(rung: StepRung):
        return jit_train_step(make_train_step(config, optimizer, schedule, loss_fn,
                                              prepare_batch, rung),
                              state_sharding, mesh, donate=donate, aux_sharding=aux_sharding)
    host = uses_host_masks(config, loss_fn)
    return StepDispatch(config, build, mesh, np.asarray(key_data) if host else None)


def create_sharded_state(config, mesh, optimizer, init_params_fn: Callable[[jax.Array], Any],
                         rules=(), initialize: bool = True
                         ) -> tuple[TrainState | None, TrainState, TrainState]:
    """(state, abstract_state, shardings): state built directly in its sharded layout.

    ``init_params_fn(rng) -> params``; the init key and the train key both derive from
    ``config.seed``. ``initialize=False`` returns only the abstract state (ShapeDtypeStructs
    carrying their shardings) and shardings, e.g. to restore a checkpoint into.
    """
    init_rng, train_rng = jax.random.split(jax.random.key(int(config.seed)))
    train_key = jax.random.key_data(train_rng)

    def init(rng):
        return init_train_state(init_params_fn(rng), optimizer, train_key)

    abstract = jax.eval_shape(init, init_rng)
    shardings = shd.named_shardings(abstract, mesh, rules)  # scalars and the key: replicated
    state = jax.jit(init, out_shardings=shardings)(init_rng) if initialize else None
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return state, abstract, shardings


# ---------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class TrainResult:
    state: TrainState
    mesh: Any
    step: int                 # step reached (== total_steps unless preempted)
    total_steps: int
    start_step: int           # step this run resumed from (0 for a fresh run)
    train_seconds: float      # wall time of the loop in this run (compile included)
    preempted: bool
    last_metrics: dict
    train_rungs: tuple = ()   # StepRung of each compiled train-step program, in first use


Hook = Callable[[int, TrainState, Any], None]  # (step, state, checkpointer) after each step


def train(config, workdir: str | os.PathLike, *, loss_fn: LossFn | None = None,
          init_params_fn: Callable[[jax.Array], Any] | None = None,
          weight_decay_mask: Any = None, hooks: Sequence[Hook] = (),
          sample_fn: Callable[[TrainState, int], dict] | None = None,
          handle_signals: bool = True, progress: bool | None = None,
          accept_recipe_change: bool = False, allow_fresh_start: bool = False) -> TrainResult:
    """Trains ``config`` in ``workdir``, resuming from its newest intact checkpoint if any.

    The workdir is locked for the run; a resume is first checked against the workdir's
    config.json (``emigm_jax.workdir.check_resume``), which is written only once it proceeds.

    Args:
      loss_fn, init_params_fn, weight_decay_mask: default to the eMIGM model
        (``emigm_jax.losses.loss_fn``, ``emigm_jax.models.init_params``/``weight_decay_mask``).
      hooks: called after every step (tests use them to kill or signal the process).
      sample_fn: ``(state, step) -> {'image': uint8 grid, **scalars}``, called every
        ``train.sample_every`` steps; the grid goes to samples/step_*.png and TensorBoard, the
        scalars (e.g. a sample quality score) to the metric logs as ``sample/<name>``.
      handle_signals: install the SIGTERM handler (checkpoint and stop at the next step).
      accept_recipe_change: resume although batch size or optimizer fields changed.
      allow_fresh_start: start from step 0 although every checkpoint was found damaged.
    """
    workdir = os.fspath(workdir)
    lock = workdir_lib.acquire_lock(workdir) if jax.process_index() == 0 else None
    try:
        run = _setup(config, workdir, loss_fn, init_params_fn, weight_decay_mask,
                     accept_recipe_change, allow_fresh_start)
        if progress is None:
            progress = jax.process_index() == 0 and bool(config.train.progress)
        return _loop(config, workdir, run, hooks, sample_fn, handle_signals, progress)
    finally:
        if lock is not None:
            workdir_lib.release_lock(lock)


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built (and the resume decided) by ``_setup``."""
    mesh: Any
    data_iter: Any
    total_steps: int
    step_fn: StepDispatch
    extra_args: tuple
    ckpt: Checkpointer
    state: TrainState
    start: int


def _setup(config, workdir: str, loss_fn, init_params_fn, weight_decay_mask,
           accept_recipe_change: bool, allow_fresh_start: bool) -> _Run:
    """Checks the resume contract, builds the pieces, restores or initialises the state."""
    ckpt = Checkpointer.from_config(config, workdir)  # fails fast on an unwritable directory
    try:
        accepted = (workdir_lib.check_resume(config, workdir, accept_recipe_change)
                    if ckpt.all_steps() else [])
        init_params_fn = init_params_fn or functools.partial(models.init_params, config)
        mesh = shd.make_mesh(config.mesh)
        shd.check_batch_size(int(config.train.batch_size), mesh,
                             grad_accum=int(config.train.grad_accum))
        rules = shd.rules_from_config(config)
        data_iter, num_examples = pipeline.make_train_iterator(config)
        schedule = lr_schedule(config, num_examples)
        optimizer = make_optimizer(config, schedule, weight_decay_mask)
        _, abstract, shardings = create_sharded_state(config, mesh, optimizer, init_params_fn,
                                                      rules, initialize=False)
        restored = ckpt.restore(abstract, data_iter, rules)
        if restored is None:
            ckpt.check_fresh_start(allow_fresh_start)
            state = create_sharded_state(config, mesh, optimizer, init_params_fn, rules)[0]
            restored = (0, state)
        else:
            logging.info("resumed from step %d in %s", restored[0], ckpt.directory)
        prepare, aux = (image_encoder(config, mesh) if config.data.source in IMAGE_SOURCES
                        else (None, None))
        step_fn = make_step_dispatch(
            config, optimizer, schedule, mesh, shardings, shd.to_host(restored[1].rng), loss_fn,
            prepare, aux_sharding=shd.replicated(mesh) if aux is not None else None)
    except BaseException:
        ckpt.close()
        raise
    if jax.process_index() == 0:
        workdir_lib.write_record(config, workdir, accepted, restored[0])
    return _Run(mesh=mesh, data_iter=data_iter, total_steps=total_steps(config, num_examples),
                step_fn=step_fn, extra_args=() if aux is None else (aux,), ckpt=ckpt,
                state=restored[1], start=restored[0])


def nonfinite_limit_reached(max_streak: int, limit: int) -> bool:
    """``train.max_nonfinite_steps``: stop once this many consecutive steps were non-finite;
    0 means no tolerance (stop at the first one), never a stop on a healthy run."""
    return max_streak >= max(int(limit), 1)


def _log_metrics(pending: list[dict], state: TrainState, step: int, rate: float) -> dict:
    """Means of the pending step metrics, plus throughput and the non-finite count."""
    fetched = jax.device_get(pending)
    last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    last["steps_per_sec"] = rate
    last["nonfinite_total"] = float(jax.device_get(state.nonfinite_total))
    return last


def _check_nonfinite(config, state: TrainState, step: int, ckpt: Checkpointer) -> None:
    limit = int(config.train.max_nonfinite_steps)
    max_streak = int(jax.device_get(state.nonfinite_max_streak))
    if nonfinite_limit_reached(max_streak, limit):
        raise FloatingPointError(
            f"loss or gradient norm was non-finite for {max_streak} consecutive steps (limit "
            f"train.max_nonfinite_steps={limit}) by step {step}; updates were skipped. Lower "
            f"optim.base_lr, check the data, or use model.dtype='float32'. Last checkpoint: "
            f"{ckpt.latest_step()}")


def _sample(sample_fn, state: TrainState, step: int, workdir: str, writer) -> None:
    out = dict(sample_fn(state, step) or {})
    grid = out.pop("image", None)
    if jax.process_index() == 0 and grid is not None:
        _write_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)
        writer.image(step, "samples", grid)
    if out:
        writer.scalars(step, {f"sample/{k}": v for k, v in out.items()})


def _loop(config, workdir: str, run: _Run, hooks: Sequence[Hook], sample_fn,
          handle_signals: bool, progress: bool) -> TrainResult:
    ckpt, state, step, n_total = run.ckpt, run.state, run.start, run.total_steps
    watcher = PreemptionWatcher(ckpt, install=handle_signals)
    writer = workdir_lib.MetricWriter(workdir, resume_step=run.start)
    log_every = max(1, int(config.train.log_every))
    sample_every = int(config.train.sample_every)
    bar = tqdm(total=n_total, initial=step, disable=not progress, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    clock = workdir_lib.SegmentClock(workdir, run.start)
    t_log, step_log, pending, last, preempted = clock.t0, step, [], {}, False
    try:
        while step < n_total:
            state, metrics = run.step_fn(state, step, next(run.data_iter), *run.extra_args)
            step += 1
            pending.append(metrics)
            if len(pending) >= 2:
                # Bound the host's run-ahead to one step: keeps dispatch overlapped with compute
                # but makes a stop request (SIGTERM) take effect within about one step time.
                jax.block_until_ready(pending[-2]["loss"])
            bar.update(1)
            if step % log_every == 0 or step == n_total:
                now = time.perf_counter()
                rate = (step - step_log) / max(now - t_log, 1e-9)
                last = _log_metrics(pending, state, step, rate)
                pending, t_log, step_log = [], now, step
                writer.scalars(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", refresh=False)
                _check_nonfinite(config, state, step, ckpt)
            if sample_fn is not None and sample_every > 0 and step % sample_every == 0:
                _sample(sample_fn, state, step, workdir, writer)
            preempted = watcher.should_stop(step)
            if preempted or ckpt.should_save(step) or step == n_total:
                ckpt.save(step, state, run.data_iter)
                clock.record(step)
            for hook in hooks:
                hook(step, state, ckpt)
            if preempted:
                logging.warning("stopping at step %d after a preemption notice; rerun the same "
                                "command to resume", step)
                break
        ckpt.wait()
    finally:
        clock.record(ckpt.latest_step() or run.start)
        bar.close()
        writer.close()
        watcher.restore_handler()
        ckpt.close()
    return TrainResult(state=state, mesh=run.mesh, step=step, total_steps=n_total,
                       start_step=run.start, train_seconds=clock.seconds(), preempted=preempted,
                       last_metrics=last, train_rungs=run.step_fn.compiled_rungs)


def _write_png(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
