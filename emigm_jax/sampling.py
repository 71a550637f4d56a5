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
   MaskGIT's: after the step min(ceil(N * gamma(s)), masked - 1) tokens stay masked, the
   revealed ones are those with the highest log-probability plus Gumbel noise whose
   temperature ``choice_temperature`` anneals linearly to 0 (``gumbel_scale``).
3. The revealed tokens are drawn from the head: DPM-Solver++ (deterministic, temperature
   ignored) or DDPM with temperature for the diffusion head, with CFG applied to epsilon in
   every model evaluation; temperature / top-k / top-p for the categorical head, CFG on logits.

The diffusion head only runs on the tokens revealed at that step: a ``lax.fori_loop`` over
chunks of ``sample.head_chunk`` tokens per sample (default 16) gathered in reveal order, so
the head costs O(tokens revealed) as in the reference rather than O(N) per step
(``head_chunk``). ``sample.head_capacity='full'`` runs it once on all N. The head's initial
noise is drawn per position, so both settings give the same tokens for the same key
(DPM-Solver path; the DDPM path's per-step noise is drawn per chunk and differs).

Every random number of a step comes from one flat uniform draw of that step's key (see
``n_feat`` in ``_build_sampler``): counts and draws are reproducible, and identical whether
the batch is sharded or not (threefry is partitionable).

NFE = num_iter + number of guided steps (+ Z-sampling passes), counted by the scan itself
(``info['nfe']``) and predicted on the host by ``expected_nfe(config.sample)`` from
``step_nfe`` (per-step costs; the Z-sampling scoring cost ``Z_SCORE_PASSES`` is shared by both).

Companion-paper switches (COMPANION.md sections 0-2), all read with ``sc.get(name, default)``
and resolved by ``companion_options``; each is a Python branch on the static config, so the
defaults trace exactly today's program (same tokens bit for bit from the same key):

- ``reveal`` in {auto (default: count for order='confidence', bernoulli for 'random' --
  today's rules), bernoulli, euler, count}. ``euler`` (DI Alg. 1) replaces the probability by
  (a - b) gamma'(a) / gamma(a) clipped to [0, 1] and keeps the batch-shared Binomial count.
  ``count`` (MaskGIT / MaskGIL) leaves ceil(N gamma(s_k)) masked after step k with
  s_k = t_{k+1} on the same grid (so step 0 already reveals; MaskGIL's t/T would mask all at
  t = 0), the last step reveals everything, and at least one token per step (it only binds
  when the schedule would reveal none). ``order`` now only says *which* tokens: confidence
  or random.
- ``final_argmax`` (DI): at the last step the still-masked tokens take argmax p_theta (the
  guided, noise-regularised logits) instead of a draw.
- ``cfg_space`` in {auto, eps, logits, probs}: eps is the diffusion head's (only) choice,
  logits the categorical default (l_u + w (l_c - l_u)); probs is DI eq. 5,
  p_u + w (p_c - p_u), clipped at 0 and renormalised (``cfg_probs_logits``).
- ``gumbel_anneal`` in {linear (today), none}: COMPANION's ``gumbel_temp`` is
  ``choice_temperature``.
- ``noise_reg`` in {none, abs_cos, half_abs_cos} with ``noise_reg_scale``: BAG eq. 1,
  logits + scale I(k/T) eps, eps ~ N(0, 1) per logit (I read as a std), after CFG and before
  temperature / top-k / top-p; eps comes from its own key, so scale 0 changes nothing.
- ``diff_frac`` z: BAG eqs. 2-3 (``differential_draw``): only masked tokens compete, step 0
  draws plainly, floor(z * masked) tokens use |p_k - p_{k-1}| (p_k where it is all 0); p is
  the filtered (temperature / top-k / top-p) distribution; the previous probs ride in the
  scan carry only when z > 0.
- ``argmax_from`` k0 (-1 off): from step k0 on, tokens are the argmax of the filtered logits.
- ``z_sampling`` in {none, masked, random, recover} with ``z_steps`` (-1 = every step, else
  the first z_steps steps): after a normal step, re-mask back to the step's starting count
  and redo the step with fresh randomness (the redo's result is kept). Choices for BAG's
  unclear points: ``masked`` scores every unmasked token (older ones may be re-masked;
  otherwise it would re-mask exactly the new ones, i.e. ``recover``) by log p(x_j | z_hat)
  from one extra conditional forward pass on the new state (no CFG: BAG's inversion scale
  0); ``random`` re-masks that many random unmasked tokens; ``recover`` restores the step's
  starting mask. The last step zig-zags too when z_steps covers it.
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

from emigm_jax.config_validation import CHOICES, ConfigError, validate_config
from emigm_jax.diffusion import ddpm as ddpm_lib
from emigm_jax.diffusion import dpm_solver
from emigm_jax.masking import row_ranks
from emigm_jax.models import build_model, seq_len, token_dim
from emigm_jax.schedules import MaskSchedule, schedule_from_config
from emigm_jax.sharding import gather_weights

CFG_SCHEDULES = ("constant", "linear", "power", "cubic", "exp", "cosine")
HEAD_CAPACITIES = ("auto", "full")
DEFAULT_HEAD_CHUNK = 16


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


Z_SAMPLINGS = CHOICES["sample.z_sampling"]
Z_SCORE_PASSES = {"none": 0, "masked": 1, "random": 0, "recover": 0}  # scoring passes / zigzag


def z_sampling_steps(sample_cfg) -> int:
    """How many steps (from the first) zig-zag: ``sample.z_steps``, -1 = all, 0 if off."""
    mode = sample_cfg.get("z_sampling", "none")
    if mode not in Z_SAMPLINGS:
        raise ConfigError(f"config.sample.z_sampling={mode!r} is invalid: expected one of "
                          f"{Z_SAMPLINGS}")
    z = int(sample_cfg.get("z_steps", -1))
    if z < -1:
        raise ConfigError(f"config.sample.z_steps={z!r} is invalid: expected -1 (all steps) "
                          "or an integer >= 0")
    k = int(sample_cfg.num_iter)
    return 0 if mode == "none" else (k if z == -1 else min(z, k))


def step_nfe(sample_cfg) -> np.ndarray:
    """int [K]: forward passes per image at each step (the one source of the NFE count).

    A step costs 1 (+1 unconditional pass when guided). A Z-sampling step adds its
    scoring pass (``masked`` only: ``Z_SCORE_PASSES``) and the redone step (1, +1 if guided).
    """
    guided = guided_steps(sample_cfg).astype(np.int64)
    base = 1 + guided
    zig = np.arange(int(sample_cfg.num_iter)) < z_sampling_steps(sample_cfg)
    score = Z_SCORE_PASSES[sample_cfg.get("z_sampling", "none")]
    return base + zig * (score + base)


def expected_nfe(sample_cfg) -> int:
    """Network forward passes per image: one per step plus one per guided step (plus the
    Z-sampling passes, ``step_nfe``)."""
    return int(step_nfe(sample_cfg).sum())


REVEALS = CHOICES["sample.reveal"]
CFG_SPACES = CHOICES["sample.cfg_space"]
GUMBEL_ANNEALS = CHOICES["sample.gumbel_anneal"]
NOISE_REGS = CHOICES["sample.noise_reg"]


@dataclasses.dataclass(frozen=True)
class CompanionOptions:
    """The companion-paper switches of ``config.sample`` (COMPANION.md sections 1-2), resolved.

    Every field read with ``sc.get(name, default)``: a config without them (or with the
    defaults) builds exactly today's sampler, because each switch is a Python branch on the
    static config, not a ``lax`` one.
    """
    reveal: str            # bernoulli | euler | count ('auto' resolved)
    final_argmax: bool
    cfg_space: str         # eps | logits | probs ('auto' resolved)
    gumbel_anneal: str     # linear | none
    noise_reg: str         # none | abs_cos | half_abs_cos
    noise_reg_scale: float
    diff_frac: float
    argmax_from: int       # -1 = off
    z_sampling: str        # none | masked | random | recover

    @property
    def noise_on(self) -> bool:
        return self.noise_reg != "none" and self.noise_reg_scale != 0.0


def companion_options(sample_cfg, categorical: bool = True) -> CompanionOptions:
    """Reads and checks the switches; ConfigError names a bad value and what was expected.

    ``reveal='auto'`` (the default) is today's rule: ``count`` for ``order='confidence'``
    (MaskGIT), ``bernoulli`` for ``order='random'``; ``cfg_space='auto'`` is ``eps`` for the
    diffusion head and ``logits`` for the categorical head.
    """
    sc = sample_cfg

    def choice(name, default, allowed):
        v = sc.get(name, default)
        if v not in allowed:
            raise ConfigError(f"config.sample.{name}={v!r} is invalid: expected one of {allowed}")
        return v

    reveal = choice("reveal", "auto", REVEALS)
    if reveal == "auto":
        reveal = "count" if sc.get("order", "random") == "confidence" else "bernoulli"
    cfg_space = choice("cfg_space", "auto", CFG_SPACES)
    if cfg_space == "auto":
        cfg_space = "logits" if categorical else "eps"
    if categorical and cfg_space == "eps":
        raise ConfigError("config.sample.cfg_space='eps' is invalid for model.head="
                          "'categorical': expected 'logits' or 'probs'")
    if not categorical and cfg_space != "eps":
        raise ConfigError(f"config.sample.cfg_space={cfg_space!r} is invalid for model.head="
                          "'diffusion': expected 'eps'")
    opts = CompanionOptions(
        reveal=reveal, final_argmax=bool(sc.get("final_argmax", False)), cfg_space=cfg_space,
        gumbel_anneal=choice("gumbel_anneal", "linear", GUMBEL_ANNEALS),
        noise_reg=choice("noise_reg", "none", NOISE_REGS),
        noise_reg_scale=float(sc.get("noise_reg_scale", 1.0)),
        diff_frac=float(sc.get("diff_frac", 0.0)), argmax_from=int(sc.get("argmax_from", -1)),
        z_sampling=choice("z_sampling", "none", Z_SAMPLINGS))
    z_sampling_steps(sc)  # checks z_steps
    if not 0.0 <= opts.diff_frac <= 1.0:
        raise ConfigError(f"config.sample.diff_frac={opts.diff_frac!r} is invalid: expected a "
                          "value in [0, 1] (0 = off)")
    if opts.noise_reg_scale < 0:
        raise ConfigError(f"config.sample.noise_reg_scale={opts.noise_reg_scale!r} is invalid: "
                          "expected a value >= 0")
    if opts.argmax_from < -1:
        raise ConfigError(f"config.sample.argmax_from={opts.argmax_from!r} is invalid: expected "
                          "-1 (off) or a step index >= 0")
    if not categorical:
        for name, on in (("final_argmax", opts.final_argmax), ("noise_reg", opts.noise_on),
                         ("diff_frac", opts.diff_frac > 0), ("argmax_from", opts.argmax_from >= 0),
                         ("z_sampling", opts.z_sampling != "none")):
            if on:
                raise ConfigError(f"config.sample.{name}={sc.get(name)!r} needs token "
                                  "probabilities: only available with model.head='categorical'")
    return opts


def reveal_probabilities(sample_cfg, schedule: MaskSchedule | None = None) -> np.ndarray:
    """float64 [K]: per-token reveal probability of step a=t_k -> b=t_{k+1}; 1 at the last step.

    ``bernoulli`` (SPEC): (gamma(a) - gamma(b)) / gamma(a). ``euler`` (DI Alg. 1, first
    order): (a - b) gamma'(a) / gamma(a), clipped to [0, 1] (DI never clips; an infinite
    gamma'(1), e.g. pow rho < 1, gives 1). Both feed the same batch-shared Binomial count
    with at least one token per step. ``count`` does not use these numbers.
    """
    schedule = schedule or schedule_from_config(sample_cfg)
    grid = time_grid(sample_cfg)
    g = schedule.gamma(grid, np)
    if sample_cfg.get("reveal", "auto") == "euler":
        with np.errstate(divide="ignore", invalid="ignore"):
            p = (grid[:-1] - grid[1:]) * schedule.dgamma(grid[:-1], np) / g[:-1]
        p = np.where(np.isnan(p), 1.0, p)
    else:
        p = 1.0 - g[1:] / g[:-1]
    p[-1] = 1.0
    return np.clip(p, 0.0, 1.0)


def noise_reg_strength(name: str, r):
    """BAG eq. 1's I(r) at progress r = k / T: |cos(pi r)|, 0.5 |cos(pi r)| or 0."""
    if name == "none":
        return 0.0 * r
    base = jnp.abs(jnp.cos(math.pi * r))
    return base if name == "abs_cos" else 0.5 * base


def head_chunk(sample_cfg, n: int) -> int:
    """Tokens per sample in one call of the diffusion head's solver.

    Each step reveals ``count`` tokens; the head runs over them in ceil(count / chunk) calls
    of a ``lax.fori_loop`` (the count is the same for the whole batch, so every device runs
    the same number of calls), costing O(count rounded up to the chunk) as in the reference
    instead of O(N). ``head_capacity='full'`` makes the chunk N: one call on every position
    per step (simplest program, most work). Because each position's initial noise does not
    depend on the chunking, the DPM-Solver path gives the same tokens for any chunk.
    """
    mode = sample_cfg.get("head_capacity", "auto")
    if mode not in HEAD_CAPACITIES:
        raise ConfigError(f"config.sample.head_capacity={mode!r} is invalid: expected one of "
                          f"{HEAD_CAPACITIES}")
    chunk = sample_cfg.get("head_chunk", DEFAULT_HEAD_CHUNK)
    if not (int(chunk) == chunk and chunk >= 1):
        raise ConfigError(f"config.sample.head_chunk={chunk!r} is invalid: expected an "
                          "integer >= 1 (tokens per sample per head call)")
    return n if mode == "full" else min(int(chunk), n)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    t: np.ndarray          # [K]
    s: np.ndarray          # [K]
    p_reveal: np.ndarray   # [K]
    gamma_s: np.ndarray    # [K]
    guided: np.ndarray     # [K] bool
    chunk: int             # tokens per sample per head call


def make_plan(sample_cfg, n: int) -> StepPlan:
    """Everything the scan needs that depends only on the config (host float64)."""
    schedule = schedule_from_config(sample_cfg)
    grid = time_grid(sample_cfg)
    return StepPlan(t=grid[:-1], s=grid[1:], p_reveal=reveal_probabilities(sample_cfg, schedule),
                    gamma_s=schedule.gamma(grid[1:], np), guided=guided_steps(sample_cfg),
                    chunk=head_chunk(sample_cfg, n))


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
    ``choice_temperature`` (DI's "no annealing"; COMPANION's ``gumbel_temp`` is
    ``sample.choice_temperature``).
    """
    if anneal == "none":
        return choice_temperature * (0.0 * k + 1.0)
    if anneal != "linear":
        raise ConfigError(f"config.sample.gumbel_anneal={anneal!r} is invalid: expected one "
                          f"of {GUMBEL_ANNEALS}")
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
    opts = companion_options(sc, categorical)
    plan = make_plan(sc, n)
    k_steps = int(sc.num_iter)
    cfg_scale = float(sc.cfg_scale)
    if transformer_fn is None:
        def net(params, tokens, mask, labels, t):
            """The transformer; ``t`` [B] (the state's time) reaches only an ETM network."""
            return model.apply({"params": gather_weights(params, True, model.dtype)}, tokens,
                               mask, labels, t=t, method="transformer")
    else:
        def net(params, tokens, mask, labels, t):  # pylint: disable=unused-argument
            return transformer_fn(params, tokens, mask, labels)  # test stand-ins take no time
    grid = time_grid(sc)
    t_before = jnp.asarray(grid[:-1], jnp.float32)  # [K] time of the state entering step k
    t_after = jnp.asarray(grid[1:], jnp.float32)    # [K] time of the state after step k

    if not categorical:
        if sc.head_sampler == "dpm_solver":
            solver_plan = dpm_solver.make_plan(None, int(sc.solver_steps), int(sc.solver_order),
                                               sc.solver_method, sc.solver_skip)
        else:
            ddpm_process = ddpm_lib.default_ddpm_diffusion(int(sc.ddpm_steps))

    def head_out(params, x, t, z):
        return model.apply({"params": gather_weights(params, True, model.dtype)}, x, t, z,
                           method="head")

    def sample_diffusion(params, z_c, z_u, w, noise, rng_ddpm, cap: int, guided: bool,
                         pred_idx):
        """Draws the tokens at pred_idx [B, cap] from noise [B, N, C] -> [B, cap, C]."""
        b = z_c.shape[0]
        zc = _gather_rows(z_c, pred_idx).reshape(b * cap, -1)
        zu = _gather_rows(z_u, pred_idx).reshape(b * cap, -1) if guided else None
        x_t = _gather_rows(noise, pred_idx).reshape(b * cap, c)

        def full_out(x, t):
            if not guided:
                return head_out(params, x, t, zc)
            # conditional and unconditional rows share x (the same noise), SPEC section 4
            out = head_out(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                           jnp.concatenate([zc, zu]))
            oc, ou = jnp.split(out, 2)
            eps = ou[:, :c] + w * (oc[:, :c] - ou[:, :c])
            return jnp.concatenate([eps, oc[:, c:]], axis=1)

        if sc.head_sampler == "dpm_solver":
            x0 = dpm_solver.run_plan(lambda x, t: full_out(x, t)[:, :c], x_t, solver_plan)
        else:
            x0 = ddpm_lib.ddpm_sample(full_out, x_t, rng_ddpm, ddpm_process, sc.temperature)
        return x0.reshape(b, cap, c)

    # Per-step randomness comes from ONE uniform draw [B, N, F] (threefry is by far the
    # slowest thing XLA compiles here; one flat draw instead of five shaped ones cuts the
    # sampler's compile time several fold). Features: 0 = reveal order, 1 = count (row 0
    # only), 2 = confidence Gumbel, then C normals (diffusion head noise, per position, so
    # the head's chunking does not change the noise a token gets) or V Gumbels (categorical).
    n_feat = 3 + (int(config.model.vocab_size) if categorical else c)

    vocab = int(config.model.vocab_size) if categorical else 0

    def one_step(carry, xs, params, labels):
        tokens, mask, nfe = carry[:3]
        extra = carry[3:]  # (previous step's probs [B, N, V],) with diff_frac > 0
        k, p_reveal, gamma_s, guided, is_last, key = xs
        b = tokens.shape[0]
        # drawn flat: XLA compiles a 1-D threefry draw ~4x faster than a 3-D one
        u = jax.random.uniform(key[0], (b * n * n_feat,), jnp.float32).reshape(b, n, n_feat)
        tiny = jnp.finfo(jnp.float32).tiny
        gumbel = lambda v: -jnp.log(-jnp.log(jnp.maximum(v, tiny)))

        # 1. transformer, with the unconditional pass only on guided steps
        t_now = jnp.full((b,), t_before[k.astype(jnp.int32)])

        def cond_only(_):
            z = net(params, tokens, mask, labels, t_now)
            return z, jnp.zeros_like(z)

        def cond_and_uncond(_):
            z = net(params, jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask]),
                    jnp.concatenate([labels, -jnp.ones_like(labels)]),
                    jnp.concatenate([t_now, t_now]))
            return tuple(jnp.split(z, 2))

        if cfg_scale == 1.0 or not plan.guided.any():
            z_c, z_u = cond_only(None)
        else:
            z_c, z_u = jax.lax.cond(guided, cond_and_uncond, cond_only, None)
        z_c, z_u = z_c.astype(jnp.float32), z_u.astype(jnp.float32)
        nfe = nfe + 1 + guided.astype(jnp.int32)

        # 2. how many to reveal this step (same count for every sample)
        n_masked = jnp.sum(mask[0])
        if opts.reveal == "count":
            keep_masked = jnp.ceil(n * gamma_s - 1e-6).astype(jnp.int32)
            count = jnp.clip(n_masked - keep_masked, 1, n_masked)
        else:
            # Binomial(n_masked, p_reveal), shared by the batch, at least 1
            count = jnp.sum((jnp.arange(n) < n_masked) & (u[0, :, 1] < p_reveal))
            count = jnp.maximum(count, 1)
        count = jnp.where(is_last, n_masked, jnp.minimum(count, n_masked)).astype(jnp.int32)

        revealed_after = (n - n_masked + count).astype(jnp.float32) / n
        w = jnp.where(guided, cfg_weight(cfg_scale, sc.cfg_schedule, revealed_after), 1.0)

        # 3. token values (categorical: for every position; the reveal picks some)
        score = u[..., 0]  # random order
        if categorical:
            lc = model.apply({"params": params}, z_c, method="logits")
            if cfg_scale != 1.0 and plan.guided.any():
                lu = model.apply({"params": params}, z_u, method="logits")
                if opts.cfg_space == "probs":
                    logits = jnp.where(guided, cfg_probs_logits(lc, lu, w), lc)
                else:
                    logits = jnp.where(guided, lu + w * (lc - lu), lc)
            else:
                logits = lc
            if opts.noise_on:
                # BAG eq. 1: v + scale I(r) eps, r = k / T, after CFG and before temperature
                # and filtering; its own key, so the other draws are unchanged
                eps_n = jax.random.normal(jax.random.fold_in(key[0], 1), (b * n * vocab,),
                                          jnp.float32).reshape(b, n, vocab)
                strength = opts.noise_reg_scale * noise_reg_strength(opts.noise_reg,
                                                                     k / k_steps)
                logits = logits + strength * eps_n
            filtered = filter_logits(logits, float(sc.temperature), int(sc.top_k), float(sc.top_p))
            g_tok = gumbel(u[..., 3:])
            drawn = jnp.argmax(filtered + g_tok, axis=-1)  # [B, N] Gumbel-max
            if opts.diff_frac > 0:
                drawn, p_now = differential_draw(filtered, extra[0], g_tok, mask, k,
                                                 opts.diff_frac, drawn)
                extra = (p_now,)
            if opts.argmax_from >= 0:
                drawn = jnp.where(k >= opts.argmax_from, jnp.argmax(filtered, axis=-1), drawn)
            if opts.final_argmax:
                # DI: at the last step every token still masked takes argmax p_theta (the
                # guided, noise-regularised logits; temperature / top-k / top-p keep it)
                drawn = jnp.where(is_last, jnp.argmax(logits, axis=-1), drawn)
            if sc.order == "confidence":
                logp = jax.nn.log_softmax(logits, axis=-1)
                conf = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]
                anneal = gumbel_scale(float(sc.choice_temperature), k, k_steps,
                                      opts.gumbel_anneal)
                score = conf + anneal * gumbel(u[..., 2])

        # positions to reveal: the `count` highest-scoring masked positions of each row
        score = jnp.where(mask, score, -jnp.inf)
        order = jnp.argsort(-score, axis=1)  # masked positions first, best first (head order)
        rank = jnp.argsort(order, axis=1)
        reveal = mask & (rank < count)

        if categorical:
            tokens = jnp.where(reveal, drawn.astype(tokens.dtype), tokens)
        else:
            # standard normal per position: sqrt(2) erfinv(2u - 1), symmetric, |x| <= 5.4
            v = jnp.clip(2.0 * u[..., 3:] - 1.0, -1.0 + 2.0 ** -22, 1.0 - 2.0 ** -22)
            noise = jnp.sqrt(2.0) * jax.lax.erf_inv(v)  # [B, N, C]

            ch = plan.chunk
            # positions in reveal order, padded with a dump index n for the last chunk
            order_pad = jnp.concatenate([order, jnp.full((b, ch), n, order.dtype)], axis=1)

            def head_loop(g):
                def run(_):
                    def body(j, out):
                        start = j * ch
                        idx = jax.lax.dynamic_slice_in_dim(order_pad, start, ch, axis=1)
                        valid = (start + jnp.arange(ch) < count)[None, :]  # [1, ch]
                        vals = sample_diffusion(params, z_c, z_u, w, noise,
                                                jax.random.fold_in(key[1], j), ch, g,
                                                jnp.minimum(idx, n - 1))
                        pos = jnp.where(valid, idx, n)  # [B, ch]; n = dump row
                        return out.at[jnp.arange(b)[:, None], pos].set(vals)
                    n_calls = (count + ch - 1) // ch
                    out = jnp.zeros((b, n + 1, c), jnp.float32)
                    return jax.lax.fori_loop(0, n_calls, body, out)[:, :n]
                return run

            if cfg_scale != 1.0 and plan.guided.any():
                new_vals = jax.lax.cond(guided, head_loop(True), head_loop(False), None)
            else:
                new_vals = head_loop(False)(None)
            tokens = jnp.where(reveal[..., None], new_vals, tokens)
        mask = mask & ~reveal
        return (tokens, mask, nfe) + tuple(extra), count

    z_steps = z_sampling_steps(sc)

    def step(carry, xs, params, labels):
        if opts.z_sampling == "none":
            return one_step(carry, xs, params, labels)
        # BAG masked Z-sampling: normal step, re-mask back to the previous count, redo
        mask0, extra0 = carry[1], carry[3:]
        first, count = one_step(carry, xs, params, labels)
        k, key = xs[0], xs[-1]

        def zigzag(first):
            tokens1, mask1, nfe1 = first[:3]
            b = tokens1.shape[0]
            unmasked = ~mask1
            if opts.z_sampling == "recover":
                remask = mask0 & ~mask1  # exactly the tokens this step revealed
            else:
                if opts.z_sampling == "masked":
                    # (proj) one extra conditional pass on the new state scores every
                    # unmasked token by log p(x_j | z_hat); older tokens may be re-masked
                    t_next = jnp.full((b,), t_after[k.astype(jnp.int32)])
                    zs = net(params, tokens1, mask1, labels, t_next).astype(jnp.float32)
                    logp = jax.nn.log_softmax(
                        model.apply({"params": params}, zs, method="logits"), axis=-1)
                    score = jnp.take_along_axis(logp, tokens1[..., None], axis=-1)[..., 0]
                    nfe1 = nfe1 + Z_SCORE_PASSES[opts.z_sampling]
                else:  # random
                    score = jax.random.uniform(jax.random.fold_in(key[0], 3), (b * n,),
                                               jnp.float32).reshape(b, n)
                score = jnp.where(unmasked, score, jnp.inf)
                remask = unmasked & (row_ranks(score) < count)
            redo_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 2))(key)
            redo, count_r = one_step((tokens1, mask1 | remask, nfe1) + tuple(extra0),
                                     xs[:-1] + (redo_keys,), params, labels)
            return redo, count_r

        if z_steps >= k_steps:
            return zigzag(first)
        return jax.lax.cond(k < z_steps, zigzag, lambda f: (f, count), first)

    def sampler(params, labels, rng):
        b = labels.shape[0]
        if categorical:
            tokens = jnp.zeros((b, n), jnp.int32)
        else:
            tokens = jnp.zeros((b, n, c), jnp.float32)
        mask = jnp.ones((b, n), bool)
        keys = jax.random.split(rng, (k_steps, 2))  # per step: [uniforms, DDPM noise]
        xs = (jnp.arange(k_steps, dtype=jnp.float32), jnp.asarray(plan.p_reveal, jnp.float32),
              jnp.asarray(plan.gamma_s, jnp.float32), jnp.asarray(plan.guided),
              jnp.arange(k_steps) == k_steps - 1, keys)
        carry = (tokens, mask, jnp.int32(0))
        if opts.diff_frac > 0:
            carry = carry + (jnp.zeros((b, n, vocab), jnp.float32),)
        (tokens, mask, nfe, *_), counts = jax.lax.scan(
            functools.partial(step, params=params, labels=labels), carry, xs)
        return tokens, {"nfe": nfe, "reveal_counts": counts, "masked_left": jnp.sum(mask)}

    return sampler


def sample(params, labels: jax.Array, rng: jax.Array, config):
    """Samples tokens for ``labels`` [B] (-1 = unconditional) with ``config.sample``.

    Returns (tokens [B, N, C] float32 or [B, N] int32, info) with info['nfe'] the forward
    passes per image actually spent, info['reveal_counts'] [num_iter] tokens revealed per
    step (the same for every image) and info['masked_left'] (always 0). Compiled once per
    (model, sample) config and input shapes; ``rng`` fixes the result, also when the batch
    is sharded over devices.
    """
    return make_sampler(config)(params, labels, rng)
