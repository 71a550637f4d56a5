"""Per-token diffusion head (MAR's SimpleMLPAdaLN), parameter names as in the reference.

It models p(x0^i | z^i) for one continuous token: an MLP of adaLN residual blocks conditioned
on the transformer output z^i and the diffusion timestep. Output has 2*C channels: epsilon and
the iDDPM learned-range variance interpolation value.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emigm_jax.models.transformer import dense, layer_norm

zeros = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps; t: [M] -> [M, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    hidden: int
    frequency_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        # t: [M] -> [M, hidden]
        init = nn.initializers.normal(0.02)
        h = timestep_embedding(t, self.frequency_dim).astype(self.dtype)
        h = nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype, name="mlp_0")(h)
        h = nn.silu(h)
        return nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype, name="mlp_2")(h)


class ResBlock(nn.Module):
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        # x, y: [M, W]
        mod = nn.Dense(3 * self.channels, kernel_init=zeros, dtype=self.dtype,
                       name="adaLN_modulation_1")(nn.silu(y))
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = modulate(layer_norm("in_ln", self.dtype)(x), shift, scale)
        h = dense(self.channels, "mlp_0", self.dtype)(h)
        h = dense(self.channels, "mlp_2", self.dtype)(nn.silu(h))
        return x + gate * h


class FinalLayer(nn.Module):
    channels: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        mod = nn.Dense(2 * self.channels, kernel_init=zeros, dtype=self.dtype,
                       name="adaLN_modulation_1")(nn.silu(y))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm("norm_final", self.dtype, use_scale=False, use_bias=False)(x),
                     shift, scale)
        return nn.Dense(self.out_channels, kernel_init=zeros, dtype=self.dtype, name="linear")(x)


class SimpleMLPAdaLN(nn.Module):
    """(x_t [M, C], t [M], z [M, D]) -> [M, 2C] (eps | variance value)."""

    in_channels: int
    width: int
    depth: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, z):
        x = dense(self.width, "input_proj", self.dtype)(x.astype(self.dtype))
        y = TimestepEmbedder(self.width, dtype=self.dtype, name="time_embed")(t)
        y = y + dense(self.width, "cond_embed", self.dtype)(z.astype(self.dtype))
        for i in range(self.depth):
            x = ResBlock(self.width, self.dtype, name=f"res_blocks_{i}")(x, y)
        out = FinalLayer(self.width, 2 * self.in_channels, self.dtype, name="final_layer")(x, y)
        return out.astype(jnp.float32)
