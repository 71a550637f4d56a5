"""Categorical head over a codebook of K discrete tokens (MaskGIT / MDM path)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emigm_jax.models.transformer import dense, layer_norm


class CategoricalHead(nn.Module):
    """z [..., D] -> logits [..., K].

    ``mlp=True``: linear, GELU, LayerNorm, then the output table (MaskGIT's token head);
    ``mlp=False``: the output table alone (MaskGIL's untied output embedding).
    """

    vocab_size: int
    mlp: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        d = z.shape[-1]
        h = z.astype(self.dtype)
        if self.mlp:
            h = dense(d, "fc", self.dtype, self.use_bias)(h)
            h = layer_norm("norm", self.dtype)(nn.gelu(h, approximate=False))
        return dense(self.vocab_size, "out", self.dtype, self.use_bias)(h).astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy with optional label smoothing.

    Smoothing follows the usual convention: target distribution
    (1 - eps) * onehot + eps / K. logits [..., K], targets [...] int -> [...].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if label_smoothing == 0.0:
        return nll
    uniform = -jnp.mean(logp, axis=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform
