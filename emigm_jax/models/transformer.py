"""Transformer blocks: timm's pre-norm ViT block and a bias-free LLaMA block, with options.

Options (config ``model.block``, ``model.qk_norm``, ``model.post_norm``, ``model.pos_emb``):
  * ``vit``: LayerNorm, qkv/proj/MLP with bias, GELU MLP (ratio ``mlp_ratio``).
  * ``llama``: RMSNorm, no biases, SwiGLU MLP with hidden size 8d/3 rounded up to 256.
  * ``qk_norm``: a norm (the block's kind) over the head dimension of queries and keys,
    applied before RoPE.
  * ``post_norm``: a norm on the outputs of the attention and MLP branches before the
    residual add (MaskGIL-XXL's stabiliser), on top of the pre-norms.
  * RoPE-2D (``rope`` angles, or a ``RopeTable`` of cos/sin, passed in): frequency layout
    documented in ``rope2d_angles``; ``rope_pairing`` picks which channels rotate together
    (``half``: j with j + m/2 inside each half; ``interleaved``: 2j with 2j + 1, LlamaGen's).
  * ``norm_eps``: epsilon of every norm in the block (LayerNorm/RMSNorm; LlamaGen uses 1e-5).
  * ``causal`` (the autoregressive model): query i attends to keys 0..i. With a ``KVCache``
    the block writes this call's keys/values at ``cache_index`` and attends over the cache,
    so decoding one token costs one token's pass (the cache is an explicit input/output,
    not hidden module state).

The block mirrors timm's ``Block`` used by the reference code (fused qkv with bias, GELU MLP,
attention-probability dropout and projection dropout, LayerNorm eps 1e-6) so that official
checkpoints map one-to-one onto these parameters. Padding masks let the MAE encoder run on a
static-shape token buffer where dropped tokens are excluded as keys: the outputs at kept
positions then equal those of a transformer that never saw the dropped tokens.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from emigm_jax.buckets import gather_rows, switch_on_count
from emigm_jax.models.attention_ops import allowed_keys, fused_attention
from emigm_jax.models.dropout import Dropout
from emigm_jax.sharding import constrain_rows, gather_weights

LN_EPS = 1e-6
xavier_uniform = nn.initializers.xavier_uniform()


def dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
    """Linear layer with the reference initialisation (Xavier-uniform weight, zero bias)."""
    return nn.Dense(features, use_bias=use_bias, kernel_init=xavier_uniform,
                    bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32,
                    name=name)


def layer_norm(name: str, dtype: Any, use_scale: bool = True, use_bias: bool = True,
               eps: float = LN_EPS) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_scale=use_scale, use_bias=use_bias, dtype=dtype,
                        param_dtype=jnp.float32, name=name)




def rms_norm(name: str, dtype: Any, eps: float = LN_EPS) -> nn.RMSNorm:
    return nn.RMSNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


def block_norm(kind: str, name: str, dtype: Any, eps: float = LN_EPS):
    """The block's normalisation: LayerNorm for vit, RMSNorm for llama."""
    return rms_norm(name, dtype, eps) if kind == "llama" else layer_norm(name, dtype, eps=eps)


def swiglu_hidden(width: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: 8d/3 rounded up to a multiple of 256."""
    hidden = int(8 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope2d_angles(rows: jax.Array, cols: jax.Array, head_dim: int, base: float = 10000.0):
    """Rotation angles [..., head_dim / 2] for 2-D RoPE.

    Layout: the first half of each head's channels carries a 1-D RoPE over the row index, the
    second half one over the column index. Within a half of size m = head_dim / 2, channel j
    pairs with channel j + m/2 ("rotate-half" convention) and rotates by pos * base^(-2j/m),
    j = 0..m/2-1. Positions < 0 (class/prefix tokens) get angle 0: they are not rotated.
    """
    if head_dim % 4:
        raise ValueError(f"rope2d needs a head dimension divisible by 4, got {head_dim}")
    m = head_dim // 2
    inv = base ** (-2.0 * jnp.arange(m // 2, dtype=jnp.float32) / m)  # [m/2]
    def half(pos):
        ang = pos.astype(jnp.float32)[..., None] * inv
        return jnp.where(pos[..., None] >= 0, ang, 0.0)
    return jnp.concatenate([half(rows), half(cols)], axis=-1)  # [..., head_dim/2]


class RopeTable(NamedTuple):
    """cos and sin of the rotation angles, [B, L, hd/2] each.

    Passed instead of angles where a position must not be a pure rotation: LlamaGen's prefix
    (class) positions carry cos = sin = 0, which zeroes their queries and keys.
    """
    cos: jax.Array
    sin: jax.Array


ROPE_PAIRINGS = ("half", "interleaved")


def apply_rope(x: jax.Array, rope, pairing: str = "half") -> jax.Array:
    """x [B, L, H, hd], rope: angles [B, L, hd/2] or a RopeTable -> rotated x.

    Entry p of the hd/2 angles rotates one channel pair: with ``pairing='half'`` the pair
    (h*m + j, h*m + j + m/2) for p = h*m/2 + j in half h (m = hd/2); with ``'interleaved'``
    the pair (2p, 2p + 1).
    """
    if isinstance(rope, RopeTable):
        cos, sin = rope.cos[:, :, None, :], rope.sin[:, :, None, :]  # [B, L, 1, hd/2]
    else:
        cos, sin = jnp.cos(rope)[:, :, None, :], jnp.sin(rope)[:, :, None, :]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    if pairing == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]  # [B, L, H, hd/2]
        return jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
    if pairing != "half":
        raise ValueError(f"rope pairing {pairing!r} is not one of {ROPE_PAIRINGS}")
    m = x.shape[-1] // 2
    out = []
    for h in range(2):
        v = x[..., h * m:(h + 1) * m]
        a, b = v[..., : m // 2], v[..., m // 2:]
        c, s_ = cos[..., h * (m // 2):(h + 1) * (m // 2)], sin[..., h * (m // 2):(h + 1) * (m // 2)]
        out += [a * c - b * s_, b * c + a * s_]
    return jnp.concatenate(out, axis=-1)

class KVCache(NamedTuple):
    """One attention layer's keys and values for positions 0..L_max-1: [B, L_max, H, hd] each."""
    k: jax.Array
    v: jax.Array


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection ([q | k | v], heads contiguous)."""

    num_heads: int
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    use_bias: bool = True
    qk_norm: bool = False
    norm_kind: str = "vit"
    dtype: Any = jnp.float32
    causal: bool = False
    norm_eps: float = LN_EPS
    rope_pairing: str = "half"

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None, deterministic: bool = True,
                 rope: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 cache_index=None, rows: Optional[jax.Array] = None):
        # x: [B, L, D]; key_mask: [B, L] bool, True = token may be attended to;
        # rope: [B, L, hd/2] rotation angles, a RopeTable, or None; cache: keys/values of earlier
        # positions, x then holds positions cache_index..cache_index+L-1 (causal);
        # rows: [B, R] int, only these query rows are computed (every position stays a key).
        # Returns out [B, L or R, D], or (out, updated cache) when a cache is given.
        b, l, d = x.shape
        if rows is not None and (cache is not None or self.causal):
            raise ValueError("query rows are for bidirectional attention without a KV cache")
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
        hd = d // self.num_heads
        qkv = dense(3 * d, "qkv", self.dtype, self.use_bias)(x)  # [B, L, 3D]
        qkv = qkv.reshape(b, l, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, hd]
        if self.qk_norm:
            q = block_norm(self.norm_kind, "q_norm", self.dtype, self.norm_eps)(q)
            k = block_norm(self.norm_kind, "k_norm", self.dtype, self.norm_eps)(k)
        if rope is not None:
            q = apply_rope(q, rope, self.rope_pairing)
            k = apply_rope(k, rope, self.rope_pairing)
        offset = 0
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype),
                                                    cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype),
                                                    cache_index, axis=1)
            cache, offset = KVCache(k, v), cache_index
        if rows is not None:
            q = gather_rows(q, rows)  # [B, R, H, hd]
        lq = q.shape[1]
        allowed = allowed_keys(key_mask, self.causal or cache is not None, lq, k.shape[1],
                               offset)
        mask = None if allowed is None else allowed[:, None]  # [B or 1, 1, Lq, Lk]
        drop = None
        if self.attn_dropout > 0 and not deterministic:
            drop = functools.partial(Dropout(self.attn_dropout), deterministic=False)
        out = fused_attention(q, k, v, mask, drop, inference=deterministic)
        out = out.reshape(b, lq, d)
        out = dense(d, "proj", self.dtype, self.use_bias)(out)
        if self.proj_dropout > 0:
            out = Dropout(self.proj_dropout)(out, deterministic=deterministic)
        return out if cache is None else (out, cache)


class Mlp(nn.Module):
    """fc2(gelu(fc1 x)) with dropout after each layer (timm's Mlp)."""
    hidden: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def expand(self, x):  # [..., D] -> [..., hidden]
        return nn.gelu(dense(self.hidden, "fc1", self.dtype)(x), approximate=False)

    def project(self, h, d: int):  # [..., hidden] -> [..., D]
        return dense(d, "fc2", self.dtype)(h)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        def drop(h):
            if self.dropout > 0:
                return Dropout(self.dropout)(h, deterministic=deterministic)
            return h
        return drop(self.project(drop(self.expand(x)), x.shape[-1]))


class SwiGLU(Mlp):
    """w2(silu(w1 x) * w3 x), no biases; the fields and dropout of ``Mlp``."""

    def expand(self, x):
        return nn.silu(dense(self.hidden, "w1", self.dtype, False)(x)) * dense(
            self.hidden, "w3", self.dtype, False)(x)

    def project(self, h, d: int):
        return dense(d, "w2", self.dtype, False)(h)


class ViTBlock(nn.Module):
    """x + [post-norm] Attn(norm(x)); x + [post-norm] MLP(norm(x)). ``kind``: vit | llama."""

    num_heads: int
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Any = jnp.float32
    kind: str = "vit"
    qk_norm: bool = False
    post_norm: bool = False
    causal: bool = False
    rope_pairing: str = "half"
    norm_eps: float = LN_EPS

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None, deterministic: bool = True,
                 rope: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 cache_index=None, rows: Optional[jax.Array] = None):
        # x: [B, L, D] -> [B, L, D]; with a cache returns (x, updated cache) (see Attention);
        # with rows [B, R] only those rows' outputs [B, R, D] (all L rows are still keys)
        d = x.shape[-1]
        llama, eps = self.kind == "llama", self.norm_eps
        h = block_norm(self.kind, "norm1", self.dtype, eps)(x)
        h = Attention(self.num_heads, self.attn_dropout, self.proj_dropout, not llama,
                      self.qk_norm, self.kind, self.dtype, self.causal, eps, self.rope_pairing,
                      name="attn")(h, key_mask, deterministic, rope, cache, cache_index, rows)
        if cache is not None:
            h, cache = h
        if rows is not None:
            x = gather_rows(x, rows)
        if self.post_norm:
            h = block_norm(self.kind, "post_norm1", self.dtype, eps)(h)
        x = x + h
        h = block_norm(self.kind, "norm2", self.dtype, eps)(x)
        if llama:
            h = SwiGLU(swiglu_hidden(d), self.proj_dropout, self.dtype, name="mlp")(h, deterministic)
        else:
            h = Mlp(int(d * self.mlp_ratio), self.proj_dropout, self.dtype, name="mlp")(
                h, deterministic)
        if self.post_norm:
            h = block_norm(self.kind, "post_norm2", self.dtype, eps)(h)
        return x + h if cache is None else (x + h, cache)


class ReadRows(NamedTuple):
    """The outputs a caller will read: the first ``count`` rows of ``order``.

    Why: the sampler reads z only at the tokens it reveals, and only the last block's queries
    depend on which rows are read (every row is still a key). The last block therefore runs
    its queries on the smallest rung of ``rungs`` holding ``count`` (one ``lax.switch``
    branch per rung, only the chosen one executes); the outputs come back in ``order``'s
    order, zero-padded to ``order``'s length (the top rung).
    """
    order: jax.Array       # [B, R_top] int32 rows to read, in the order they are returned
    count: jax.Array       # [] int32 rows actually read (<= R_top)
    rungs: tuple           # static query capacities, increasing, last = R_top


class BlockStack(ViTBlock):
    """``depth`` blocks with this module's ``ViTBlock`` fields; optional rematerialisation per
    block and a scan over layers.

    Unrolled (``scan=False``) the blocks are named ``{prefix}_{i}``. With ``scan=True`` one
    block named ``{prefix}`` is applied ``depth`` times by ``nn.scan``: its parameters carry a
    leading layer axis, and the traced program (hence compile time) no longer grows with depth.
    ``emigm_jax.models.layout`` converts parameters between the two layouts. Inside a mesh
    context each block all-gathers its own weights where it runs (FSDP; see
    ``sharding.gather_weights``) and pins its output rows to the batch axes.
    """

    depth: int = 1
    remat: bool = False
    prefix: str = "blocks"
    scan: bool = False

    @nn.compact
    def __call__(self, x, key_mask: Optional[jax.Array] = None, deterministic: bool = True,
                 rope: Optional[jax.Array] = None, caches: Optional[tuple] = None,
                 cache_index=None, read: Optional[ReadRows] = None):
        """x [B, L, D] -> [B, L, D]; with ``caches`` (one KVCache per block, unrolled layout
        only) -> (x, caches); with ``read`` (inference) -> [B, R_top, D] (see ReadRows).
        key_mask: [B, L] bool or None; rope: [B, L, hd/2] angles, a RopeTable, or None."""
        args = (self.num_heads, self.mlp_ratio, self.attn_dropout, self.proj_dropout,
                self.dtype, self.kind, self.qk_norm, self.post_norm, self.causal,
                self.rope_pairing, self.norm_eps)
        if read is not None:
            if caches is not None or self.is_initializing():
                raise ValueError("ReadRows is for applying initialised blocks without caches")
            return self._read(args, constrain_rows(x), key_mask, rope, read)
        block_cls = nn.remat(ViTBlock, static_argnums=(3,)) if self.remat else ViTBlock
        block_cls = nn.map_variables(block_cls, "params",
                                     trans_in_fn=functools.partial(gather_weights, dtype=self.dtype),
                                     init=self.is_initializing())
        x = constrain_rows(x)
        if not self.scan:
            return self._unrolled(block_cls, args, x, key_mask, deterministic, rope, caches,
                                  cache_index)
        if caches is not None:
            raise ValueError("KV caches need the unrolled layout (model.scan_layers=False)")

        def body(block, carry, mask, angles):
            return constrain_rows(block(carry, mask, deterministic, angles)), None

        scanned = nn.scan(body, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
        x, _ = scanned(block_cls(*args, name=self.prefix), x, key_mask, rope)
        return x

    def _unrolled(self, block_cls, args, x, key_mask, deterministic, rope, caches, cache_index):
        """Blocks ``{prefix}_{i}`` one after another, threading the KV caches when given."""
        new_caches = []
        for i in range(self.depth):
            block = block_cls(*args, name=f"{self.prefix}_{i}")
            if caches is None:
                x = block(x, key_mask, deterministic, rope)
            else:
                x, cache = block(x, key_mask, deterministic, rope, caches[i], cache_index)
                new_caches.append(cache)
            x = constrain_rows(x)
        return x if caches is None else (x, tuple(new_caches))

    def _read(self, args, x, key_mask, rope, read: ReadRows):
        """Every block but the last on all rows, the last on the rows read (ReadRows).

        The blocks are applied from this stack's own parameters (either layout), each
        gathering its weights where it runs as in the plain path.
        """
        block, params = ViTBlock(*args), self.variables["params"]

        def apply(p, x, rows=None):
            p = gather_weights(p, dtype=self.dtype)
            return block.apply({"params": p}, x, key_mask, True, rope, None, None, rows)

        if self.scan:
            stacked = params[self.prefix]
            x, _ = jax.lax.scan(lambda x, p: (constrain_rows(apply(p, x)), None), x,
                                jax.tree_util.tree_map(lambda a: a[:-1], stacked))
            last = jax.tree_util.tree_map(lambda a: a[-1], stacked)
        else:
            for i in range(self.depth - 1):
                x = constrain_rows(apply(params[f"{self.prefix}_{i}"], x))
            last = params[f"{self.prefix}_{self.depth - 1}"]
        top = read.order.shape[1]

        def at(r: int):
            def run(x):
                out = apply(last, x, read.order[:, :r])  # [B, r, D]
                return jnp.pad(out, ((0, 0), (0, top - r), (0, 0)))
            return run

        return constrain_rows(switch_on_count(read.count, read.rungs, at, x))
