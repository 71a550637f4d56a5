"""Pre-norm ViT block (timm layout) with key-padding masks.

The block mirrors timm's ``Block`` used by the reference code (fused qkv with bias, GELU MLP,
attention-probability dropout and projection dropout, LayerNorm eps 1e-6) so that official
checkpoints map one-to-one onto these parameters. Padding masks let the MAE encoder run on a
static-shape token buffer where dropped tokens are excluded as keys: the outputs at kept
positions then equal those of a transformer that never saw the dropped tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-6
xavier_uniform = nn.initializers.xavier_uniform()


def dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    """Linear layer with the reference initialisation (Xavier-uniform weight, zero bias)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=xavier_uniform,
                    bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32,
                    name=name)


def layer_norm(name: str, dtype: Any, use_scale: bool = True, use_bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_scale=use_scale, use_bias=use_bias, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection ([q | k | v], heads contiguous)."""

    num_heads: int
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None, deterministic: bool = True):
        # x: [B, L, D]; key_mask: [B, L] bool, True = token may be attended to.
        b, l, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        hd = d // self.num_heads
        qkv = dense(3 * d, "qkv", self.dtype)(x)  # [B, L, 3D]
        qkv = qkv.reshape(b, l, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd ** -0.5)
        logits = logits.astype(jnp.float32)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if self.attn_dropout > 0:
            probs = nn.Dropout(self.attn_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, d)
        out = dense(d, "proj", self.dtype)(out)
        if self.proj_dropout > 0:
            out = nn.Dropout(self.proj_dropout)(out, deterministic=deterministic)
        return out


class Mlp(nn.Module):
    hidden: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        d = x.shape[-1]
        h = dense(self.hidden, "fc1", self.dtype)(x)
        h = nn.gelu(h, approximate=False)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = dense(d, "fc2", self.dtype)(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return h


class ViTBlock(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x))."""

    num_heads: int
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None, deterministic: bool = True):
        # x: [B, L, D]
        d = x.shape[-1]
        h = layer_norm("norm1", self.dtype)(x)
        x = x + Attention(self.num_heads, self.attn_dropout, self.proj_dropout, self.dtype,
                          name="attn")(h, key_mask, deterministic)
        h = layer_norm("norm2", self.dtype)(x)
        x = x + Mlp(int(d * self.mlp_ratio), self.proj_dropout, self.dtype, name="mlp")(
            h, deterministic)
        return x


class BlockStack(nn.Module):
    """``depth`` blocks named ``{prefix}_{i}``; optional rematerialisation per block."""

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    prefix: str = "blocks"

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None, deterministic: bool = True):
        block_cls = nn.remat(ViTBlock, static_argnums=(3,)) if self.remat else ViTBlock
        for i in range(self.depth):
            x = block_cls(self.num_heads, self.mlp_ratio, self.attn_dropout, self.proj_dropout,
                          self.dtype, name=f"{self.prefix}_{i}")(x, key_mask, deterministic)
        return x
