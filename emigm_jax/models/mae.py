"""eMIGM's transformer: the MAE encoder-decoder that maps (tokens, mask, class) to z.

Static shapes throughout: the encoder's token dropping is a stable sort that moves kept tokens
to the front of a fixed-capacity buffer, with dropped and padding slots excluded as attention
keys. With capacity L = buffer + N this is exactly the reference's dropping for any mask
(including per-sample counts, which the reference cannot express); a smaller capacity saves
encoder compute when the masking guarantees at least L - capacity dropped tokens.

Work-proportional encoder (``encoder_ladder``): a static ladder of capacities, one compiled
branch each; at run time ``nn.switch`` runs the smallest rung that holds buffer + the batch's
largest visible count. Every rung is exact for the masks it receives, so z equals the
full-capacity z; only the work shrinks with the visible count, as in the reference (which
runs its encoder on the buffers plus the visible tokens only, eMIGM paper Sec. 3).

Architecture switch ``arch``:
  * ``mae`` (paper default): encoder sees only unmasked tokens plus the 64 class buffers; the
    decoder scatters the encoder outputs back, fills masked slots with the mask token.
  * ``single`` (the paper's single-transformer alternative): every token goes through the
    encoder. Semantics chosen here (documented, tested): masked inputs are replaced by the mask
    token *before* the encoder position embedding, so a masked position still knows where it
    is; the decoder stack then runs on all positions unchanged. (The reference code's
    ``use_mae=False`` substitutes the mask token after position embedding and LayerNorm; set
    ``single_reference_semantics=True`` for that behaviour.)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from emigm_jax.buckets import gather_rows, keep_first_order, put_rows, rung_index
from emigm_jax.sharding import constrain_rows
from emigm_jax.models.transformer import BlockStack, ReadRows, block_norm, dense, rope2d_angles

embed_init = nn.initializers.normal(0.02)


class MaskedTransformer(nn.Module):
    """(tokens [B, N, C], mask [B, N] bool (True = masked), cond [B, D]) -> z [B, N, D]."""

    seq_len: int
    width: int
    enc_depth: int
    dec_depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    arch: str = "mae"
    encoder_capacity: int = 0  # 0 = buffer_size + seq_len (exact for every mask)
    encoder_ladder: tuple[int, ...] = ()  # capacity rungs, last = full; () = one capacity
    single_reference_semantics: bool = False
    vocab_size: int = 0  # > 0: discrete token ids in, embedded by a table instead of z_proj
    block: str = "vit"   # vit | llama
    qk_norm: bool = False
    post_norm: bool = False
    pos_emb: str = "learned"  # learned | rope2d
    remat: bool = False
    scan_layers: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        d, total = self.width, self.buffer_size + self.seq_len
        if self.vocab_size > 0:
            self.z_proj = nn.Embed(self.vocab_size, d, embedding_init=embed_init,
                                   param_dtype=jnp.float32, dtype=self.dtype, name="token_emb")
        else:
            self.z_proj = dense(d, "z_proj", self.dtype)
        learned = self.pos_emb == "learned"
        bias = self.block != "llama"
        self.z_proj_ln = block_norm(self.block, "z_proj_ln", self.dtype)
        if learned:
            self.encoder_pos_embed_learned = self.param(
                "encoder_pos_embed_learned", embed_init, (1, total, d), jnp.float32)
        stack = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                     attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout,
                     remat=self.remat, dtype=self.dtype, prefix="block", kind=self.block,
                     qk_norm=self.qk_norm, post_norm=self.post_norm, scan=self.scan_layers)
        self.encoder_blocks = BlockStack(depth=self.enc_depth, **stack)
        self.encoder_norm = block_norm(self.block, "encoder_norm", self.dtype)
        if self.dec_depth > 0:
            self.decoder_embed = dense(d, "decoder_embed", self.dtype, bias)
            if learned:
                self.decoder_pos_embed_learned = self.param(
                    "decoder_pos_embed_learned", embed_init, (1, total, d), jnp.float32)
            self.decoder_blocks = BlockStack(depth=self.dec_depth, **stack)
            self.decoder_norm = block_norm(self.block, "decoder_norm", self.dtype)
        if learned:
            self.diffusion_pos_embed_learned = self.param(
                "diffusion_pos_embed_learned", embed_init, (1, self.seq_len, d), jnp.float32)

    def _rope(self, b: int):
        """RoPE-2D angles [B, L, hd/2] for (buffers, image tokens in raster order)."""
        side = int(round(self.seq_len ** 0.5))
        idx = jnp.arange(self.seq_len)
        rows = jnp.concatenate([-jnp.ones((self.buffer_size,), jnp.int32), idx // side])
        cols = jnp.concatenate([-jnp.ones((self.buffer_size,), jnp.int32), idx % side])
        ang = rope2d_angles(rows, cols, self.width // self.num_heads)
        return jnp.broadcast_to(ang[None], (b,) + ang.shape)

    def __call__(self, tokens, mask, cond, mask_token, deterministic: bool = True,
                 read: ReadRows | None = None):
        # tokens: [B, N, C] float (or [B, N] int ids); mask: [B, N] bool; cond: [B, D];
        # mask_token: [1, D]; read: the token positions a caller reads (ReadRows over 0..N-1,
        # inference only) -> z [B, N, D] in read order, rows past read.count unspecified
        b, n = tokens.shape[:2]
        if n != self.seq_len:
            raise ValueError(f"got {n} tokens per image, model expects seq_len={self.seq_len}")
        nb = self.buffer_size
        dt = self.dtype
        mask_tok = mask_token.astype(dt).reshape(1, 1, -1)
        if self.vocab_size > 0:
            x = self.z_proj(jnp.clip(tokens, 0, self.vocab_size - 1))  # [B, N, D]
        else:
            x = self.z_proj(tokens.astype(dt))  # [B, N, D]
        if self.arch == "single" and not self.single_reference_semantics:
            x = jnp.where(mask[..., None], mask_tok, x)
        buffers = jnp.broadcast_to(cond.astype(dt)[:, None, :], (b, nb, self.width))
        x = jnp.concatenate([buffers, x], axis=1)  # [B, L, D]
        rope = None
        if self.pos_emb == "learned":
            x = x + self.encoder_pos_embed_learned.astype(dt)
        else:
            rope = self._rope(b)  # [B, L, hd/2]
        x = self.z_proj_ln(x)
        mask_full = jnp.concatenate([jnp.zeros((b, nb), bool), mask], axis=1)  # [B, L]
        keep = jnp.logical_not(mask_full)

        if self.arch == "mae":
            x = self._bucketed_encoder(x, keep, rope, deterministic)
            x = jnp.where(keep[..., None], x, mask_tok)
        else:
            if self.single_reference_semantics:
                x = jnp.where(mask_full[..., None], mask_tok, x)
            x = self.encoder_blocks(x, None, deterministic, rope)
            x = self.encoder_norm(x)
            if self.dec_depth == 0:
                z = self._finish(x)
                return z if read is None else gather_rows(z, read.order)
            x = self.decoder_embed(x)
        if self.pos_emb == "learned":
            x = x + self.decoder_pos_embed_learned.astype(dt)
        if read is None:
            return self._finish(self.decoder_norm(self.decoder_blocks(x, None, deterministic, rope)))
        x = self.decoder_blocks(x, None, deterministic, rope, read=read._replace(order=read.order + nb))
        return self._finish(self.decoder_norm(x), read.order)

    def encoder_rungs(self) -> tuple[int, ...]:
        """The encoder's capacity ladder; the last rung is the full (exact) capacity."""
        return self.encoder_ladder or (self.encoder_capacity or self.buffer_size + self.seq_len,)

    def _bucketed_encoder(self, x, keep, rope, deterministic: bool):
        """Encoder at the smallest capacity rung holding the batch's most kept slots.

        x: [B, L, D], keep: [B, L] bool -> decoder-embedded outputs scattered back [B, L, D]
        (dropped positions zero). Only the chosen rung's branch executes.
        """
        rungs = self.encoder_rungs()

        def branch(cap):
            return lambda mdl, x, keep, rope: mdl._encode_at(cap, x, keep, rope, deterministic)

        if len(rungs) == 1:
            return self._encode_at(rungs[0], x, keep, rope, deterministic)
        need = jnp.max(jnp.sum(keep, axis=1))
        return nn.switch(rung_index(need, rungs), [branch(r) for r in rungs], self, x, keep,
                         rope)

    def _encode_at(self, cap: int, x, keep, rope, deterministic: bool):
        """Kept tokens sorted into a [B, cap] buffer, encoded, scattered back to [B, L, D]."""
        b, total = keep.shape
        order = keep_first_order(keep)[:, :cap]  # [B, cap]
        x = gather_rows(x, order)  # [B, cap, D]
        valid = gather_rows(keep, order)  # [B, cap]
        rope_enc = None if rope is None else gather_rows(rope, order)
        x = self.encoder_blocks(x, valid, deterministic, rope_enc)
        x = self.decoder_embed(self.encoder_norm(x))
        # Scatter back: slot j of the sorted buffer goes to position order[j].
        pos = jnp.where(valid, order, total)  # invalid slots go to a dump row
        full = jnp.zeros((b, total + 1, self.width), x.dtype)
        return put_rows(full, pos, x)[:, :total]

    def _finish(self, x, positions=None):
        """Drops the buffer tokens, adds the head's position embedding: [B, L, D] -> [B, N, D];
        or, with ``positions`` [B, R], x [B, R, D] already holds those token positions."""
        if positions is None:
            x = constrain_rows(x[:, self.buffer_size:])
        if self.pos_emb == "learned":
            pos = self.diffusion_pos_embed_learned.astype(self.dtype)  # [1, N, D]
            if positions is not None:
                pos = jnp.take(pos[0], positions, axis=0)  # [B, R, D]
            x = x + pos
        return x
