"""The optimizer recipe: lr schedule and AdamW with clipping (eMIGM paper, App. D).

lr = base_lr * global_batch / 256 with linear warmup, then constant or cosine; AdamW (b1 0.9,
b2 0.95) with weight decay on the transformer's >=2-D weights only; gradient clipping to a
global norm. Re-exported by ``emigm_jax.train``.
"""
from __future__ import annotations

import math
from typing import Any

import optax

from emigm_jax import models


def steps_per_epoch(config, num_examples: int) -> int:
    return max(1, math.ceil(num_examples / int(config.train.batch_size)))


def total_steps(config, num_examples: int) -> int:
    """``train.num_steps`` if > 0, else ``train.epochs`` epochs."""
    n = int(config.train.num_steps)
    if n > 0:
        return n
    return int(round(float(config.train.epochs) * steps_per_epoch(config, num_examples)))


def warmup_steps(config, num_examples: int) -> int:
    """``optim.warmup_steps`` if >= 0, else ``optim.warmup_epochs`` epochs."""
    n = int(config.optim.warmup_steps)
    if n >= 0:
        return n
    return int(round(float(config.optim.warmup_epochs) * steps_per_epoch(config, num_examples)))


def peak_lr(config) -> float:
    """lr = base_lr * global_batch / 256 (the reference's linear scaling rule)."""
    return float(config.optim.base_lr) * int(config.train.batch_size) / 256.0


def lr_schedule(config, num_examples: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak lr, then ``optim.decay``: constant (MAR and eMIGM train
    so, with an EMA) or cosine to 0 at the last step (more from a short, fixed budget).

    At step s < W the lr is peak * s / W (the reference's per-iteration epoch fraction).
    """
    peak, warm = peak_lr(config), warmup_steps(config, num_examples)
    rest = max(total_steps(config, num_examples) - warm, 1)
    after = (optax.cosine_decay_schedule(peak, rest) if config.optim.decay == "cosine"
             else optax.constant_schedule(peak))
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(config, schedule: optax.Schedule,
                   weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """clip_by_global_norm(grad_clip) -> AdamW(schedule, b1, b2, wd with mask).

    ``weight_decay_mask``: pytree of bools or a callable params -> pytree (default: the
    model's ``emigm_jax.models.weight_decay_mask``).
    """
    weight_decay_mask = models.weight_decay_mask if weight_decay_mask is None else weight_decay_mask
    o = config.optim
    return optax.chain(
        optax.clip_by_global_norm(float(o.grad_clip)),
        optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                    weight_decay=float(o.weight_decay), mask=weight_decay_mask),
    )
