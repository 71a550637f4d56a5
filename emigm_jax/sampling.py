"""The mask-prediction sampler: one jit-compiled ``lax.scan`` over steps, static shapes.

Per step k on the grid t_k = linspace(1, t_end, num_iter + 1) (t = t_k, s = t_{k+1}):

1. The transformer runs on the current tokens and mask. Inside the CFG interval
   (cfg_t_min < s <= cfg_t_max, and cfg_scale != 1) it also runs the unconditional batch
   (labels -1: the mask token / fake class); outside it the unconditional pass is skipped by
   ``lax.cond``, which is where interval CFG saves NFE.
2. Reveal rule (SPEC section 4): every masked token is revealed with probability
   (gamma(t) - gamma(s)) / gamma(t). ``order='random'`` is the reference variant: one
   binomial count for the whole batch, at least 1 per step, everything left at the last
   step, positions in random order per sample. ``order='confidence'`` (categorical head) is
   MaskGIT's: after the step ceil(N * gamma(s)) tokens stay masked, the revealed ones are
   those with the highest log-probability plus Gumbel noise whose temperature
   ``choice_temperature`` anneals linearly to 0.
3. The revealed tokens are drawn from the head: DPM-Solver++ (deterministic, temperature
   ignored) or DDPM with temperature for the diffusion head, with CFG applied to epsilon in
   every model evaluation; temperature / top-k / top-p for the categorical head, CFG on logits.

The diffusion head only runs on the tokens revealed at that step, gathered into a static
buffer: its capacity is a per-step bound computed on the host (``StepPlan``), rounded up to a
few buckets selected with ``lax.switch``, so the head costs O(tokens revealed) as in the
reference rather than O(N) per step. ``sample.head_capacity='full'`` runs it on all N.

NFE = num_iter + number of guided steps, computed by the scan itself (``info['nfe']``) and
predicted on the host by ``expected_nfe(config.sample)``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.diffusion import ddpm as ddpm_lib
from emigm_jax.diffusion import dpm_solver
from emigm_jax.models import build_model, seq_len, token_dim
from emigm_jax.schedules import MaskSchedule, schedule_from_config

CFG_SCHEDULES = ("constant", "linear", "power", "cubic", "exp", "cosine")
HEAD_CAPACITIES = ("auto", "full")


# ----------------------------------------------------------------------------- host plan
def time_grid(sample_cfg) -> np.ndarray:
    """t_0 = 1 > t_1 > ... > t_K = t_end, float64 [K + 1]."""
    return np.linspace(1.0, float(sample_cfg.t_end), int(sample_cfg.num_iter) + 1)


def guided_steps(sample_cfg) -> np.ndarray:
    """bool [K]: steps that run the unconditional pass (cfg_t_min < s <= cfg_t_max)."""
    s = time_grid(sample_cfg)[1:]
    on = (s > sample_cfg.cfg_t_min) & (s <= sample_cfg.cfg_t_max)
    if float(sample_cfg.cfg_scale) == 1.0:
        on[:] = False
    return on


def expected_nfe(sample_cfg) -> int:
    """Network forward passes per image: one per step plus one per guided step."""
    return int(sample_cfg.num_iter) + int(guided_steps(sample_cfg).sum())


def reveal_probabilities(sample_cfg, schedule: MaskSchedule | None = None) -> np.ndarray:
    """float64 [K]: (gamma(t) - gamma(s)) / gamma(t); 1 at the last step."""
    schedule = schedule or schedule_from_config(sample_cfg)
    grid = time_grid(sample_cfg)
    g = schedule.gamma(grid, np)
    p = 1.0 - g[1:] / g[:-1]
    p[-1] = 1.0
    return np.clip(p, 0.0, 1.0)


def head_capacities(sample_cfg, n: int, schedule: MaskSchedule | None = None) -> np.ndarray:
    """int [K]: a bound on the tokens revealed per step, bucketed to N / 2^j.

    The expected count at step k is N * (gamma(t) - gamma(s)) (all that is left at the last
    step, N * gamma(t)); the bound adds 8 standard deviations of a Poisson count plus 8, so
    the probability that a step reveals more than its buffer holds is negligible (and if it
    ever happens, the surplus stays masked and is revealed at the next step; the last step's
    bound covers everything still masked with the same margin).
    """
    mode = sample_cfg.get("head_capacity", "auto")
    if mode not in HEAD_CAPACITIES:
        raise ConfigError(f"config.sample.head_capacity={mode!r} is invalid: expected one of "
                          f"{HEAD_CAPACITIES}")
    if mode == "full":
        return np.full(int(sample_cfg.num_iter), n, np.int64)
    schedule = schedule or schedule_from_config(sample_cfg)
    g = schedule.gamma(time_grid(sample_cfg), np)
    expected = n * (g[:-1] - g[1:])
    expected[-1] = n * g[-2]
    bound = np.ceil(expected + 8.0 * np.sqrt(np.maximum(expected, 1.0)) + 8.0)
    buckets = [n // 2 ** j for j in range(5) if n // 2 ** j >= 8][::-1]
    caps = [next((b for b in buckets if b >= x), n) for x in bound]
    return np.asarray(caps, np.int64)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    t: np.ndarray          # [K]
    s: np.ndarray          # [K]
    p_reveal: np.ndarray   # [K]
    gamma_s: np.ndarray    # [K]
    guided: np.ndarray     # [K] bool
    capacity: np.ndarray   # [K] int
    buckets: tuple         # distinct capacities, ascending


def make_plan(sample_cfg, n: int) -> StepPlan:
    schedule = schedule_from_config(sample_cfg)
    grid = time_grid(sample_cfg)
    caps = head_capacities(sample_cfg, n, schedule)
    return StepPlan(t=grid[:-1], s=grid[1:], p_reveal=reveal_probabilities(sample_cfg, schedule),
                    gamma_s=schedule.gamma(grid[1:], np), guided=guided_steps(sample_cfg),
                    capacity=caps, buckets=tuple(sorted(set(int(c) for c in caps))))


def cfg_weight(scale, schedule: str, revealed_frac):
    """w_k inside the interval: constant w, or 1 + (w - 1) * shape(r_k)."""
    r = revealed_frac
    if schedule == "constant":
        return jnp.asarray(scale, jnp.float32) * jnp.ones_like(r)
    shape = {"linear": lambda r: r, "power": lambda r: r ** 2, "cubic": lambda r: r ** 3,
             "exp": lambda r: 1.0 - jnp.exp(-5.0 * r),
             "cosine": lambda r: jnp.cos(0.5 * math.pi * (1.0 - r))}
    if schedule not in shape:
        raise ValueError(f"unknown sample.cfg_schedule {schedule!r}; expected one of {CFG_SCHEDULES}")
    return 1.0 + (scale - 1.0) * shape[schedule](r)


def gumbel_scale(choice_temperature: float, k, num_iter: int):
    """MaskGIT's confidence-noise temperature after step k (0-based): linear decay to 0.

    At the last step (k = num_iter - 1) it is exactly 0, so the final choice is by confidence
    alone (and the last step reveals everything left anyway).
    """
    return choice_temperature * (1.0 - (k + 1.0) / num_iter)


# ------------------------------------------------------------------------ token samplers
def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k, then nucleus (top-p) filtering; logits [..., K]."""
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[..., ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        # keep the smallest set whose mass reaches top_p (always keeps the top token)
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(srt, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, cutoff_idx - 1, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def _gather_rows(x, idx):
    """x [B, N, ...], idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


# -------------------------------------------------------------------------------- sampler
def _sample_cfg_key(config) -> str:
    return json.dumps({"model": config.model.to_dict(), "sample": config.sample.to_dict()},
                      sort_keys=True, default=str)


def make_sampler(config, transformer_fn: Callable | None = None):
    """jitted ``(params, labels [B], rng) -> (tokens, info)`` for this config (cached)."""
    if transformer_fn is None:
        return _cached_sampler(_sample_cfg_key(config), config)
    return jax.jit(_build_sampler(config, transformer_fn))


_SAMPLERS: dict[str, Any] = {}


def _cached_sampler(key: str, config):
    if key not in _SAMPLERS:
        _SAMPLERS[key] = jax.jit(_build_sampler(config, None))
    return _SAMPLERS[key]


def _build_sampler(config, transformer_fn):
    validate_config(config)
    sc = config.sample
    model = build_model(config)
    n, c = seq_len(config), token_dim(config)
    categorical = config.model.head == "categorical"
    if sc.order == "confidence" and not categorical:
        raise ValueError("sample.order='confidence' needs token probabilities: it is only "
                         "available with model.head='categorical' (got 'diffusion')")
    plan = make_plan(sc, n)
    k_steps = int(sc.num_iter)
    cfg_scale = float(sc.cfg_scale)
    if transformer_fn is None:
        def transformer_fn(params, tokens, mask, labels):
            return model.apply({"params": params}, tokens, mask, labels, method="transformer")

    if not categorical:
        if sc.head_sampler == "dpm_solver":
            solver_plan = dpm_solver.make_plan(None, int(sc.solver_steps), int(sc.solver_order),
                                               sc.solver_method, sc.solver_skip)
        else:
            ddpm_process = ddpm_lib.default_ddpm_diffusion(int(sc.ddpm_steps))

    def head_out(params, x, t, z):
        return model.apply({"params": params}, x, t, z, method="head")

    def sample_diffusion(params, z_c, z_u, w, rng, cap: int, guided: bool, pred_idx):
        """Draws tokens at pred_idx [B, cap] -> [B, cap, C]."""
        b = z_c.shape[0]
        zc = _gather_rows(z_c, pred_idx).reshape(b * cap, -1)
        zu = _gather_rows(z_u, pred_idx).reshape(b * cap, -1) if guided else None
        rng_noise, rng_ddpm = jax.random.split(rng)
        noise = jax.random.normal(rng_noise, (b * cap, c), jnp.float32)

        def full_out(x, t):
            if not guided:
                return head_out(params, x, t, zc)
            out = head_out(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                           jnp.concatenate([zc, zu]))
            oc, ou = jnp.split(out, 2)
            eps = ou[:, :c] + w * (oc[:, :c] - ou[:, :c])
            return jnp.concatenate([eps, oc[:, c:]], axis=1)

        if sc.head_sampler == "dpm_solver":
            x0 = dpm_solver.run_plan(lambda x, t: full_out(x, t)[:, :c], noise, solver_plan)
        else:
            x0 = ddpm_lib.ddpm_sample(full_out, noise, rng_ddpm, ddpm_process, sc.temperature)
        return x0.reshape(b, cap, c)

    def step(carry, xs, params, labels):
        tokens, mask, rng, nfe = carry
        k, p_reveal, gamma_s, guided, bucket, is_last = xs
        b = tokens.shape[0]
        rng, r_count, r_order, r_head, r_gumbel = jax.random.split(rng, 5)

        # 1. transformer, with the unconditional pass only on guided steps
        def cond_only(_):
            z = transformer_fn(params, tokens, mask, labels)
            return z, jnp.zeros_like(z)

        def cond_and_uncond(_):
            z = transformer_fn(params, jnp.concatenate([tokens, tokens]),
                               jnp.concatenate([mask, mask]),
                               jnp.concatenate([labels, -jnp.ones_like(labels)]))
            return tuple(jnp.split(z, 2))

        if cfg_scale == 1.0 or not plan.guided.any():
            z_c, z_u = cond_only(None)
        else:
            z_c, z_u = jax.lax.cond(guided, cond_and_uncond, cond_only, None)
        z_c, z_u = z_c.astype(jnp.float32), z_u.astype(jnp.float32)
        nfe = nfe + 1 + guided.astype(jnp.int32)

        # 2. how many to reveal this step (same count for every sample)
        n_masked = jnp.sum(mask[0])
        if sc.order == "confidence":
            keep_masked = jnp.ceil(n * gamma_s - 1e-6).astype(jnp.int32)
            count = jnp.clip(n_masked - keep_masked, 1, n_masked)
        else:
            u = jax.random.uniform(r_count, (n,))
            count = jnp.sum((jnp.arange(n) < n_masked) & (u < p_reveal))
            count = jnp.maximum(count, 1)
        count = jnp.where(is_last, n_masked, jnp.minimum(count, n_masked)).astype(jnp.int32)
        if not categorical:
            # the head's buffer for this step bounds the count (see head_capacities)
            count = jnp.minimum(count, jnp.asarray(plan.buckets, jnp.int32)[bucket])

        revealed_after = (n - n_masked + count).astype(jnp.float32) / n
        w = jnp.where(guided, cfg_weight(cfg_scale, sc.cfg_schedule, revealed_after), 1.0)

        # 3. token values (categorical: for every position; the reveal picks some)
        if categorical:
            lc = model.apply({"params": params}, z_c, method="logits")
            if cfg_scale != 1.0 and plan.guided.any():
                lu = model.apply({"params": params}, z_u, method="logits")
                logits = jnp.where(guided, lu + w * (lc - lu), lc)
            else:
                logits = lc
            filtered = filter_logits(logits, float(sc.temperature), int(sc.top_k), float(sc.top_p))
            drawn = jax.random.categorical(r_head, filtered, axis=-1)  # [B, N]
            if sc.order == "confidence":
                logp = jax.nn.log_softmax(logits, axis=-1)
                conf = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]
                anneal = gumbel_scale(float(sc.choice_temperature), k, k_steps)
                score = conf + anneal * jax.random.gumbel(r_gumbel, conf.shape)
            else:
                score = jax.random.uniform(r_order, (b, n))
        else:
            score = jax.random.uniform(r_order, (b, n))

        # positions to reveal: the `count` highest-scoring masked positions of each row
        score = jnp.where(mask, score, -jnp.inf)
        rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
        reveal = mask & (rank < count)

        if categorical:
            tokens = jnp.where(reveal, drawn.astype(tokens.dtype), tokens)
        else:
            pred_order = jnp.argsort(-score, axis=1)  # revealed positions first

            def branch(cap, g):
                def run(_):
                    idx = pred_order[:, :cap]
                    vals = sample_diffusion(params, z_c, z_u, w, r_head, cap, g, idx)
                    valid = _gather_rows(reveal, idx)  # [B, cap]
                    full = jnp.zeros((b, n + 1, c), jnp.float32)
                    pos = jnp.where(valid, idx, n)
                    full = full.at[jnp.arange(b)[:, None], pos].set(vals)[:, :n]
                    return full
                return run

            branches = []
            guided_opts = (False, True) if (cfg_scale != 1.0 and plan.guided.any()) else (False,)
            for cap in plan.buckets:
                for g in guided_opts:
                    branches.append(branch(cap, g))
            sel = bucket * len(guided_opts) + (guided.astype(jnp.int32) if len(guided_opts) == 2 else 0)
            new_vals = jax.lax.switch(sel, branches, None) if len(branches) > 1 else branches[0](None)
            tokens = jnp.where(reveal[..., None], new_vals, tokens)
        mask = mask & ~reveal
        return (tokens, mask, rng, nfe), count

    def sampler(params, labels, rng):
        b = labels.shape[0]
        if categorical:
            tokens = jnp.zeros((b, n), jnp.int32)
        else:
            tokens = jnp.zeros((b, n, c), jnp.float32)
        mask = jnp.ones((b, n), bool)
        bucket_index = np.asarray([plan.buckets.index(int(x)) for x in plan.capacity], np.int32)
        xs = (jnp.arange(k_steps, dtype=jnp.float32), jnp.asarray(plan.p_reveal, jnp.float32),
              jnp.asarray(plan.gamma_s, jnp.float32), jnp.asarray(plan.guided),
              jnp.asarray(bucket_index), jnp.arange(k_steps) == k_steps - 1)
        carry = (tokens, mask, rng, jnp.int32(0))
        (tokens, mask, _, nfe), counts = jax.lax.scan(
            functools.partial(step, params=params, labels=labels), carry, xs)
        return tokens, {"nfe": nfe, "reveal_counts": counts, "masked_left": jnp.sum(mask)}

    return sampler


def sample(params, labels: jax.Array, rng: jax.Array, config):
    """Samples tokens for ``labels`` [B] (-1 = unconditional) with ``config.sample``.

    Returns (tokens [B, N, C] float32 or [B, N] int32, info) with info['nfe'] the forward
    passes per image actually spent and info['reveal_counts'] [num_iter] tokens per step.
    """
    return make_sampler(config)(params, labels, rng)
