"""Dropout that draws a quarter of the random words ``flax.linen.Dropout`` draws.

Why: with sharding-invariant ("partitionable") threefry, which JAX uses by default, every
element of ``jax.random.bits`` or ``bernoulli`` costs one threefry2x32 block, whose 64 output
bits are folded to 32, and dropout keeps one comparison of them. On eMIGM-XS training those
hashes took 17% of the CPU step (docs/ARCHITECTURE.md). Here every block's 64 bits give four
16-bit draws, from the same per-element counters (iotas along each axis, so the bits still do
not depend on how the array is sharded), and the last axis is drawn in groups of four.

An element is dropped when its 16-bit draw is below ``round(rate * 2^16)``, so the drop
probability is q = round(rate * 2^16) / 2^16 (|q - rate| <= 2^-17, e.g. 0.1 -> 0.1000061) and
kept values are scaled by 1 / (1 - q): E[output] = input exactly.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.random import threefry2x32_p

_LEVELS = 1 << 16


def drop_threshold(rate: float) -> int:
    """16-bit draws below this are dropped: round(rate * 2^16)."""
    return int(round(float(rate) * _LEVELS))


def threefry_words(rng: jax.Array) -> jax.Array:
    """The [2] uint32 words of a threefry key (typed or raw)."""
    data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    if data.shape != (2,):
        raise ValueError(f"dropout needs a threefry2x32 key ([2] uint32), got key data of shape "
                         f"{data.shape}")
    return data.astype(jnp.uint32)


def uniform_u16(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``shape`` uniform uint16 draws, four per threefry2x32 block."""
    groups = -(-shape[-1] // 4) if shape else 1
    block_shape = tuple(shape[:-1]) + (groups,)
    count = jnp.zeros(block_shape, jnp.uint32)
    stride = 1
    for axis in range(len(block_shape) - 1, -1, -1):  # flat index of each block (mod 2^32)
        count = count + lax.broadcasted_iota(jnp.uint32, block_shape, axis) * jnp.uint32(stride)
        stride *= block_shape[axis]
    if stride >= 1 << 32:
        raise ValueError(f"dropout on {shape}: over 2^32 threefry blocks in one draw")
    key = threefry_words(rng)
    hi = jnp.zeros(block_shape, jnp.uint32)  # the high counter word (< 2^32 blocks)
    w1, w2 = threefry2x32_p.bind(key[0], key[1], hi, count)
    words = jnp.stack([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], axis=-1)  # [..., g, 4]
    words = words.reshape(tuple(shape[:-1]) + (4 * groups,))[..., :shape[-1]] if shape else words[0]
    return words.astype(jnp.uint16)


def dropout(rng: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """x with each element zeroed with probability q (see module doc), the rest / (1 - q)."""
    threshold = drop_threshold(rate)
    if threshold <= 0:
        return x
    if threshold >= _LEVELS:
        return jnp.zeros_like(x)
    keep = uniform_u16(rng, x.shape) >= jnp.uint16(threshold)
    scale = jnp.asarray(_LEVELS / (_LEVELS - threshold), x.dtype)
    return jnp.where(keep, x * scale, jnp.zeros_like(x))


class Dropout(nn.Module):
    """``flax.linen.Dropout``'s interface and rng collection ('dropout'), a quarter of its
    threefry work."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if deterministic or self.rate <= 0:
            return x
        return dropout(self.make_rng("dropout"), x, self.rate)
