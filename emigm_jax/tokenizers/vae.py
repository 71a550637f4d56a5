"""KL-regularised VAE (LDM AutoencoderKL) in Flax, laid out like MAR's `models/vae.py`.

MAR's KL-16 tokenizer (the paper's 256px tokenizer): ch=128, ch_mult=(1, 1, 2, 2, 4), two
ResNet blocks per level, self-attention after each encoder block of the last level (MAR's
encoder keeps LDM's default ``attn_resolutions=(16,)`` with ``resolution=256``, i.e. level 4)
and in both mid blocks, no attention in the decoder's up path, z_channels = embed_dim = 16,
stride 2^4 = 16. The posterior is a diagonal Gaussian from ``quant_conv`` (2*16 channels).

Parameter names mirror the torch module tree so that the converter
(`emigm_jax.convert.vae`) is a pure renaming: ``encoder.down.4.attn.1.q.weight`` is
``params/encoder/down_4/attn_1/q/kernel``. Layout is NHWC; images are in [-1, 1].

Attention placement follows MAR: it depends on the *level* (via ``resolution`` and
``attn_resolutions``, as in LDM), not on the actual input size, so a 64px input runs the same
network as a 256px one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM DiagonalGaussianDistribution clamp


@dataclasses.dataclass(frozen=True)
class KLVAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)          # encoder (MAR/LDM default)
    decoder_attn_resolutions: tuple[int, ...] = ()     # MAR's decoder: mid block only
    resolution: int = 256                              # only locates attention levels
    in_channels: int = 3
    out_ch: int = 3
    embed_dim: int = 16                                # = z_channels in MAR
    double_z: bool = True                              # encoder emits 2 x z (mean | logvar)
    num_groups: int = 32
    norm_eps: float = 1e-6

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def z_channels(self) -> int:  # the encoder's output channels
        return (2 if self.double_z else 1) * self.embed_dim

    def encoder_levels(self) -> tuple[tuple[int, bool], ...]:
        """(channel multiplier, attention) per level, level 0 at full resolution: LDM places
        attention by the level's resolution (``resolution`` halved per level)."""
        return tuple((m, self.resolution // 2 ** i in self.attn_resolutions)
                     for i, m in enumerate(self.ch_mult))

    def decoder_levels(self) -> tuple[tuple[int, bool], ...]:
        """As ``encoder_levels``; LDM's decoder doubles up from the lowest resolution."""
        n = len(self.ch_mult)
        low = self.resolution // 2 ** (n - 1)
        return tuple((m, low * 2 ** (n - 1 - i) in self.decoder_attn_resolutions)
                     for i, m in enumerate(self.ch_mult))


KL16 = KLVAEConfig()


def abstract_variables(module: nn.Module, size: int, channels: int = 3) -> Any:
    """``module``'s variables (shapes and dtypes) from an init on one [1, size, size,
    channels] image, without allocating or compiling (``jax.eval_shape``)."""
    image = jnp.zeros((1, size, size, channels), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), image))


def conv2d(features: int, k: int, name: str, dtype, precision, stride: int = 1,
          padding=None) -> nn.Conv:
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=padding, name=name,
                   dtype=dtype, precision=precision)


def group_norm(cfg: KLVAEConfig, name: str, dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=cfg.num_groups, epsilon=cfg.norm_eps, dtype=dtype,
                        use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    cfg: KLVAEConfig
    out_ch: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):  # [B, H, W, Cin] -> [B, H, W, out_ch]
        c, dt, pr = self.cfg, self.dtype, self.precision
        h = nn.swish(group_norm(c, "norm1", dt)(x))
        h = conv2d(self.out_ch, 3, "conv1", dt, pr)(h)
        h = nn.swish(group_norm(c, "norm2", dt)(h))
        h = conv2d(self.out_ch, 3, "conv2", dt, pr)(h)
        if x.shape[-1] != self.out_ch:
            x = conv2d(self.out_ch, 1, "nin_shortcut", dt, pr)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (LDM AttnBlock)."""
    cfg: KLVAEConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        b, hh, ww, c = x.shape
        dt, pr = self.dtype, self.precision
        h = group_norm(self.cfg, "norm", dt)(x)
        q = conv2d(c, 1, "q", dt, pr)(h).reshape(b, hh * ww, c)
        k = conv2d(c, 1, "k", dt, pr)(h).reshape(b, hh * ww, c)
        v = conv2d(c, 1, "v", dt, pr)(h).reshape(b, hh * ww, c)
        w = jnp.einsum("bic,bjc->bij", q, k, precision=pr).astype(jnp.float32) * (c ** -0.5)
        w = jax.nn.softmax(w, axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", w, v, precision=pr).reshape(b, hh, ww, c)
        return x + conv2d(c, 1, "proj_out", dt, pr)(h)


class _Resample(nn.Module):
    """LDM Down/Upsample with conv: asymmetric (0, 1) pad + stride-2 conv, or nearest x2 + conv."""
    channels: int
    up: bool
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return conv2d(self.channels, 3, "conv", self.dtype, self.precision)(x)
        return conv2d(self.channels, 3, "conv", self.dtype, self.precision, stride=2,
                     padding=((0, 1), (0, 1)))(x)


class ResolutionLevel(nn.Module):
    """One resolution level: ``block_i`` (+ ``attn_i``) then an optional resampler."""
    cfg: KLVAEConfig
    out_ch: int
    num_blocks: int
    attn: bool
    resample: str | None  # None | "downsample" | "upsample"
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_blocks):
            x = ResnetBlock(self.cfg, self.out_ch, self.dtype, self.precision, name=f"block_{i}")(x)
            if self.attn:
                x = AttnBlock(self.cfg, self.dtype, self.precision, name=f"attn_{i}")(x)
        if self.resample is not None:
            x = _Resample(self.out_ch, self.resample == "upsample", self.dtype, self.precision,
                          name=self.resample)(x)
        return x


class MidBlock(nn.Module):
    cfg: KLVAEConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(self.cfg, c, self.dtype, self.precision, name="block_1")(x)
        x = AttnBlock(self.cfg, self.dtype, self.precision, name="attn_1")(x)
        return ResnetBlock(self.cfg, c, self.dtype, self.precision, name="block_2")(x)


class Encoder(nn.Module):
    """The LDM conv encoder; ``cfg.encoder_levels()`` lays out its levels (KL, SD-VQ, VQ)."""
    cfg: Any  # KLVAEConfig | VQConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> [B, H/s, W/s, z_channels]
        c, dt, pr = self.cfg, self.dtype, self.precision
        levels = c.encoder_levels()
        h = conv2d(c.ch, 3, "conv_in", dt, pr)(x)
        for i, (mult, attn) in enumerate(levels):
            last = i == len(levels) - 1
            h = ResolutionLevel(c, c.ch * mult, c.num_res_blocks, attn,
                                None if last else "downsample", dt, pr, name=f"down_{i}")(h)
        h = MidBlock(c, dt, pr, name="mid")(h)
        h = nn.swish(group_norm(c, "norm_out", dt)(h))
        return conv2d(c.z_channels, 3, "conv_out", dt, pr)(h)


class Decoder(nn.Module):
    """The LDM conv decoder (one block more per level); levels from ``cfg.decoder_levels()``."""
    cfg: Any  # KLVAEConfig | VQConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z):  # [B, h, w, z] -> [B, h*s, w*s, out_ch]
        c, dt, pr = self.cfg, self.dtype, self.precision
        levels = c.decoder_levels()
        h = conv2d(c.ch * levels[-1][0], 3, "conv_in", dt, pr)(z)
        h = MidBlock(c, dt, pr, name="mid")(h)
        for i in reversed(range(len(levels))):
            h = ResolutionLevel(c, c.ch * levels[i][0], c.num_res_blocks + 1, levels[i][1],
                                None if i == 0 else "upsample", dt, pr, name=f"up_{i}")(h)
        h = nn.swish(group_norm(c, "norm_out", dt)(h))
        return conv2d(c.out_ch, 3, "conv_out", dt, pr)(h)


class AutoencoderKL(nn.Module):
    """MAR's AutoencoderKL. ``encode`` -> (mean, logvar); ``decode`` -> image in ~[-1, 1]."""
    cfg: KLVAEConfig = KL16
    dtype: Any = jnp.float32
    precision: Any = None

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c, self.dtype, self.precision)
        self.decoder = Decoder(c, self.dtype, self.precision)
        self.quant_conv = conv2d(2 * c.embed_dim, 1, None, self.dtype, self.precision)
        self.post_quant_conv = conv2d(c.embed_dim, 1, None, self.dtype, self.precision)

    def moments(self, x):  # [B, H, W, 3] -> [B, h, w, 2E] (mean | raw logvar)
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        """[B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/16, W/16, E], float32."""
        m = self.moments(x).astype(jnp.float32)
        mean, logvar = jnp.split(m, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z):  # [B, h, w, E] (unscaled latent) -> [B, h*16, w*16, 3]
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x):  # reconstruction from the posterior mean; used for init
        mean, _ = self.encode(x)
        return self.decode(mean)


def sample_posterior(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) (logvar already clamped)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(q || N(0, I)) summed over latent dims: [B, h, w, E] -> [B]."""
    return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
