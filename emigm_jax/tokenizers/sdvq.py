"""SD-VQ-F8: the CompVis latent-diffusion VQ-f8 tokenizer (``vq-f8/model.ckpt``) in Flax.

Discrete Interpolants' ImageNet tokens (DI paper, Sec. 5: "VQ-F8 from Stable Diffusion",
16,384 codes; the model adds one [M] id). Architecture (latent-diffusion
``models/first_stage_models/vq-f8/config.yaml``, ``ldm.models.autoencoder.VQModel``): the LDM
conv Encoder/Decoder with ch 128, ch_mult (1, 2, 2, 4), two ResNet blocks per level (three in
the decoder), single-head attention at resolution 32 (the lowest level of a 256px input) in
both the encoder and the decoder plus the mid blocks, ``double_z=False`` and z_channels 4;
then ``quant_conv`` (1x1, 4 -> 4), a 16,384 x 4 codebook, ``post_quant_conv`` (1x1, 4 -> 4).
Stride 8: a 256px image is 32 x 32 = 1,024 tokens.

Quantisation is taming's ``VectorQuantizer2``: plain Euclidean nearest neighbour
(|z|^2 + |e|^2 - 2 z.e, first index on ties), no normalisation; decoding looks up the raw
row. The encoder/decoder are the KL VAE's modules (`emigm_jax.tokenizers.vae`: LDM's own
blocks, so names and the torch layout match one-to-one); the codebook search is LlamaGen VQ's
`nearest_code_ids` with ``l2_norm=False``. Token ids are raster order over (h, w).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp

from emigm_jax.tokenizers.vae import Decoder, Encoder, KLVAEConfig, abstract_variables, conv2d
from emigm_jax.tokenizers.vq import CodebookAutoencoder, VectorQuantizer


@dataclasses.dataclass(frozen=True)
class SDVQConfig(KLVAEConfig):
    """LDM VQModel: the KL VAE's encoder/decoder fields plus the codebook size."""
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    attn_resolutions: tuple[int, ...] = (32,)
    decoder_attn_resolutions: tuple[int, ...] = (32,)
    embed_dim: int = 4                 # z_channels = codebook vector size
    double_z: bool = False
    codebook_size: int = 16384

    def __post_init__(self):
        if self.codebook_size < 1 or self.embed_dim < 1:
            raise ValueError(f"SDVQConfig needs codebook_size >= 1 and embed_dim >= 1, got "
                             f"{self.codebook_size} and {self.embed_dim}")

    @property
    def codebook_embed_dim(self) -> int:  # read by VectorQuantizer
        return self.embed_dim

    @property
    def codebook_l2_norm(self) -> bool:  # taming's quantizer: plain L2, raw codebook
        return False

    @property
    def vocab_size(self) -> int:
        return self.codebook_size


SD_VQ_F8 = SDVQConfig()


class SDVQModel(CodebookAutoencoder):
    """latent-diffusion's VQModel (VQ-f8: raw L2 codebook, 8x downsampling); the methods are
    `emigm_jax.tokenizers.vq.CodebookAutoencoder`'s."""
    cfg: SDVQConfig = SD_VQ_F8
    dtype: Any = jnp.float32
    precision: Any = None
    chunk: int | None = 4096

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c, self.dtype, self.precision)
        self.decoder = Decoder(c, self.dtype, self.precision)
        self.quant_conv = conv2d(c.embed_dim, 1, None, self.dtype, self.precision)
        self.post_quant_conv = conv2d(c.embed_dim, 1, None, self.dtype, self.precision)
        self.quantize = VectorQuantizer(c, self.chunk)


@functools.lru_cache(maxsize=8)
def sdvq_variable_shapes(cfg: SDVQConfig = SD_VQ_F8) -> Any:
    """Abstract Flax variables of `SDVQModel(cfg)` (no allocation, no compilation)."""
    return abstract_variables(SDVQModel(cfg), cfg.stride, cfg.in_channels)
