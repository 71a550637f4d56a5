"""Variance-preserving noise schedules in the form DPM-Solver uses them.

``DiscreteVPSchedule`` is the head's discrete cosine schedule as a continuous-time VP
schedule (see ``emigm_jax.diffusion.dpm_solver`` for its conventions: float32 table,
``numerical_clip_alpha``, network time); ``LinearVPSchedule`` is the continuous linear one
used in the solver's own tests.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from emigm_jax.diffusion.gaussian import get_named_beta_schedule


class NoiseScheduleVP:
    """VP noise schedule: q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), alpha^2 + sigma^2 = 1.

    Subclasses define ``marginal_log_mean_coeff`` and ``inverse_lambda``. Every method takes
    an array module ``xp`` (numpy float64 on the host by default; ``jax.numpy`` works too).
    Instances hash by identity, so they can be static arguments / cache keys.
    """

    T: float = 1.0
    total_N: int = 1000

    def marginal_log_mean_coeff(self, t, xp=np):
        raise NotImplementedError

    def inverse_lambda(self, lamb, xp=np):
        raise NotImplementedError

    def model_time(self, t, xp=np):
        """Continuous time -> the time value the network is given."""
        return t

    @property
    def default_t_end(self) -> float:
        return 1.0 / self.total_N

    def marginal_alpha(self, t, xp=np):
        return xp.exp(self.marginal_log_mean_coeff(t, xp))

    def marginal_std(self, t, xp=np):
        return xp.sqrt(1.0 - xp.exp(2.0 * self.marginal_log_mean_coeff(t, xp)))

    def marginal_lambda(self, t, xp=np):
        """Half log-SNR: log alpha_t - log sigma_t."""
        log_mean = self.marginal_log_mean_coeff(t, xp)
        return log_mean - 0.5 * xp.log(1.0 - xp.exp(2.0 * log_mean))


def _interp(x, xp_keys, yp, xp=np):
    """Piecewise-linear y(x) through increasing keypoints, extrapolating the end segments."""
    K = xp_keys.shape[0]
    idx = xp.clip(xp.searchsorted(xp_keys, x, side="right") - 1, 0, K - 2)
    x0, x1 = xp_keys[idx], xp_keys[idx + 1]
    y0, y1 = yp[idx], yp[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiscreteVPSchedule(NoiseScheduleVP):
    """The reference's ``NoiseScheduleVP('discrete', betas=...)`` with lambda clipping.

    Default: the 1000-step iDDPM cosine betas, truncated to N = 996 steps.
    """

    def __init__(self, betas: np.ndarray | None = None, alphas_cumprod: np.ndarray | None = None,
                 clipped_lambda: float | None = -5.1, table_dtype: Any = np.float32):
        if betas is None and alphas_cumprod is None:
            betas = get_named_beta_schedule("cosine", 1000)
        if betas is not None:
            log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
        else:
            log_alphas = 0.5 * np.log(np.asarray(alphas_cumprod, np.float64))
        self.num_dropped = 0
        if clipped_lambda is not None:
            log_sigmas = 0.5 * np.log(1.0 - np.exp(2.0 * log_alphas))
            lambs = log_alphas - log_sigmas
            # number of trailing steps with lambda < clipped_lambda (searchsorted on the
            # increasing, flipped lambda array, left side: as the reference)
            idx = int(np.searchsorted(lambs[::-1], clipped_lambda))
            if idx > 0:
                log_alphas = log_alphas[:-idx]
            self.num_dropped = idx
        self.log_alpha_array = np.asarray(log_alphas.astype(table_dtype), np.float64)
        self.total_N = int(self.log_alpha_array.shape[0])
        self.t_array = np.linspace(0.0, 1.0, self.total_N + 1)[1:]

    def __repr__(self) -> str:
        return f"DiscreteVPSchedule(total_N={self.total_N}, dropped={self.num_dropped})"

    def marginal_log_mean_coeff(self, t, xp=np):
        return _interp(t, xp.asarray(self.t_array), xp.asarray(self.log_alpha_array), xp)

    def inverse_lambda(self, lamb, xp=np):
        log_alpha = -0.5 * xp.logaddexp(0.0, -2.0 * lamb)
        return _interp(log_alpha, xp.asarray(self.log_alpha_array[::-1].copy()),
                       xp.asarray(self.t_array[::-1].copy()), xp)

    def model_time(self, t, xp=np):
        """(t - 1/N) * 1000: what the reference's model_wrapper feeds a discrete-time DPM."""
        return (t - 1.0 / self.total_N) * 1000.0


class LinearVPSchedule(NoiseScheduleVP):
    """Continuous linear VP-SDE (beta(t) = beta_0 + t (beta_1 - beta_0)), analytic inverse."""

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0):
        self.beta_0, self.beta_1 = float(beta_0), float(beta_1)

    def __repr__(self) -> str:
        return f"LinearVPSchedule(beta_0={self.beta_0}, beta_1={self.beta_1})"

    def marginal_log_mean_coeff(self, t, xp=np):
        return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lamb, xp=np):
        db = self.beta_1 - self.beta_0
        tmp = 2.0 * db * xp.logaddexp(-2.0 * lamb, 0.0)
        delta = self.beta_0 ** 2 + tmp
        return tmp / (xp.sqrt(delta) + self.beta_0) / db


@functools.lru_cache(maxsize=None)
def default_schedule() -> DiscreteVPSchedule:
    """The head's solver schedule (cosine, 1000 -> 996 steps); one cached instance."""
    return DiscreteVPSchedule()
