"""Static size ladders: do work proportional to a run-time count with static shapes.

Why: the MAE encoder, the training head loss and the sampler's diffusion head each have a
natural size that is only known at run time (visible tokens, masked tokens, revealed
tokens), shared by the batch (or bounded by its maximum). XLA needs static shapes, so each
of them compiles one branch per rung of a small ladder of sizes and ``lax.switch`` runs only
the smallest rung that holds the count. The top rung is always the full size, so any count
is served exactly; a ladder of one rung is the plain full-size program.

Compile-time cost: one traced and compiled copy of the bucketed computation per rung
(measured in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def count_ladder(n: int, fractions: Sequence[float], offset: int = 0,
                 top: int = 0) -> tuple[int, ...]:
    """Rungs offset + ceil(f * n) for each fraction f in (0, 1), plus the top rung.

    ``top`` (default offset + n) caps every rung and is always the last one. Returns the
    sorted distinct sizes, e.g. count_ladder(256, (0.25, 0.5), 64) = (128, 192, 320).
    """
    top = top or offset + n
    rungs = {min(offset + math.ceil(float(f) * n - 1e-9), top) for f in fractions}
    return tuple(sorted(r for r in rungs | {top} if r > 0))


def rung_index(need: jax.Array, rungs: Sequence[int]) -> jax.Array:
    """Index of the smallest rung >= need (scalar int32); the top rung when none holds it."""
    idx = jnp.searchsorted(jnp.asarray(rungs, jnp.int32), need.astype(jnp.int32), side="left")
    return jnp.minimum(idx, len(rungs) - 1).astype(jnp.int32)


def rung_at(rungs: Sequence[int], count: int) -> int:
    """The smallest rung holding ``count`` (the top one when none does): the host-side twin of
    ``rung_index``, for counts the host knows before it dispatches."""
    return min([r for r in rungs if r >= count] or [rungs[-1]])


def switch_on_count(need: jax.Array, rungs: Sequence[int],
                    branch: Callable[[int], Callable], *operands):
    """Runs ``branch(rung)(*operands)`` for the smallest rung holding ``need`` (a scalar).

    With one rung it is a plain call: no switch in the program.
    """
    if len(rungs) == 1:
        return branch(rungs[0])(*operands)
    return jax.lax.switch(rung_index(need, rungs), [branch(r) for r in rungs], *operands)


def keep_first_order(keep: jax.Array) -> jax.Array:
    """Permutation per row that lists kept positions first, each group in original order.

    keep: [B, L] bool -> [B, L] int32.
    """
    return jnp.argsort(jnp.logical_not(keep).astype(jnp.int32), axis=1, stable=True)


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Per-sample row gather: x [B, N, ...], idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def put_rows(out: jax.Array, pos: jax.Array, vals: jax.Array) -> jax.Array:
    """Per-sample row scatter: out [B, M, ...] with out[b, pos[b, k]] = vals[b, k].

    Why vmap: a scatter indexed by (arange(B), pos) hides that the batch dim is shared by
    operand, indices and updates, so GSPMD gathers the whole batch onto every device when
    the rows are sharded; the vmapped scatter carries the batch as a batching dim and stays
    local to each device's examples (tests/test_plan.py checks the compiled collectives).
    """
    return jax.vmap(lambda o, p, v: o.at[p].set(v))(out, pos, vals)


def check_fractions(value, field: str) -> str | None:
    """None when ``value`` is a strictly increasing sequence of fractions in (0, 1), else the
    reason (for config validation)."""
    try:
        fr = [float(f) for f in value]
    except (TypeError, ValueError):
        return f"config.{field}={value!r} is invalid: expected a tuple of fractions in (0, 1)"
    if any(not 0.0 < f < 1.0 for f in fr) or any(a >= b for a, b in zip(fr, fr[1:])):
        return (f"config.{field}={tuple(value)!r} is invalid: expected strictly increasing "
                "fractions in (0, 1) (the full size is always the last rung)")
    return None
