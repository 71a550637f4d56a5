"""Mask schedules gamma(t), their derivatives, and loss weights w(t).

One source of truth for every schedule the framework uses, in training (masking ratio) and
in sampling (reveal probabilities). Convention (docs/ARCHITECTURE.md):
gamma(t) is the masked fraction, t = 1 is fully masked, sampling runs t from 1 to 0.

Every function takes an array module ``xp`` (``jax.numpy`` by default) so the same formula
serves jitted code and float64 numpy references in tests.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

SCHEDULE_NAMES = ("linear", "cosine", "exp", "log_exp", "sqrt", "pow", "poly", "arccos")
# Names used by the reference code and the companion papers, mapped onto ours.
SCHEDULE_ALIASES = {
    "log": ("log_exp", {}),
    "poly-0.5": ("poly", {"poly_p": 0.5}),
    "root": ("pow", {"pow_rho": 0.5}),
    "square": ("pow", {"pow_rho": 2.0}),
}
WEIGHT_NAMES = ("one", "mdm")


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """gamma(t): fraction of tokens masked at time t in [0, 1].

    Attributes:
      name: one of SCHEDULE_NAMES.
      exp_rate: rate a of ``exp`` (1 - e^{-a t}) and ``log_exp`` (log(1 + (e^a - 1) t) / a).
      pow_rho: exponent of ``pow``: 1 - (1 - t)^rho.
      poly_p: exponent of ``poly``: t^p.
    """

    name: str
    exp_rate: float = 5.0
    pow_rho: float = 0.5
    poly_p: float = 0.5

    def __post_init__(self):
        if self.name not in SCHEDULE_NAMES:
            raise ValueError(
                f"unknown mask schedule {self.name!r}; expected one of {SCHEDULE_NAMES} "
                f"(or an alias in {tuple(SCHEDULE_ALIASES)})")
        for field in ("exp_rate", "pow_rho", "poly_p"):
            value = getattr(self, field)
            if not value > 0:
                raise ValueError(f"schedule parameter {field}={value!r} must be > 0")

    def gamma(self, t, xp: Any = jnp):
        """Masked fraction gamma(t)."""
        a = self.exp_rate
        if self.name == "linear":
            return t * xp.ones_like(t)
        if self.name == "cosine":
            return xp.cos(0.5 * math.pi * (1.0 - t))
        if self.name == "exp":
            return -xp.expm1(-a * t)
        if self.name == "log_exp":
            return xp.log1p(math.expm1(a) * t) / a
        if self.name == "sqrt":
            return xp.sqrt(t)
        if self.name == "pow":
            return 1.0 - (1.0 - t) ** self.pow_rho
        if self.name == "poly":
            return t ** self.poly_p
        if self.name == "arccos":
            return (2.0 / math.pi) * xp.arccos(1.0 - t)
        raise AssertionError(self.name)

    def dgamma(self, t, xp: Any = jnp):
        """Derivative gamma'(t)."""
        a = self.exp_rate
        if self.name == "linear":
            return xp.ones_like(t)
        if self.name == "cosine":
            return 0.5 * math.pi * xp.sin(0.5 * math.pi * (1.0 - t))
        if self.name == "exp":
            return a * xp.exp(-a * t)
        if self.name == "log_exp":
            return math.expm1(a) / (a * (1.0 + math.expm1(a) * t))
        if self.name == "sqrt":
            return 0.5 / xp.sqrt(t)
        if self.name == "pow":
            return self.pow_rho * (1.0 - t) ** (self.pow_rho - 1.0)
        if self.name == "poly":
            return self.poly_p * t ** (self.poly_p - 1.0)
        if self.name == "arccos":
            return 2.0 / (math.pi * xp.sqrt(t * (2.0 - t)))
        raise AssertionError(self.name)

    def weight(self, t, weight: str, xp: Any = jnp):
        """Loss weight w(t) of eq. 7: ``one`` -> 1, ``mdm`` -> gamma'(t) / gamma(t)."""
        if weight == "one":
            return xp.ones_like(t)
        if weight == "mdm":
            return self.dgamma(t, xp) / self.gamma(t, xp)
        raise ValueError(f"unknown loss weight {weight!r}; expected one of {WEIGHT_NAMES}")


def get_schedule(name: str, **params: float) -> MaskSchedule:
    """Builds a schedule by name (``params``: exp_rate, pow_rho, poly_p, else MaskSchedule's
    defaults), resolving the reference code's and papers' aliases."""
    if name in SCHEDULE_ALIASES:
        name, overrides = SCHEDULE_ALIASES[name]
        params = dict(params, **overrides)
    return MaskSchedule(name=name, **params)


def schedule_from_config(cfg) -> MaskSchedule:
    """Schedule from a config section with fields schedule, exp_rate, pow_rho, poly_p.

    Works for both ``config.mask`` (training) and ``config.sample`` (sampling).
    """
    return get_schedule(
        cfg.schedule,
        exp_rate=float(cfg.exp_rate),
        pow_rho=float(cfg.pow_rho),
        poly_p=float(cfg.poly_p),
    )
