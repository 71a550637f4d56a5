"""Training-time masking: the forward process q(x_t | x_0) (eMIGM paper, Sec. 3, Table 1).

Two distributions, equal in expectation (paper App. A):
  * ``bernoulli``: each token masked independently with probability gamma(p);
  * ``uniform_count``: exactly ceil(N * gamma(p)) tokens, uniformly without replacement.

Time: t ~ U[t_eps, 1 - t_eps], truncated to t >= t_min, then p = (1 - p_eps) t + p_eps (the
reference's guard against gamma(0) = 0). ``t_per='batch'`` is the reference variant: one t and
one Bernoulli vector for the whole batch, redrawn (t included) until at least ``min_masked``
tokens are masked, then permuted independently per sample, so every sample has the same masked
count (which is what lets the reference MAE encoder keep a fixed token count). The redraw is a
``lax.while_loop``: static shapes, exact rejection sampling, no host round-trip.

Conditional coupling (``mask.coupling_ratio`` c > 0; Discrete Interpolants paper, App. on
C-coupling, after Gat et al. 2024): per sample, round(c N) positions drawn uniformly are never
masked (a "null scheduler" at those positions), the others follow the schedule; the draw uses
its own key (``fold_in(rng, COUPLING_STREAM)``), so c = 0 leaves every other draw unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from emigm_jax.schedules import MaskSchedule, schedule_from_config


COUPLING_STREAM = 0xC0  # fold_in tag of the coupled-position draw


class MaskDraw(NamedTuple):
    mask: jax.Array   # [B, N] bool, True = masked
    p: jax.Array      # [B] float, the (truncated, eps-shifted) time fed to gamma and w
    ratio: jax.Array  # [B] float, gamma(p)


def draw_time(rng: jax.Array, shape, mask_cfg) -> jax.Array:
    """t ~ U[t_eps, 1 - t_eps], then max(t, t_min), then p = (1 - p_eps) t + p_eps."""
    t_eps = float(mask_cfg.t_eps)
    t = jax.random.uniform(rng, shape, minval=t_eps, maxval=1.0 - t_eps)
    t = jnp.maximum(t, mask_cfg.t_min)
    return (1.0 - mask_cfg.p_eps) * t + mask_cfg.p_eps


def row_ranks(x: jax.Array) -> jax.Array:
    """[B, N] -> [B, N] int: each entry's 0-based rank within its row, ascending, ties by
    position (``rank < k`` selects the k smallest of every row)."""
    return jnp.argsort(jnp.argsort(x, axis=1, stable=True), axis=1, stable=True)


def _count_mask(rng, ratio, n: int, min_masked: int) -> jax.Array:
    """Rows with exactly clip(ceil(n * ratio), min_masked, n) masked positions, uniformly placed."""
    b = ratio.shape[0]
    count = jnp.clip(jnp.ceil(n * ratio - 1e-6).astype(jnp.int32), min_masked, n)  # [B]
    return row_ranks(jax.random.uniform(rng, (b, n))) < count[:, None]


def _permute_rows(rng, vec, b: int) -> jax.Array:
    """Tile vec [N] to [B, N] with an independent random permutation per row."""
    keys = jax.random.split(rng, b)
    return jax.vmap(lambda k: jax.random.permutation(k, vec))(keys)


def sample_mask(rng: jax.Array, batch: int, n: int, mask_cfg,
                schedule: MaskSchedule | None = None) -> MaskDraw:
    """Draws a training mask for a batch of ``batch`` sequences of ``n`` tokens."""
    schedule = schedule or schedule_from_config(mask_cfg)
    min_masked = int(mask_cfg.min_masked)
    if min_masked > n:
        raise ValueError(f"mask.min_masked={min_masked} exceeds the sequence length {n}")
    per_batch = mask_cfg.t_per == "batch"
    t_shape = () if per_batch else (batch,)
    rows = 1 if per_batch else batch
    rng_loop, rng_perm = jax.random.split(rng)

    if mask_cfg.distribution == "uniform_count":
        rng_t, rng_m = jax.random.split(rng_loop)
        p = draw_time(rng_t, t_shape, mask_cfg)
        ratio = jnp.broadcast_to(schedule.gamma(p), (rows,))
        mask = _count_mask(rng_m, ratio, n, min_masked)  # [rows, N]
    else:
        def draw(key):
            k_t, k_m = jax.random.split(key)
            p = draw_time(k_t, t_shape, mask_cfg)
            ratio = jnp.broadcast_to(schedule.gamma(p), (rows,))
            m = jax.random.uniform(k_m, (rows, n)) < ratio[:, None]
            return jnp.broadcast_to(p, (rows,)), m

        def cond(state):
            _, _, m, _ = state
            return jnp.any(jnp.sum(m, axis=1) < min_masked)

        def body(state):
            key, p, m, it = state
            key, sub = jax.random.split(key)
            p_new, m_new = draw(sub)
            redo = jnp.sum(m, axis=1) < min_masked  # [rows]: redraw only failing rows
            return (key, jnp.where(redo, p_new, p), jnp.where(redo[:, None], m_new, m), it + 1)

        key0, sub0 = jax.random.split(rng_loop)
        p0, m0 = draw(sub0)
        _, p, mask, _ = jax.lax.while_loop(cond, body, (key0, p0, m0, jnp.int32(0)))
        ratio = schedule.gamma(p)

    if per_batch:
        # One vector for the batch, each sample a different random arrangement of it.
        mask = _permute_rows(rng_perm, mask[0], batch)
        p = jnp.broadcast_to(p.reshape(()), (batch,))
        ratio = jnp.broadcast_to(ratio.reshape(-1)[0], (batch,))
    coupling = float(mask_cfg.coupling_ratio)
    if coupling > 0:
        mask = mask & ~coupled_positions(jax.random.fold_in(rng, COUPLING_STREAM), batch, n,
                                         coupling)
    return MaskDraw(mask=mask, p=jnp.broadcast_to(p, (batch,)), ratio=ratio)


def coupled_positions(rng: jax.Array, batch: int, n: int, ratio: float) -> jax.Array:
    """[B, N] bool: round(ratio * N) uniformly placed positions per row (never masked)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask.coupling_ratio={ratio!r} is invalid: expected a value in [0, 1)")
    k = int(round(ratio * n))
    return row_ranks(jax.random.uniform(rng, (batch, n))) < k
