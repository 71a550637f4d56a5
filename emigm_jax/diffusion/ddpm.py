"""Ancestral (DDPM) sampling of the diffusion head over a respaced schedule.

Reference behaviour (MAR / eMIGM ``p_sample_loop`` with ``clip_denoised=False``):
``x_{t-1} = mean + [t != 0] * exp(0.5 * log_var) * z * temperature`` with the learned-range
variance; the temperature scales the noise's standard deviation, never the mean, and the
last step (t == 0) adds no noise. The model sees the original 0..999 index through the
process's ``timestep_map`` (see ``gaussian.py``). The default sampling process is
``create_diffusion("100")``.

CFG is the caller's business: pass a ``model_fn`` whose eps half is already guided and whose
variance half is the conditional row's (the reference ``forward_with_cfg``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from emigm_jax.diffusion.gaussian import GaussianDiffusion, ModelFn, create_diffusion


def p_sample(model_fn: ModelFn, diffusion: GaussianDiffusion, x: jax.Array, t: jax.Array,
             rng: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """One ancestral step x_t -> x_{t-1}; x [M, C], t [M] int (respaced index)."""
    out = diffusion.p_mean_variance(model_fn, x, t)
    z = jax.random.normal(rng, x.shape, dtype=jnp.float32)
    nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z * temperature


def ddpm_sample(model_fn: ModelFn, noise: jax.Array, rng: jax.Array,
                diffusion: GaussianDiffusion | None = None,
                temperature: float | jax.Array = 1.0) -> jax.Array:
    """x_0 [M, C] float32 from x_T = noise [M, C] by ancestral sampling (``lax.scan``).

    ``diffusion`` defaults to the reference's 100-step respaced cosine process; it is a host
    constant (close over it). ``temperature`` may be a traced scalar. ``rng`` supplies the
    per-step noise (one key per step).
    """
    if diffusion is None:
        diffusion = default_ddpm_diffusion()
    T = diffusion.num_timesteps
    x = noise.astype(jnp.float32)
    M = x.shape[0]
    keys = jax.random.split(rng, T)
    ts = jnp.arange(T - 1, -1, -1, dtype=jnp.int32)

    def body(x, inp):
        t, key = inp
        return p_sample(model_fn, diffusion, x, jnp.full((M,), t, jnp.int32), key,
                        temperature), None

    x, _ = jax.lax.scan(body, x, (ts, keys))
    return x


_DEFAULT: dict[str, GaussianDiffusion] = {}


def default_ddpm_diffusion(num_steps: int | str = 100) -> GaussianDiffusion:
    """Cached ``create_diffusion(str(num_steps), 'cosine')`` (the head's sampling process)."""
    key = str(num_steps)
    if key not in _DEFAULT:
        _DEFAULT[key] = create_diffusion(key, noise_schedule="cosine")
    return _DEFAULT[key]
