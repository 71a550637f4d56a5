"""LlamaGen's VQ image tokenizers in Flax: VQ-16 (``vq_ds16_c2i.pt``, the MaskGIL configs) and
VQ-8 (``vq_ds8_c2i.pt``, the same model with ch_mult (1, 2, 2, 4): the Discrete Interpolants
configs' f8 tokens).

Architecture (LlamaGen ``tokenizer/tokenizer_image/vq_model.py``, ``VQ_16``): the taming/LDM
conv encoder-decoder (ch=128, ch_mult=(1, 1, 2, 2, 4), two ResNet blocks per encoder level and
three per decoder level, GroupNorm(32, eps 1e-6), swish), with single-head self-attention
after *every* ResNet block of the lowest-resolution level in both the encoder and the decoder
plus the usual mid block (res, attn, res); z_channels = 256, then ``quant_conv`` (1x1,
256 -> 8), a 16,384 x 8 codebook, ``post_quant_conv`` (1x1, 8 -> 256). Stride 16: a 256px
image is 16 x 16 = 256 tokens.

Quantisation is cosine nearest-neighbour (``codebook_l2_norm=True``): both the latent and the
codebook rows are l2-normalised (``F.normalize``: x / max(|x|, 1e-12)) and the id is
``argmin_k |z|^2 + |e_k|^2 - 2 z.e_k`` — the same formula, in float32, as LlamaGen, so ties
and near-ties resolve the same way (first index wins, like ``torch.argmin``). Decoding looks
up the *normalised* codebook row. Token ids come out in raster order (row-major over h, w),
matching LlamaGen's ``min_encoding_indices.reshape(B, -1)``.

The encoder and decoder are the KL-16 VAE's (`emigm_jax.tokenizers.vae`): the two
autoencoders share them exactly, only the attention placement (``VQConfig.encoder_levels``)
and the bottleneck differ. Flax names therefore follow the KL VAE tree
(``encoder/down_4/attn_1/q``, ``decoder/up_0/block_2``, ``encoder/mid/block_1``); the
converter (`emigm_jax.convert.vq`) renames LlamaGen's ``conv_blocks.<k>.res.<j>`` /
``mid.<0|1|2>`` keys onto it. Layout NHWC, images in [-1, 1]. Dropout (0 in VQ-16) is not
modelled: this is an inference tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from emigm_jax.tokenizers.vae import Decoder, Encoder, abstract_variables, conv2d

L2_EPS = 1e-12  # torch.nn.functional.normalize default


@dataclasses.dataclass(frozen=True)
class VQConfig:
    """LlamaGen ``ModelArgs`` + the Encoder/Decoder constructor defaults it relies on."""
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2          # encoder; the decoder uses num_res_blocks + 1
    z_channels: int = 256
    in_channels: int = 3
    out_channels: int = 3
    num_groups: int = 32             # GroupNorm groups (read by the shared vae blocks)
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.codebook_size < 1 or self.codebook_embed_dim < 1:
            raise ValueError(f"VQConfig needs codebook_size >= 1 and codebook_embed_dim >= 1, got "
                             f"{self.codebook_size} and {self.codebook_embed_dim}")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError(f"encoder_ch_mult {self.encoder_ch_mult} and decoder_ch_mult "
                             f"{self.decoder_ch_mult} must have the same number of levels "
                             "(encoder and decoder strides would differ)")
        widths = [self.ch * m for m in self.encoder_ch_mult + self.decoder_ch_mult]
        bad = sorted({w for w in widths if w % self.num_groups})
        if bad:
            raise ValueError(f"VQConfig channel widths {bad} are not multiples of "
                             f"num_groups={self.num_groups} (GroupNorm)")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    @property
    def out_ch(self) -> int:  # the name the shared decoder reads
        return self.out_channels

    def encoder_levels(self) -> tuple[tuple[int, bool], ...]:
        """(channel multiplier, attention) per level: attention at the lowest resolution."""
        return tuple((m, i == len(self.encoder_ch_mult) - 1)
                     for i, m in enumerate(self.encoder_ch_mult))

    def decoder_levels(self) -> tuple[tuple[int, bool], ...]:
        return tuple((m, i == len(self.decoder_ch_mult) - 1)
                     for i, m in enumerate(self.decoder_ch_mult))


VQ16 = VQConfig()  # LlamaGen VQ-16 (vq_ds16_c2i.pt): 16,384 codes, 8-dim, f16
# LlamaGen VQ-8 (vq_ds8_c2i.pt): one level fewer, f8 (a 256px image is 32 x 32 = 1024 tokens).
VQ8 = VQConfig(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4))


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``F.normalize(x, p=2, dim=axis)``: x / max(||x||, 1e-12)."""
    n = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(n, L2_EPS)


def prepare_codebook(embedding: jax.Array, l2_norm: bool = True) -> jax.Array:
    """Raw codebook [K, D] -> the vectors actually used for lookup and decoding (float32)."""
    e = embedding.astype(jnp.float32)
    return l2_normalize(e) if l2_norm else e


def nearest_code_ids(z: jax.Array, codebook: jax.Array, *, l2_norm: bool = True,
                     chunk: int | None = 4096) -> jax.Array:
    """Index of the nearest codebook row for every vector: z [..., D], codebook [K, D] -> [...] int32.

    ``codebook`` is the raw parameter (normalised here when ``l2_norm``). Distances use
    LlamaGen's expansion |z|^2 + |e|^2 - 2 z.e in float32 at full matmul precision (TPU's
    default bf16 passes would flip near-ties). ``chunk`` bounds memory: the [M, K] distance
    matrix is built ``chunk`` rows at a time (4096 x 16384 floats = 256 MiB); None = all at once.
    """
    d = codebook.shape[-1]
    if z.shape[-1] != d:
        raise ValueError(f"latent has {z.shape[-1]} channels but the codebook vectors have {d}")
    lead = z.shape[:-1]
    zf = z.reshape(-1, d).astype(jnp.float32)                        # [M, D]
    e = prepare_codebook(codebook, l2_norm)                          # [K, D]
    if l2_norm:
        zf = l2_normalize(zf)
    e_sq = jnp.sum(jnp.square(e), axis=-1)                           # [K]

    def ids_of(rows):                                                # [m, D] -> [m]
        dist = (jnp.sum(jnp.square(rows), axis=-1, keepdims=True) + e_sq
                - 2.0 * jnp.matmul(rows, e.T, precision=jax.lax.Precision.HIGHEST))
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    m = zf.shape[0]
    if chunk is None or m <= chunk:
        ids = ids_of(zf)
    else:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive row count or None, got {chunk}")
        ids = jax.lax.map(lambda r: ids_of(r[None])[0], zf, batch_size=chunk)
    return ids.reshape(lead)


def lookup_codes(ids: jax.Array, codebook: jax.Array, *, l2_norm: bool = True) -> jax.Array:
    """Token ids [...] -> (normalised) code vectors [..., D] float32 (LlamaGen get_codebook_entry)."""
    return jnp.take(prepare_codebook(codebook, l2_norm), ids, axis=0)


def _codebook_init(l2_norm: bool):
    """LlamaGen's init: U(-1/K, 1/K), rows l2-normalised when the codebook is (tests only)."""
    def init(key, shape, dtype=jnp.float32):
        e = jax.random.uniform(key, shape, jnp.float32, -1.0 / shape[0], 1.0 / shape[0])
        return (l2_normalize(e) if l2_norm else e).astype(dtype)
    return init


class VectorQuantizer(nn.Module):
    """Holds the codebook (param ``embedding`` [K, D], raw as stored by LlamaGen)."""
    cfg: VQConfig
    chunk: int | None = 4096

    def setup(self):
        c = self.cfg
        self.embedding = self.param("embedding", _codebook_init(c.codebook_l2_norm),
                                    (c.codebook_size, c.codebook_embed_dim), jnp.float32)

    def codebook(self) -> jax.Array:  # [K, D] float32, as used for lookup
        return prepare_codebook(self.embedding, self.cfg.codebook_l2_norm)

    def __call__(self, z):  # [..., D] -> ids [...] int32
        return nearest_code_ids(z, self.embedding, l2_norm=self.cfg.codebook_l2_norm,
                                chunk=self.chunk)

    def lookup(self, ids):  # [...] -> [..., D] float32
        return lookup_codes(ids, self.embedding, l2_norm=self.cfg.codebook_l2_norm)


def token_grid(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(h, w) of a raster token sequence; square unless ``grid`` says otherwise."""
    if grid is not None:
        h, w = (int(g) for g in grid)
        if h * w != num_tokens:
            raise ValueError(f"grid {grid} holds {h * w} tokens, but {num_tokens} were given")
        return h, w
    g = int(round(num_tokens ** 0.5))
    if g * g != num_tokens:
        raise ValueError(f"{num_tokens} tokens is not a square grid: pass grid=(h, w)")
    return g, g


class CodebookAutoencoder(nn.Module):
    """What every codebook tokenizer does with its parts: ``encode`` images [B, H, W, 3] in
    [-1, 1] -> ids [B, h*w] (raster order), ``decode`` ids -> images.

    Subclasses hold ``cfg`` (with ``codebook_embed_dim``) and build ``encoder``, ``decoder``,
    ``quant_conv``, ``post_quant_conv`` and ``quantize`` in ``setup``; the tokenizer registry
    treats them all alike.
    """

    def encode_latent(self, x):  # [B, H, W, 3] -> [B, H/s, W/s, D] float32, before quantisation
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def encode_with_latent(self, x):
        """Images -> (ids [B, h*w] int32, pre-quantisation latents [B, h, w, D] float32)."""
        z = self.encode_latent(x)
        b, h, w, _ = z.shape
        return self.quantize(z).reshape(b, h * w), z

    def encode(self, x):
        """Images [B, H, W, 3] in [-1, 1] -> token ids [B, (H/s)*(W/s)] int32, raster order."""
        return self.encode_with_latent(x)[0]

    def codes_to_latent(self, ids, grid: tuple[int, int] | None = None):
        """ids [B, N] -> quantised latents [B, h, w, D] (the codebook rows used for lookup)."""
        b, n = ids.shape
        h, w = token_grid(n, grid)
        return self.quantize.lookup(ids).reshape(b, h, w, self.cfg.codebook_embed_dim)

    def decode_latent(self, zq):  # [B, h, w, D] -> [B, h*s, w*s, 3] (roughly [-1, 1])
        return self.decoder(self.post_quant_conv(zq.astype(self.dtype)))

    def decode(self, ids, grid: tuple[int, int] | None = None):
        """Token ids [B, N] -> images [B, H, W, 3]; ``grid`` (h, w) for non-square N."""
        return self.decode_latent(self.codes_to_latent(ids, grid))

    def __call__(self, x):  # reconstruction through the codebook; used for init
        z = self.encode_latent(x)
        return self.decode_latent(self.quantize.lookup(self.quantize(z)))


class VQModel(CodebookAutoencoder):
    """LlamaGen VQModel (normalised codebook). ``chunk`` is the row chunk of the nearest-code
    search (see `nearest_code_ids`)."""
    cfg: VQConfig = VQ16
    dtype: Any = jnp.float32
    precision: Any = None
    chunk: int | None = 4096

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c, self.dtype, self.precision)
        self.decoder = Decoder(c, self.dtype, self.precision)
        self.quant_conv = conv2d(c.codebook_embed_dim, 1, None, self.dtype, self.precision)
        self.post_quant_conv = conv2d(c.z_channels, 1, None, self.dtype, self.precision)
        self.quantize = VectorQuantizer(c, self.chunk)


@functools.lru_cache(maxsize=8)
def vq_variable_shapes(cfg: VQConfig = VQ16) -> Any:
    """Abstract Flax variables of `VQModel(cfg)` (no allocation, no compilation; cached per cfg)."""
    return abstract_variables(VQModel(cfg), cfg.stride, cfg.in_channels)

