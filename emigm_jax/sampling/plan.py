"""The sampler's host-side plan: options, step grid, reveal probabilities and NFE accounting.

Everything here depends only on the static config and is computed once in float64 numpy
before tracing; the scan (``emigm_jax.sampling.sampler``) reads the results as constants.
NFE = num_iter + number of guided steps (+ Z-sampling passes): ``step_nfe`` is the one
source of that count, and the scan's own ``info['nfe']`` must agree with it.

BAG's momentum solver (``sample.mgt_solver='momentum2'``, BAG paper Sec. 4.3 and App. 9.8).
The paper's Eq. 4 (sigma_t / sigma_s) and Eq. 13 (sigma_s / sigma_t) disagree and give no
token form for the second-order term; resolved here from its own derivation (Eq. 11-12, in
the mask ratio sigma): z_t = (s/t) z_s + ((t - s)/t) [f_s + ((t - s)/2) df/ds], i.e. the
first-order part is the vanilla step (the same share of tokens is revealed, by the same rule)
and the second-order term changes only the prediction the revealed tokens are drawn from:
f at the middle of the step, extrapolated with the finite difference over the previous step
(DPM-Solver's multistep form). In probabilities, at step k >= 1 (sigma_k = gamma(t_k)):
p~ = p_k + c_k (p_k - p_{k-1}), c_k = (sigma_k - sigma_{k+1}) / (2 (sigma_{k-1} - sigma_k)),
clipped at 0 and renormalised (``momentum_coefficients``; ``draws.momentum_probs``); p are
the guided (and noise-regularised) distributions before temperature / top-k / top-p; step 0
has no previous prediction and is vanilla.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from emigm_jax.buckets import rung_at
from emigm_jax.config_validation import CHOICES, ConfigError
from emigm_jax.schedules import MaskSchedule, schedule_from_config

HEAD_CAPACITIES = ("auto", "full")
DEFAULT_HEAD_CHUNK = 16


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
MGT_SOLVERS = CHOICES["sample.mgt_solver"]


def z_score_passes(sample_cfg) -> int:
    """Forward passes of one Z-sampling scoring: masked Z with ``z_cfg != 0`` (the inversion
    CFG scale) adds the unconditional pass; ``z_cfg = 0`` is BAG's "no guidance pass"."""
    mode = sample_cfg.get("z_sampling", "none")
    guided = mode == "masked" and float(sample_cfg.get("z_cfg", 0.0)) != 0.0
    return Z_SCORE_PASSES[mode] * (2 if guided else 1)


def z_sampling_steps(sample_cfg) -> int:
    """How many steps (from the first) zig-zag: ``sample.z_steps``, -1 = all, 0 if off."""
    mode = sample_cfg.get("z_sampling", "none")
    z = int(sample_cfg.get("z_steps", -1))
    if z < -1:
        raise ConfigError(f"config.sample.z_steps={z!r} is invalid: expected -1 (all steps) "
                          "or an integer >= 0")
    k = int(sample_cfg.num_iter)
    return 0 if mode == "none" else (k if z == -1 else min(z, k))


def step_nfe(sample_cfg) -> np.ndarray:
    """int [K]: forward passes per image at each step (the one source of the NFE count).

    A step costs 1 (+1 unconditional pass when guided). A Z-sampling step adds its
    scoring passes (``masked`` only: ``z_score_passes``) and the redone step (1, +1 if guided).
    """
    guided = guided_steps(sample_cfg).astype(np.int64)
    base = 1 + guided
    zig = np.arange(int(sample_cfg.num_iter)) < z_sampling_steps(sample_cfg)
    return base + zig * (z_score_passes(sample_cfg) + base)


def expected_nfe(sample_cfg) -> int:
    """Network forward passes per image: one per step plus one per guided step (plus the
    Z-sampling passes, ``step_nfe``)."""
    return int(step_nfe(sample_cfg).sum())


@dataclasses.dataclass(frozen=True)
class CompanionOptions:
    """The companion-paper switches of ``config.sample`` (DI, BAG, MaskGIL), resolved.

    Read with ``sc.get(name, default)`` so a config saved before the switches existed still
    loads: without them (or with the defaults) the sampler is the plain one, because each
    switch is a Python branch on the static config, not a ``lax`` one.
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
    z_cfg: float = 0.0     # inversion CFG scale of masked-Z scoring (0 = no guidance pass)
    mgt_solver: str = "vanilla"  # vanilla | momentum2

    @property
    def noise_on(self) -> bool:
        return self.noise_reg != "none" and self.noise_reg_scale != 0.0


def companion_options(sample_cfg, categorical: bool = True) -> CompanionOptions:
    """Reads the switches (their choices are checked by ``validate_config``) and checks
    their ranges and combinations; ConfigError names a bad value and what was expected.

    ``reveal='auto'`` (the default) is today's rule: ``count`` for ``order='confidence'``
    (MaskGIT), ``bernoulli`` for ``order='random'``; ``cfg_space='auto'`` is ``eps`` for the
    diffusion head and ``logits`` for the categorical head.
    """
    sc = sample_cfg
    reveal = sc.get("reveal", "auto")
    if reveal == "auto":
        reveal = "count" if sc.get("order", "random") == "confidence" else "bernoulli"
    cfg_space = sc.get("cfg_space", "auto")
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
        gumbel_anneal=sc.get("gumbel_anneal", "linear"), noise_reg=sc.get("noise_reg", "none"),
        noise_reg_scale=float(sc.get("noise_reg_scale", 1.0)),
        diff_frac=float(sc.get("diff_frac", 0.0)), argmax_from=int(sc.get("argmax_from", -1)),
        z_sampling=sc.get("z_sampling", "none"), z_cfg=float(sc.get("z_cfg", 0.0)),
        mgt_solver=sc.get("mgt_solver", "vanilla"))
    _check_ranges(opts, sc, categorical)
    return opts


def _check_ranges(opts: CompanionOptions, sc, categorical: bool) -> None:
    """The numeric switches' ranges, and the switches that need token probabilities."""
    z_sampling_steps(sc)  # checks z_steps
    if not 0.0 <= opts.diff_frac <= 1.0:
        raise ConfigError(f"config.sample.diff_frac={opts.diff_frac!r} is invalid: expected a "
                          "value in [0, 1] (0 = off)")
    if opts.noise_reg_scale < 0:
        raise ConfigError(f"config.sample.noise_reg_scale={opts.noise_reg_scale!r} is invalid: "
                          "expected a value >= 0")
    if opts.z_cfg < 0:
        raise ConfigError(f"config.sample.z_cfg={opts.z_cfg!r} is invalid: expected a value "
                          ">= 0 (0 = no guidance pass in the masked-Z scoring)")
    if opts.argmax_from < -1:
        raise ConfigError(f"config.sample.argmax_from={opts.argmax_from!r} is invalid: expected "
                          "-1 (off) or a step index >= 0")
    if not categorical:
        for name, on in (("final_argmax", opts.final_argmax), ("noise_reg", opts.noise_on),
                         ("diff_frac", opts.diff_frac > 0), ("argmax_from", opts.argmax_from >= 0),
                         ("z_sampling", opts.z_sampling != "none"),
                         ("mgt_solver", opts.mgt_solver != "vanilla")):
            if on:
                raise ConfigError(f"config.sample.{name}={sc.get(name)!r} needs token "
                                  "probabilities: only available with model.head='categorical'")


def reveal_probabilities(sample_cfg, schedule: MaskSchedule | None = None) -> np.ndarray:
    """float64 [K]: per-token reveal probability of step a=t_k -> b=t_{k+1}; 1 at the last step.

    ``bernoulli`` (eMIGM paper, Sec. 2): (gamma(a) - gamma(b)) / gamma(a). ``euler`` (DI
    Alg. 1, first order): (a - b) gamma'(a) / gamma(a), clipped to [0, 1] (DI never clips; an infinite
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


def head_chunk(sample_cfg, n: int) -> int:
    """Tokens per sample in one call of the diffusion head (``emigm_jax.sampling.head_draw``);
    ``head_capacity='full'``: N, one call on every position per step (most work)."""
    mode = sample_cfg.get("head_capacity", "auto")
    if mode not in HEAD_CAPACITIES:
        raise ConfigError(f"config.sample.head_capacity={mode!r} is invalid: expected one of "
                          f"{HEAD_CAPACITIES}")
    chunk = sample_cfg.get("head_chunk", DEFAULT_HEAD_CHUNK)
    if not (int(chunk) == chunk and chunk >= 1):
        raise ConfigError(f"config.sample.head_chunk={chunk!r} is invalid: expected an "
                          "integer >= 1 (tokens per sample per head call)")
    return n if mode == "full" else min(int(chunk), n)


def ar_prefix_length(sample_cfg, n: int) -> int:
    """m = round(sample.ar_prefix * N): raster positions an AR model writes before the masked
    sampler starts (MaskGIL's AR prefix, ``emigm_jax.ar_prefix``); 0 when off."""
    share = float(sample_cfg.get("ar_prefix", 0.0))
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"config.sample.ar_prefix={share!r} is invalid: expected a share in "
                          "[0, 1]")
    return int(round(share * n))


def momentum_coefficients(sample_cfg, schedule: MaskSchedule | None = None) -> np.ndarray:
    """float64 [K]: the momentum2 extrapolation weight c_k of step k (module docstring).

    c_0 = 0 (no previous prediction); c_k = (sigma_k - sigma_{k+1}) / (2 (sigma_{k-1} -
    sigma_k)) with sigma = gamma on the time grid (0 where the previous step did not move).
    """
    schedule = schedule or schedule_from_config(sample_cfg)
    sigma = schedule.gamma(time_grid(sample_cfg), np)  # [K + 1]
    c = np.zeros(int(sample_cfg.num_iter))
    prev_gap = sigma[:-2] - sigma[1:-1]                 # sigma_{k-1} - sigma_k, k >= 1
    with np.errstate(divide="ignore", invalid="ignore"):
        c[1:] = np.where(prev_gap > 0, (sigma[1:-1] - sigma[2:]) / (2.0 * prev_gap), 0.0)
    return c


def powers_of_two_to(top: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``top``, then ``top``."""
    return tuple(sorted({1 << i for i in range(top.bit_length()) if 1 << i < top} | {top}))


def head_ladder(sample_cfg, n: int) -> tuple[int, ...]:
    """Sizes of the head's last call of a step (the remainder after full chunks): 1, 2, 4,
    ... below ``head_chunk``, then the chunk; the smallest one holding the remainder runs
    (``head_capacity='full'``: the one size N). Same tokens for any of them on the
    DPM-Solver path."""
    chunk = head_chunk(sample_cfg, n)
    if sample_cfg.get("head_capacity", "auto") == "full":
        return (chunk,)
    return powers_of_two_to(chunk)


def read_ladder(sample_cfg, n: int) -> tuple[int, ...]:
    """Query-row capacities of the decoder's last block (``transformer.ReadRows``): 1, 2, 4,
    ... up to N; each step computes that block only for the smallest rung holding its
    revealed count. ``head_capacity='full'``: () (every row, the exact fallback)."""
    if sample_cfg.get("head_capacity", "auto") == "full":
        return ()
    return powers_of_two_to(n)


def head_rows(sample_cfg, n: int, count: int) -> int:
    """Rows per sample the head runs for a reveal of ``count`` tokens: full chunks, then the
    smallest ``head_ladder`` rung holding the remainder (``head_draw.revealed_values``)."""
    chunk, rungs = head_chunk(sample_cfg, n), head_ladder(sample_cfg, n)
    full = max(count - 1, 0) // chunk
    rest = count - full * chunk
    return full * chunk + rung_at(rungs, rest)


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
