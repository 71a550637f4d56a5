"""ARGenerator: a class-conditional causal transformer over raster-order tokens (``model.arch='ar'``).

MaskGIL's AR-prefix sampling (MaskGIL paper, Sec. 4.4 and Table 5) needs an autoregressive
model in the same framework: LlamaGen's recipe (LlamaGen paper, Sec. 2) built from this
project's blocks. The input sequence is [class, x_0, ..., x_{N-2}]; the output at sequence
index i is the distribution of raster token x_i, so one causal pass gives every next-token
prediction (teacher forcing) and decoding needs exactly N single-token passes.

Positions: with ``pos_emb='rope2d'`` the input token x_j (sequence index j + 1) rotates with
its own grid cell (row j // side, column j % side), as in LlamaGen's 2-D RoPE; the class token
is not rotated (``rope_prefix='identity'``) or, as in LlamaGen's released code, multiplied by
cos = sin = 0, which zeroes its query and key (``rope_prefix='zero'``). ``rope_pairing`` and
``norm_eps`` select the channel pairing and norm epsilon (see ``transformer``); LlamaGen's
checkpoints need ``interleaved``, ``zero`` and 1e-5 (``configs/llamagen_sizes.py``). With
``pos_emb='learned'`` one learned vector per sequence index is added.
Labels < 0 mean "unconditional" (the learned ``fake_latent``, classifier-free guidance).

Decoding keeps one ``KVCache`` per block (``init_cache``) as an explicit pytree that
``decode`` takes and returns: pure functions, no mutable collections.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emigm_jax.models.mae import embed_init
from emigm_jax.models.transformer import (LN_EPS, BlockStack, KVCache, RopeTable, block_norm,
                                          dense, rope2d_angles)

ROPE_PREFIXES = ("identity", "zero")


class ARGenerator(nn.Module):
    """Built by ``emigm_jax.models.build_model`` for ``model.arch='ar'``."""

    seq_len: int
    width: int
    depth: int
    num_heads: int
    num_classes: int
    vocab_size: int
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    block: str = "llama"
    qk_norm: bool = False
    post_norm: bool = False
    pos_emb: str = "rope2d"
    norm_eps: float = LN_EPS
    rope_pairing: str = "half"
    rope_prefix: str = "identity"
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        if self.rope_prefix not in ROPE_PREFIXES:
            raise ValueError(f"rope_prefix={self.rope_prefix!r} is not one of {ROPE_PREFIXES}")
        d = self.width
        self.token_emb = nn.Embed(self.vocab_size, d, embedding_init=embed_init,
                                  param_dtype=jnp.float32, dtype=self.dtype, name="token_emb")
        self.class_emb = nn.Embed(self.num_classes, d, embedding_init=embed_init,
                                  param_dtype=jnp.float32, name="class_emb")
        self.fake_latent = self.param("fake_latent", embed_init, (1, d), jnp.float32)
        if self.pos_emb == "learned":
            self.pos_embed = self.param("pos_embed", embed_init, (1, self.seq_len, d),
                                        jnp.float32)
        self.blocks = BlockStack(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                 attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout,
                                 dtype=self.dtype, kind=self.block, qk_norm=self.qk_norm,
                                 post_norm=self.post_norm, causal=True, depth=self.depth,
                                 remat=self.remat, prefix="block", norm_eps=self.norm_eps,
                                 rope_pairing=self.rope_pairing)
        self.norm = block_norm(self.block, "norm", self.dtype, self.norm_eps)
        self.out = dense(self.vocab_size, "out", self.dtype, self.block != "llama")

    def class_condition(self, labels: jax.Array) -> jax.Array:
        """labels [B] int (negative = unconditional) -> [B, D]."""
        emb = self.class_emb(jnp.clip(labels, 0, self.num_classes - 1))
        return jnp.where((labels < 0)[:, None], self.fake_latent, emb)

    def rope(self, index, length: int):
        """RoPE-2D angles [1, length, hd/2] for sequence indices index..index+length-1."""
        side = int(round(self.seq_len ** 0.5))
        cell = index + jnp.arange(length) - 1  # sequence index i holds token x_{i-1}
        rows = jnp.where(cell >= 0, cell // side, -1)
        cols = jnp.where(cell >= 0, cell % side, -1)
        return rope2d_angles(rows, cols, self.width // self.num_heads)[None]

    def _positions(self, x, index):
        """Adds learned positions, or returns the RoPE input (angles or a RopeTable,
        [B, L, hd/2]) for x [B, L, D] starting at sequence index ``index``."""
        b, l, _ = x.shape
        if self.pos_emb == "learned":
            pos = jax.lax.dynamic_slice_in_dim(self.pos_embed, index, l, axis=1)
            return x + pos.astype(x.dtype), None
        shape = (b, l, self.width // self.num_heads // 2)
        angles = self.rope(index, l)  # [1, L, hd/2]
        if self.rope_prefix == "identity":
            return x, jnp.broadcast_to(angles, shape)
        real = (index + jnp.arange(l) >= 1)[None, :, None]  # not the class position
        return x, RopeTable(jnp.broadcast_to(jnp.where(real, jnp.cos(angles), 0.0), shape),
                            jnp.broadcast_to(jnp.where(real, jnp.sin(angles), 0.0), shape))

    def _head(self, x):
        return self.out(self.norm(x)).astype(jnp.float32)

    def __call__(self, tokens, labels, deterministic: bool = True):
        """Teacher forcing: tokens [B, L] int (L <= N), labels [B] -> logits [B, L, V] (float32).

        logits[:, i] is the prediction of tokens[:, i] from the class and tokens[:, :i]
        (a prefix L < N gives the first L predictions; the last input token is unused).
        """
        if not 1 <= tokens.shape[1] <= self.seq_len:
            raise ValueError(f"got {tokens.shape[1]} tokens per image, model expects "
                             f"1..seq_len={self.seq_len}")
        cond = self.class_condition(labels).astype(self.dtype)[:, None]  # [B, 1, D]
        x = jnp.concatenate([cond, self.token_emb(tokens[:, :-1])], axis=1)  # [B, N, D]
        x, rope = self._positions(x, 0)
        x = self.blocks(x, None, deterministic, rope)
        return self._head(x)

    def decode(self, prev_token, labels, index, caches):
        """One step: the logits [B, V] of x_index given the cache of indices < index.

        prev_token [B] int is x_{index-1} (ignored at index 0, where the input is the class);
        caches: ``init_cache``'s tuple of KVCache. Returns (logits [B, V], updated caches).
        """
        cond = self.class_condition(labels).astype(self.dtype)  # [B, D]
        emb = self.token_emb(jnp.clip(prev_token, 0, self.vocab_size - 1))  # [B, D]
        x = jnp.where(index == 0, cond, emb)[:, None]  # [B, 1, D]
        x, rope = self._positions(x, index)
        x, caches = self.blocks(x, None, True, rope, caches, index)
        return self._head(x)[:, 0], caches


def init_cache(model: ARGenerator, batch: int) -> tuple:
    """Zero keys/values for every block: a tuple of KVCache, each [B, N, H, hd]."""
    hd = model.width // model.num_heads
    shape = (batch, model.seq_len, model.num_heads, hd)
    return tuple(KVCache(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
                 for _ in range(model.depth))
