"""The diffusion head's draw of the tokens revealed at one step, with CFG on epsilon.

The head only runs on the revealed tokens, in reveal order: ``lax.fori_loop`` calls of
``chunk`` tokens per sample while more than a chunk is left, then one call for the
remainder at the smallest rung of ``rungs`` (``plan.head_ladder``: 1, 2, 4, ... up to
``chunk``; one ``lax.switch`` branch each) holding it. A step thus costs the revealed count
rounded up only in its last call, as in the reference (which runs the head on exactly the
revealed tokens). The reveal count is shared by the batch, so every device runs the same
calls. Each position's initial noise is drawn per position, so the DPM-Solver path gives the
same tokens for any chunking (the DDPM path's per-step noise is drawn per call and does not
have this property).

The transformer output comes in reveal order (``transformer.ReadRows``: row i belongs to
position ``order[:, i]``), so the head reads contiguous rows; the denoiser's time embedding
is computed once per solver evaluation (all rows share the time).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from emigm_jax.buckets import gather_rows, put_rows, switch_on_count
from emigm_jax.diffusion import ddpm as ddpm_lib
from emigm_jax.diffusion import dpm_solver
from emigm_jax.sharding import gather_weights


@dataclasses.dataclass(frozen=True, eq=False)
class HeadDraw:
    """Static settings of the head's draw (built once per config)."""
    model: Any             # MaskedGenerator: ``method='head'`` is the denoiser
    c: int                 # channels of one token
    chunk: int             # tokens per sample per head call (the largest rung)
    rungs: tuple           # chunk sizes compiled as switch branches, last = chunk
    head_sampler: str      # dpm_solver | ddpm
    temperature: float     # DDPM only; DPM-Solver++ is deterministic
    solver_plan: Any       # dpm_solver plan, or None
    ddpm_process: Any      # DDPM diffusion, or None


def make_head_draw(sample_cfg, model, c: int, chunk: int,
                   rungs: tuple[int, ...] = ()) -> HeadDraw:
    sc = sample_cfg
    solver_plan = ddpm_process = None
    if sc.head_sampler == "dpm_solver":
        solver_plan = dpm_solver.make_plan(None, int(sc.solver_steps), int(sc.solver_order),
                                           sc.solver_method, sc.solver_skip)
    else:
        ddpm_process = ddpm_lib.default_ddpm_diffusion(int(sc.ddpm_steps))
    return HeadDraw(model=model, c=c, chunk=chunk, rungs=tuple(rungs) or (chunk,),
                    head_sampler=sc.head_sampler,
                    temperature=sc.temperature, solver_plan=solver_plan,
                    ddpm_process=ddpm_process)


def draw_at(hd: HeadDraw, params, zc, zu, w, x_t, rng, guided: bool):
    """Draws tokens from their conditions zc, zu [B, R, D] and noise x_t [B, R, C] -> [B, R, C].

    Guided: conditional and unconditional rows share x (the same noise) and
    eps = eps_u + w (eps_c - eps_u); the learned-variance half stays conditional.
    """
    b, r, c = x_t.shape
    zc = zc.reshape(b * r, -1)
    zu = zu.reshape(b * r, -1) if guided else None
    params = gather_weights(params, True, hd.model.dtype)  # FSDP: the head's weights
    apply = functools.partial(hd.model.apply, {"params": params}, method="head")

    def head(x, t):  # [M, C], [M] (one solver time for all rows) -> [M, 2C]
        t = t[:1]  # the time embedding once, broadcast over the rows
        if not guided:
            return apply(x, t, zc)
        oc, ou = jnp.split(apply(jnp.concatenate([x, x]), t, jnp.concatenate([zc, zu])), 2)
        return jnp.concatenate([ou[:, :c] + w * (oc[:, :c] - ou[:, :c]), oc[:, c:]], axis=1)

    x_t = x_t.reshape(b * r, c)
    if hd.head_sampler == "dpm_solver":
        x0 = dpm_solver.run_plan(lambda x, t: head(x, t)[:, :c], x_t, hd.solver_plan)
    else:
        x0 = ddpm_lib.ddpm_sample(head, x_t, rng, hd.ddpm_process, hd.temperature)
    return x0.reshape(b, r, c)


def revealed_values(hd: HeadDraw, params, z_c, z_u, w, noise, order, count, key, guided,
                    guidance: bool):
    """Values [B, N, C] at the first ``count`` positions of ``order`` [B, N] (others 0).

    z_c, z_u: [B, N, D] in reveal order (row i conditions position order[:, i]); noise
    [B, N, C] by position. ``(count - 1) // chunk`` calls of ``chunk`` rows per sample, then
    the remainder at its rung; the unconditional half only on guided steps (``lax.cond``).
    """
    b, n = order.shape
    ch = hd.chunk
    pad = lambda a, fill: jnp.concatenate([a, jnp.full((b, ch) + a.shape[2:], fill, a.dtype)],
                                          axis=1)
    order_pad, zc_pad, zu_pad = pad(order, n), pad(z_c, 0), pad(z_u, 0)
    full_calls = jnp.maximum(count - 1, 0) // ch

    def call(with_uncond: bool, start, size: int, j, out):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
        idx = rows(order_pad)  # [B, size] positions; n = padding
        x_t = gather_rows(noise, jnp.minimum(idx, n - 1))
        vals = draw_at(hd, params, rows(zc_pad), rows(zu_pad), w, x_t,
                       jax.random.fold_in(key, j), with_uncond)
        valid = (start + jnp.arange(size) < count)[None, :]  # [1, size]
        return put_rows(out, jnp.where(valid, idx, n), vals)  # n = dump row

    def run(with_uncond: bool):
        def values(_):
            out = jnp.zeros((b, n + 1, hd.c), jnp.float32)
            out = jax.lax.fori_loop(
                0, full_calls, lambda j, o: call(with_uncond, j * ch, ch, j, o), out)
            start = full_calls * ch

            def remainder(size: int):
                return lambda o: call(with_uncond, start, size, full_calls, o)
            return switch_on_count(count - start, hd.rungs, remainder, out)[:, :n]
        return values

    if not guidance:
        return run(False)(None)
    return jax.lax.cond(guided, run(True), run(False), None)
