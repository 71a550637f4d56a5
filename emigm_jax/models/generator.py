"""MaskedGenerator: one model for MaskGIT, MAR, MDM and eMIGM, chosen by config switches.

The model takes no time input: it computes p(x0^i | x_t) through two halves exposed as
separate methods so each can be tested, converted and compared on its own:

  * ``transformer(tokens, mask, labels)`` -> z [B, N, D], the per-token condition;
  * ``head(x_t, t, z)`` -> [M, 2C] (diffusion head: eps | variance value), or
    ``logits(z)`` -> [..., K] (categorical head).

Labels < 0 mean "unconditional": the class condition is then the fake-class vector, which is
the mask token itself in ``cfg_mode='mask_token'`` (eMIGM's "CFG with mask": one parameter,
stored once) or a separate learned vector ``fake_latent`` in ``cfg_mode='fake_class'``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emigm_jax.models.categorical_head import CategoricalHead
from emigm_jax.models.diffusion_head import SimpleMLPAdaLN, TimestepEmbedder
from emigm_jax.models.mae import MaskedTransformer, embed_init


class DiffLoss(SimpleMLPAdaLN):
    """Holds the head network under ``diffloss/net`` (the reference's module path); same
    fields as the network it holds."""

    @nn.compact
    def __call__(self, x, t, z):
        return SimpleMLPAdaLN(self.in_channels, self.width, self.depth, self.dtype,
                              name="net")(x, t, z)


class MaskedGenerator(nn.Module):
    """Built by ``emigm_jax.models.build_model(config)``; fields mirror ``config.model``."""

    seq_len: int
    token_dim: int
    width: int
    enc_depth: int
    dec_depth: int
    num_heads: int
    num_classes: int
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    arch: str = "mae"
    head_type: str = "diffusion"
    cfg_mode: str = "mask_token"
    head_depth: int = 3
    head_width: int = 1024
    vocab_size: int = 0
    encoder_capacity: int = 0
    encoder_ladder: tuple[int, ...] = ()  # see MaskedTransformer
    single_reference_semantics: bool = False
    block: str = "vit"
    qk_norm: bool = False
    post_norm: bool = False
    pos_emb: str = "learned"
    head_mlp: bool = True
    time_cond: str = "none"  # none (implicit-time model, eMIGM) | explicit (DI's ETM)
    remat: bool = False
    scan_layers: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        d = self.width
        self.class_emb = nn.Embed(self.num_classes, d, embedding_init=embed_init,
                                  param_dtype=jnp.float32, name="class_emb")
        self.mask_token = self.param("mask_token", embed_init, (1, d), jnp.float32)
        if self.cfg_mode == "fake_class":
            self.fake_latent = self.param("fake_latent", embed_init, (1, d), jnp.float32)
        self.backbone = MaskedTransformer(
            seq_len=self.seq_len, width=d, enc_depth=self.enc_depth, dec_depth=self.dec_depth,
            num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, buffer_size=self.buffer_size,
            attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout, arch=self.arch,
            encoder_capacity=self.encoder_capacity, encoder_ladder=self.encoder_ladder,
            single_reference_semantics=self.single_reference_semantics,
            vocab_size=self.vocab_size if self.head_type == "categorical" else 0,
            block=self.block, qk_norm=self.qk_norm, post_norm=self.post_norm,
            pos_emb=self.pos_emb, remat=self.remat, scan_layers=self.scan_layers,
            dtype=self.dtype)
        if self.time_cond == "explicit":
            self.time_embed = TimestepEmbedder(d, dtype=self.dtype, name="time_embed")
        if self.head_type == "diffusion":
            self.diffloss = DiffLoss(self.token_dim, self.head_width, self.head_depth, self.dtype)
        else:
            self.cat_head = CategoricalHead(self.vocab_size, self.head_mlp,
                                            self.block != "llama", self.dtype)

    def fake_class(self) -> jax.Array:
        """The unconditional class vector [1, D]."""
        return self.mask_token if self.cfg_mode == "mask_token" else self.fake_latent

    def class_condition(self, labels: jax.Array) -> jax.Array:
        """labels [B] int (negative = unconditional) -> [B, D]."""
        emb = self.class_emb(jnp.clip(labels, 0, self.num_classes - 1))
        return jnp.where((labels < 0)[:, None], self.fake_class(), emb)

    def transformer(self, tokens, mask, labels, deterministic: bool = True, t=None, read=None):
        """tokens [B, N, C] (or [B, N] ids), mask [B, N] bool (True = masked), labels [B] -> z [B, N, D].

        ``t`` [B] (masking time in [0, 1]) is used only with ``time_cond='explicit'``: its
        sinusoidal embedding (of 1000 t) is added to the class condition tokens. ``read``
        (``transformer.ReadRows`` over token positions; inference): z comes back in read
        order and the last decoder block only computes the rows read.
        """
        cond = self.class_condition(labels)
        if self.time_cond == "explicit":
            if t is None:
                raise ValueError("model.time_cond='explicit' needs the time t [B] as input")
            cond = cond + self.time_embed(1000.0 * jnp.broadcast_to(t, labels.shape)).astype(cond.dtype)
        return self.backbone(tokens, mask, cond, self.mask_token, deterministic, read)

    def head(self, x_t, t, z):
        """Diffusion head: x_t [M, C], t [M] (discrete timestep, float), z [M, D] -> [M, 2C]."""
        return self.diffloss(x_t, t, z)

    def logits(self, z):
        """Categorical head: z [..., D] -> logits [..., K] (float32)."""
        return self.cat_head(z)

    def __call__(self, tokens, mask, labels, deterministic: bool = True, t=None):
        """Initialises every parameter (both halves); returns z."""
        if self.time_cond == "explicit" and t is None:
            t = jnp.ones(labels.shape, jnp.float32)
        z = self.transformer(tokens, mask, labels, deterministic, t)
        if self.head_type == "diffusion":
            flat = z.reshape(-1, z.shape[-1])
            self.head(jnp.zeros((flat.shape[0], self.token_dim), jnp.float32),
                      jnp.zeros((flat.shape[0],), jnp.float32), flat)
        else:
            self.logits(z)
        return z
