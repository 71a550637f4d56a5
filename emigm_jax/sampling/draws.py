"""The sampler's random draws and logit transforms, as pure functions of arrays.

Categorical filtering (temperature, top-k, top-p), the CFG spaces (epsilon / logits /
probabilities), the guidance weight's schedule, MaskGIT's annealed Gumbel noise on the
confidence, BAG's noise regularisation and differential draw, and the maps from the step's
flat uniform draw to Gumbel and normal noise.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from emigm_jax.config_validation import CHOICES
from emigm_jax.masking import row_ranks

CFG_SCHEDULES = CHOICES["sample.cfg_schedule"]


def gumbel_from_uniform(u):
    """Standard Gumbel noise -log(-log u) from uniforms u in [0, 1) (0 clamped to tiny)."""
    tiny = jnp.finfo(jnp.float32).tiny
    return -jnp.log(-jnp.log(jnp.maximum(u, tiny)))


def normal_from_uniform(u):
    """Standard normal sqrt(2) erfinv(2u - 1) from uniforms, symmetric, |x| <= 5.4."""
    v = jnp.clip(2.0 * u - 1.0, -1.0 + 2.0 ** -22, 1.0 - 2.0 ** -22)
    return jnp.sqrt(2.0) * jax.lax.erf_inv(v)


def noise_reg_strength(name: str, r):
    """BAG eq. 1's I(r) at progress r = k / T: |cos(pi r)|, 0.5 |cos(pi r)| or 0."""
    if name == "none":
        return 0.0 * r
    base = jnp.abs(jnp.cos(math.pi * r))
    return base if name == "abs_cos" else 0.5 * base


def cfg_weight(scale, schedule: str, revealed_frac):
    """w_k inside the interval: constant w, or 1 + (w - 1) * shape(r_k)."""
    r = revealed_frac
    if schedule == "constant":
        return jnp.asarray(scale, jnp.float32) * jnp.ones_like(r)
    shape = {"linear": lambda r: r, "power": lambda r: r ** 2, "cubic": lambda r: r ** 3,
             "exp": lambda r: 1.0 - jnp.exp(-5.0 * r),
             "cosine": lambda r: jnp.cos(0.5 * math.pi * (1.0 - r))}
    if schedule not in shape:
        raise ValueError(f"unknown sample.cfg_schedule {schedule!r}; expected one of "
                         f"{CFG_SCHEDULES}")
    return 1.0 + (scale - 1.0) * shape[schedule](r)


def gumbel_scale(choice_temperature: float, k, num_iter: int, anneal: str = "linear"):
    """MaskGIT's confidence-noise temperature after step k (0-based): linear decay to 0.

    At the last step (k = num_iter - 1) it is exactly 0, so the final choice is by confidence
    alone (and the last step reveals everything left anyway). ``anneal='none'`` keeps it at
    ``choice_temperature`` (DI's "no annealing").
    """
    if anneal == "none":
        return choice_temperature * (0.0 * k + 1.0)
    return choice_temperature * (1.0 - (k + 1.0) / num_iter)


def log_or_min(p):
    """log p with the float32 minimum where p == 0 (an impossible token, finite for filters)."""
    return jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), jnp.finfo(jnp.float32).min)


def cfg_probs_logits(lc, lu, w):
    """DI eq. 5 guidance in probability space, returned as logits [..., V].

    p = p_u + w (p_c - p_u) can have negative entries for w > 1: (proj) clip at 0 and
    renormalise (the mass stays > 0: it sums to 1 before clipping). Zero-mass entries get
    the float32 minimum as logit so temperature and filters keep them impossible.
    """
    pc, pu = jax.nn.softmax(lc, axis=-1), jax.nn.softmax(lu, axis=-1)
    mix = jnp.maximum(pu + w * (pc - pu), 0.0)
    mix = mix / jnp.sum(mix, axis=-1, keepdims=True)
    return log_or_min(mix)


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


def differential_draw(filtered, p_prev, gumbel_noise, mask, k, frac: float, drawn):
    """BAG eqs. 2-3 at step k >= 1 -> (tokens [B, N], probs of this step [B, N, V]).

    p_k = softmax(filtered logits). Per masked token d = KL(p_k || p_{k-1}); the
    floor(frac * masked) masked tokens of each row with the smallest d draw from
    |p_k - p_{k-1}| / sum (p_k where the sum is 0), the others keep ``drawn`` (from p_k).
    (proj) only masked tokens compete; step 0 has no previous step and draws plainly; the
    draw reuses the same Gumbel noise, so a token's randomness does not depend on the rule.
    """
    p_now = jax.nn.softmax(filtered, axis=-1)  # [B, N, V]
    kl = jnp.sum(jax.scipy.special.xlogy(p_now, p_now)
                 - jax.scipy.special.xlogy(p_now, p_prev), axis=-1)  # [B, N]; inf if support grew
    d = jnp.where(mask, kl, jnp.inf)
    n_sel = jnp.floor(frac * jnp.sum(mask, axis=1, keepdims=True)).astype(jnp.int32)  # [B, 1]
    sel = mask & (row_ranks(d) < n_sel) & (k >= 1)
    diff = jnp.abs(p_now - p_prev)
    tot = jnp.sum(diff, axis=-1, keepdims=True)
    p_t = jnp.where(tot > 0, diff / jnp.where(tot > 0, tot, 1.0), p_now)
    drawn_d = jnp.argmax(log_or_min(p_t) + gumbel_noise, axis=-1)
    return jnp.where(sel, drawn_d, drawn), p_now


def momentum_probs(p, p_prev, c):
    """BAG momentum2's prediction (``plan`` module doc): clip(p + c (p - p_prev), 0),
    renormalised; p, p_prev [..., V], c [] -> [..., V]. The unclipped sum is 1, so the
    clipped one is >= 1 and the division is safe."""
    q = jnp.maximum(p + c * (p - p_prev), 0.0)
    return q / jnp.sum(q, axis=-1, keepdims=True)
