"""Discrete Gaussian diffusion of the per-token head (iDDPM as used by MAR and eMIGM).

Conventions (the lead's sampler and loss rely on these):

* Schedule: ``create_diffusion()`` gives the training process of the reference: 1000 steps,
  iDDPM cosine betas ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` with
  ``abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2``. Every derived array is float64 numpy,
  built once on the host; jitted code reads them as float32 constants (as the reference's
  ``_extract_into_tensor`` does).
* Model interface: ``model_fn(x_t [M, C] f32, t [M] f32) -> [M, 2C]``: the first C channels
  are epsilon, the last C the learned-range value v in [-1, 1]; log variance is
  ``frac * log(beta_t) + (1 - frac) * log(posterior_variance_t)`` (clipped at t = 0) with
  ``frac = (v + 1) / 2``. ``t`` is the ORIGINAL 0..999 index as a float: a respaced process
  maps its own index through ``timestep_map`` before calling the model (the reference's
  ``rescale_timesteps`` is disabled, so no rescaling to 1000 happens on top of the map).
* Loss: the reference's ``create_diffusion`` defaults give ``LossType.MSE`` (no 1/1000
  rescaling of the VB term; with 1000 training steps the factor ``T / 1000`` of
  ``RESCALED_MSE`` would be 1 anyway): ``loss = mean_C (eps - eps_hat)^2 + vb`` where ``vb`` is
  KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per channel, with a stop-gradient on the
  model's eps so only the variance channels learn from it, and the discretized-Gaussian
  decoder NLL (bins of 2/255, data assumed in [-1, 1]) at t == 0, exactly as the reference.
* Respacing: ``space_timesteps`` is the reference rule (Python ``round`` on an accumulated
  float stride, per section); ``GaussianDiffusion.respaced(...)`` rebuilds betas from the kept
  ``alphas_cumprod`` entries.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t [M, C], t [M]) -> [M, 2C]

BETA_SCHEDULES = ("cosine", "linear")


def cosine_alpha_bar(t: float) -> float:
    """iDDPM cosine alpha_bar(t) for t in [0, 1] (offset s = 0.008)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising a continuous alpha_bar, clipped at ``max_beta`` (float64, [T])."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return np.array([
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ], dtype=np.float64)


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The reference's named beta schedules: 'cosine' (iDDPM) or 'linear' (DDPM, scaled to T)."""
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, cosine_alpha_bar)
    if name == "linear":
        scale = 1000.0 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {BETA_SCHEDULES}")


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Kept timesteps of a respaced process, sorted ascending (reference ``space_timesteps``).

    ``section_counts``: an int or "N" (one section), "a,b,c" (equal-size portions of the
    original process, each strided to that many steps), a list of ints, or "ddimN" (the DDIM
    paper's fixed integer stride).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} "
                             "with an integer stride")
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError as e:
            raise ValueError(f"bad timestep respacing {section_counts!r}; expected 'N', "
                             "'a,b,...' or 'ddimN'") from e
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(x) for x in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"cannot divide a section of {size} steps into {count} "
                             f"(respacing {section_counts!r} of {num_timesteps} steps)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))  # Python round (banker's), as the reference
            cur += stride
        start += size
    return sorted(set(steps))


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of Phi(x) the reference uses (kept for exact loss parity)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(bin of x) under N(means, e^{2 log_scales}), bins of width 2/255 on [-1, 1], nats."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """A (possibly respaced) discrete Gaussian diffusion with eps prediction, learned range.

    Holds float64 numpy arrays only, so it is a compile-time constant: close over it (or pass
    it as a static argument; it hashes by identity) rather than passing it as a traced value.

    Attributes (all float64 [T] unless noted): betas, alphas_cumprod, alphas_cumprod_prev,
    alphas_cumprod_next, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
    posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1,
    posterior_mean_coef2, timestep_map (int64 [T]: index fed to the model),
    original_num_steps (int).
    """

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None,
                 original_num_steps: int | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must be a 1-D array in (0, 1], got shape {betas.shape}, "
                             f"range [{betas.min()}, {betas.max()}]")
        self.betas = betas
        self.num_timesteps = T = int(betas.shape[0])
        self.timestep_map = (np.arange(T, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have {T} entries, got {self.timestep_map.shape}")
        self.original_num_steps = T if original_num_steps is None else int(original_num_steps)

        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)
        self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # posterior variance is 0 at t = 0: the log uses the t = 1 value there
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if T > 1 else np.array([], dtype=np.float64))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, "
                f"original_num_steps={self.original_num_steps})")

    # ---------------------------------------------------------------- respacing
    def respaced(self, section_counts: int | str | Sequence[int]) -> "GaussianDiffusion":
        """The process restricted to ``space_timesteps(T, section_counts)`` (SpacedDiffusion)."""
        if self.original_num_steps != self.num_timesteps:
            raise ValueError("respace the original process, not an already respaced one")
        keep = space_timesteps(self.num_timesteps, section_counts)
        ac = self.alphas_cumprod[keep]
        prev = np.append(1.0, ac[:-1])
        return GaussianDiffusion(1.0 - ac / prev, timestep_map=keep,
                                 original_num_steps=self.num_timesteps)

    # ---------------------------------------------------------------- helpers (jnp)
    @staticmethod
    def _extract(arr: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
        """arr[t] as float32 with shape [M, 1, ...] for broadcasting against an ndim array."""
        v = jnp.asarray(arr, dtype=jnp.float32)[t]
        return v.reshape(v.shape + (1,) * (ndim - 1))

    def model_time(self, t: jax.Array) -> jax.Array:
        """Respaced index [M] int -> the original index the network sees, float32 [M]."""
        return jnp.asarray(self.timestep_map, dtype=jnp.float32)[t]

    def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; x_start [M, C], t [M] int."""
        n = x_start.ndim
        return (self._extract(self.sqrt_alphas_cumprod, t, n) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0); each [M, C]."""
        n = x_t.ndim
        mean = (self._extract(self.posterior_mean_coef1, t, n) * x_start
                + self._extract(self.posterior_mean_coef2, t, n) * x_t)
        var = jnp.broadcast_to(self._extract(self.posterior_variance, t, n), x_t.shape)
        logvar = jnp.broadcast_to(self._extract(self.posterior_log_variance_clipped, t, n),
                                  x_t.shape)
        return mean, var, logvar

    def predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps)

    def p_mean_variance_from_output(self, model_output: jax.Array, x_t: jax.Array,
                                    t: jax.Array) -> dict[str, jax.Array]:
        """p(x_{t-1} | x_t) from a head output [M, 2C] (eps | v); no x0 clipping (as the head).

        Returns dict(mean, variance, log_variance, pred_xstart), each [M, C] float32.
        """
        C = x_t.shape[1]
        if model_output.shape[1] != 2 * C:
            raise ValueError(f"model output must have 2*C = {2 * C} channels (eps | v), "
                             f"got shape {model_output.shape}")
        model_output = model_output.astype(jnp.float32)
        eps, v = model_output[:, :C], model_output[:, C:]
        n = x_t.ndim
        min_log = self._extract(self.posterior_log_variance_clipped, t, n)
        max_log = self._extract(self.log_betas, t, n)
        frac = (v + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": jnp.exp(log_var), "log_variance": log_var,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model_fn: ModelFn, x_t: jax.Array, t: jax.Array):
        """Calls ``model_fn(x_t, timestep_map[t])`` and returns p(x_{t-1} | x_t) (see above)."""
        return self.p_mean_variance_from_output(model_fn(x_t, self.model_time(t)), x_t, t)

    # ---------------------------------------------------------------- training loss
    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> jax.Array:
        """VLB term per row in bits: KL for t > 0, decoder NLL at t == 0; [M]."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]))
        kl = kl / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                        noise: jax.Array) -> dict[str, jax.Array]:
        """iDDPM hybrid loss per row: dict(loss, mse, vb), each [M] float32.

        x_start, noise: [M, C]; t: [M] int in [0, T). ``mse`` trains eps; ``vb`` trains only
        the variance channels (eps is stop-gradiented inside it).
        """
        if x_start.shape != noise.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        x_start = x_start.astype(jnp.float32)
        x_t = self.q_sample(x_start, t, noise.astype(jnp.float32))
        out = model_fn(x_t, self.model_time(t)).astype(jnp.float32)
        C = x_start.shape[1]
        if out.shape != (x_start.shape[0], 2 * C) + x_start.shape[2:]:
            raise ValueError(f"model output shape {out.shape}; expected "
                             f"{(x_start.shape[0], 2 * C) + x_start.shape[2:]} (eps | v)")
        eps, v = out[:, :C], out[:, C:]
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        mse = _mean_flat((noise.astype(jnp.float32) - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(timestep_respacing: int | str | Sequence[int] | None = None,
                     noise_schedule: str = "cosine",
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The reference's ``create_diffusion`` (learned range, eps prediction, MSE + VB loss).

    ``timestep_respacing`` None or "" gives the full training process; "100" gives the DDPM
    sampling process of the head.
    """
    base = GaussianDiffusion(get_named_beta_schedule(noise_schedule, diffusion_steps))
    if timestep_respacing is None or timestep_respacing == "":
        # the reference always builds a SpacedDiffusion; keeping all steps re-derives the
        # betas from alphas_cumprod (equal to the originals up to float64 rounding)
        timestep_respacing = [diffusion_steps]
    return base.respaced(timestep_respacing)
