"""The diffusion head's draw of the tokens revealed at one step, with CFG on epsilon.

The head only runs on the revealed tokens: a ``lax.fori_loop`` over chunks of ``chunk``
tokens per sample, gathered in reveal order, so a step costs O(tokens revealed) as in the
reference instead of O(N). The reveal count is shared by the batch, so every device runs
the same number of calls. Each position's initial noise is drawn per position, so the
DPM-Solver path gives the same tokens for any chunk size (the DDPM path's per-step noise is
drawn per chunk and does not have this property).

The chunk itself follows the revealed count: ``rungs`` (``plan.head_ladder``: powers of two
up to ``chunk``) are compiled as ``lax.switch`` branches and the smallest one holding the
count runs, so a 1-3 token reveal costs 1-4 rows per sample, not ``chunk``.
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


def draw_at(hd: HeadDraw, params, z_c, z_u, w, noise, rng, guided: bool, idx):
    """Draws the tokens at idx [B, cap] from their noise [B, N, C] -> [B, cap, C].

    Guided: conditional and unconditional rows share x (the same noise) and
    eps = eps_u + w (eps_c - eps_u); the learned-variance half stays conditional.
    """
    b, cap = idx.shape
    c = hd.c
    zc = gather_rows(z_c, idx).reshape(b * cap, -1)
    zu = gather_rows(z_u, idx).reshape(b * cap, -1) if guided else None
    x_t = gather_rows(noise, idx).reshape(b * cap, c)
    params = gather_weights(params, True, hd.model.dtype)  # FSDP: the head's weights
    apply = functools.partial(hd.model.apply, {"params": params}, method="head")

    def head(x, t):  # [M, C], [M] -> [M, 2C]
        if not guided:
            return apply(x, t, zc)
        oc, ou = jnp.split(apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                 jnp.concatenate([zc, zu])), 2)
        return jnp.concatenate([ou[:, :c] + w * (oc[:, :c] - ou[:, :c]), oc[:, c:]], axis=1)

    if hd.head_sampler == "dpm_solver":
        x0 = dpm_solver.run_plan(lambda x, t: head(x, t)[:, :c], x_t, hd.solver_plan)
    else:
        x0 = ddpm_lib.ddpm_sample(head, x_t, rng, hd.ddpm_process, hd.temperature)
    return x0.reshape(b, cap, c)


def chunked_draw(hd: HeadDraw, params, z_c, z_u, w, noise, order, count, key, guided: bool,
                 ch: int = 0):
    """Values [B, N, C] for the first ``count`` positions of ``order`` [B, N] (others 0).

    ceil(count / ch) head calls of ``ch`` (default ``hd.chunk``) tokens per sample; the last
    chunk is padded with a dump row n.
    """
    b, n = order.shape
    ch = ch or hd.chunk
    order_pad = jnp.concatenate([order, jnp.full((b, ch), n, order.dtype)], axis=1)

    def body(j, out):
        start = j * ch
        idx = jax.lax.dynamic_slice_in_dim(order_pad, start, ch, axis=1)
        valid = (start + jnp.arange(ch) < count)[None, :]  # [1, ch]
        vals = draw_at(hd, params, z_c, z_u, w, noise, jax.random.fold_in(key, j), guided,
                       jnp.minimum(idx, n - 1))
        pos = jnp.where(valid, idx, n)  # [B, ch]; n = dump row
        return put_rows(out, pos, vals)

    n_calls = (count + ch - 1) // ch
    out = jnp.zeros((b, n + 1, hd.c), jnp.float32)
    return jax.lax.fori_loop(0, n_calls, body, out)[:, :n]


def revealed_values(hd: HeadDraw, params, z_c, z_u, w, noise, order, count, key, guided,
                    guidance: bool):
    """``chunked_draw`` at the smallest chunk rung holding ``count``, with the unconditional
    half only on guided steps (``lax.cond``)."""
    def run(with_uncond: bool):
        def at(ch):
            return lambda: chunked_draw(hd, params, z_c, z_u, w, noise, order, count, key,
                                        with_uncond, ch)
        return lambda _: switch_on_count(count, hd.rungs, at)

    if not guidance:
        return run(False)(None)
    return jax.lax.cond(guided, run(True), run(False), None)
