"""DC-AE (deep compression autoencoder) in Flax, laid out like diffusers' ``AutoencoderDC``.

The paper's 512px tokenizer is ``dc-ae-f32c32-in-1.0`` (stride 32, 32 latent channels,
deterministic). Its block layout, from efficientvit's ``dc_ae_f32c32`` and diffusers'
conversion config:

  widths (128, 256, 512, 512, 1024, 1024); encoder depths (0, 4, 8, 2, 2, 2); decoder depths
  (0, 5, 10, 2, 2, 2); stages 0-2 ResBlocks, 3-5 EfficientViT blocks (ReLU linear attention,
  head dim 32, no multi-scale qkv branches, then a GLU MBConv); encoder norms RMSNorm + SiLU;
  decoder stages 0-2 BatchNorm + ReLU, 3-5 RMSNorm + SiLU; pixel-unshuffle downsampling and
  pixel-shuffle upsampling with space-to-channel averaging / channel-duplicating shortcuts;
  depth 0 in stage 0 makes the first/last layer a stride-2 (un)shuffle conv; output RMSNorm +
  ReLU in the decoder.

`DCAEConfig` carries diffusers' ``config.json`` fields (`DCAEConfig.from_diffusers_config`), so
other released DC-AEs (e.g. the SANA f32c32 with multi-scale qkv, conv downsampling and
interpolation upsampling) also build. Parameter names follow diffusers' module tree with list
indices folded into names (``encoder.down_blocks.3.1.attn.to_q`` ->
``encoder/down_blocks_3_1/attn/to_q``), so `emigm_jax.convert.dcae` is a renaming.

Layout NHWC, images in [-1, 1]. BatchNorm is inference-only (running statistics, collection
``batch_stats``). Attention and norms compute in float32 whatever ``dtype`` is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[str, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (0, 4, 8, 2, 2, 2)
    decoder_layers_per_block: tuple[int, ...] = (0, 5, 10, 2, 2, 2)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),) * 6
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((),) * 6
    upsample_block_type: str = "pixel_shuffle"      # pixel_shuffle | interpolate
    downsample_block_type: str = "pixel_unshuffle"  # pixel_unshuffle | conv
    decoder_norm_types: tuple[str, ...] = ("batch_norm",) * 3 + ("rms_norm",) * 3
    decoder_act_fns: tuple[str, ...] = ("relu",) * 3 + ("silu",) * 3
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0  # diffusers field; eMIGM's scale lives in config.tokenizer.scale

    def __post_init__(self):
        n = len(self.encoder_block_out_channels)
        for name in ("encoder_block_types", "encoder_layers_per_block", "encoder_qkv_multiscales"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"DCAEConfig.{name} has {len(getattr(self, name))} entries, "
                                 f"expected {n} (one per encoder stage)")
        m = len(self.decoder_block_out_channels)
        for name in ("decoder_block_types", "decoder_layers_per_block", "decoder_qkv_multiscales",
                     "decoder_norm_types", "decoder_act_fns"):
            if len(getattr(self, name)) != m:
                raise ValueError(f"DCAEConfig.{name} has {len(getattr(self, name))} entries, "
                                 f"expected {m} (one per decoder stage)")
        if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
            raise ValueError(f"upsample_block_type={self.upsample_block_type!r}: expected "
                             "'pixel_shuffle' or 'interpolate'")
        if self.downsample_block_type not in ("pixel_unshuffle", "conv"):
            raise ValueError(f"downsample_block_type={self.downsample_block_type!r}: expected "
                             "'pixel_unshuffle' or 'conv'")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> "DCAEConfig":
        """From a diffusers ``config.json`` dict (string fields broadcast to every stage)."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        if "block_out_channels" in d:  # older diffusers name for both
            d.setdefault("encoder_block_out_channels", d["block_out_channels"])
            d.setdefault("decoder_block_out_channels", d.pop("block_out_channels"))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown DC-AE config fields {unknown}; known: {sorted(fields)}")
        n_enc = len(d.get("encoder_block_out_channels", cls.encoder_block_out_channels))
        n_dec = len(d.get("decoder_block_out_channels", cls.decoder_block_out_channels))
        out = {}
        for k, v in d.items():
            n = n_dec if k.startswith("decoder") else n_enc
            if k in ("encoder_block_types", "decoder_block_types", "decoder_norm_types",
                     "decoder_act_fns") and isinstance(v, str):
                v = (v,) * n
            if k.endswith("qkv_multiscales"):
                v = tuple(tuple(s) for s in v)
            elif isinstance(v, list):
                v = tuple(v)
            out[k] = v
        return cls(**out)


DC_AE_F32C32_IN = DCAEConfig()

_ACTS = {"relu": nn.relu, "silu": nn.silu, "swish": nn.silu, "relu6": nn.relu6,
         "gelu": lambda x: nn.gelu(x, approximate=False), "identity": lambda x: x}


def _act(name: str):
    if name not in _ACTS:
        raise ValueError(f"activation {name!r} not supported; expected one of {sorted(_ACTS)}")
    return _ACTS[name]


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """[B, H*r, W*r, C] -> [B, H, W, C*r*r], channel order c*r*r + i*r + j (torch's)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """Inverse of `pixel_unshuffle`: [B, H, W, C*r*r] -> [B, H*r, W*r, C]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


class RMSNorm(nn.Module):
    """RMS norm over channels with scale and bias (diffusers RMSNorm, eps 1e-5)."""
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale + bias).astype(self.dtype)


def _norm(kind: str, name: str, dtype):
    if kind == "rms_norm":
        return RMSNorm(dtype=dtype, name=name)
    if kind == "batch_norm":
        return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype,
                            use_fast_variance=False, name=name)
    raise ValueError(f"norm type {kind!r} not supported; expected 'rms_norm' or 'batch_norm'")


def _conv(features, k, name, dtype, precision, stride=1, groups=1, bias=True):
    return nn.Conv(features, (k, k), strides=(stride, stride),
                   padding=((k // 2, k // 2), (k // 2, k // 2)), feature_group_count=groups,
                   use_bias=bias, name=name, dtype=dtype, precision=precision)


class ResBlock(nn.Module):
    """conv3x3(+b) -> act -> conv3x3(no b) -> norm, plus identity."""
    norm_type: str
    act: str
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = _act(self.act)(_conv(c, 3, "conv1", self.dtype, self.precision)(x))
        h = _conv(c, 3, "conv2", self.dtype, self.precision, bias=False)(h)
        return _norm(self.norm_type, "norm", self.dtype)(h) + x


class LinearAttention(nn.Module):
    """Multi-scale ReLU linear attention (SANA/EfficientViT ``LiteMLA``), with residual.

    Heads are formed after concatenating [q | k | v] along channels and cutting the result
    into groups of 3*d consecutive channels (each group's thirds are that head's q, k, v), as
    the released models do.
    """
    head_dim: int
    norm_type: str
    scales: tuple[int, ...] = ()
    eps: float = 1e-15
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):  # [B, H, W, C]
        b, hh, ww, c = x.shape
        d, pr, dt = self.head_dim, self.precision, self.dtype
        heads = c // d
        inner = heads * d
        dense = lambda n, name: nn.Dense(n, use_bias=False, name=name, dtype=dt, precision=pr)
        qkv = jnp.concatenate([dense(inner, "to_q")(x), dense(inner, "to_k")(x),
                               dense(inner, "to_v")(x)], axis=-1)      # [B, H, W, 3*inner]
        branches = [qkv]
        for i, k in enumerate(self.scales):
            branches.append(_MultiscaleProjection(k, heads, dt, pr,
                                                  name=f"to_qkv_multiscale_{i}")(qkv))
        qkv = jnp.concatenate(branches, axis=-1).astype(jnp.float32)
        qkv = qkv.reshape(b, hh * ww, -1, 3 * d)                       # [B, N, G, 3d]
        q, k, v = nn.relu(qkv[..., :d]), nn.relu(qkv[..., d:2 * d]), qkv[..., 2 * d:]
        kv = jnp.einsum("bngd,bnge->bgde", k, v, precision=pr)         # [B, G, d, d]
        num = jnp.einsum("bngd,bgde->bnge", q, kv, precision=pr)       # [B, N, G, d]
        den = jnp.einsum("bngd,bgd->bng", q, k.sum(axis=1), precision=pr)
        out = (num / (den[..., None] + self.eps)).reshape(b, hh, ww, -1).astype(dt)
        out = dense(c, "to_out")(out)
        return _norm(self.norm_type, "norm_out", dt)(out) + x


class _MultiscaleProjection(nn.Module):
    kernel_size: int
    heads: int
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = _conv(c, self.kernel_size, "proj_in", self.dtype, self.precision, groups=c, bias=False)(x)
        return nn.Conv(c, (1, 1), feature_group_count=3 * self.heads, use_bias=False,
                       name="proj_out", dtype=self.dtype, precision=self.precision)(x)


class GLUMBConv(nn.Module):
    """1x1 expand (x4, doubled for the gate) -> SiLU -> depthwise 3x3 -> GLU -> 1x1 -> RMSNorm, + x."""
    expand_ratio: float = 4.0
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        hidden = int(self.expand_ratio * c)
        dt, pr = self.dtype, self.precision
        h = nn.silu(_conv(2 * hidden, 1, "conv_inverted", dt, pr)(x))
        h = _conv(2 * hidden, 3, "conv_depth", dt, pr, groups=2 * hidden)(h)
        h, gate = jnp.split(h, 2, axis=-1)
        h = _conv(c, 1, "conv_point", dt, pr, bias=False)(h * nn.silu(gate))
        return RMSNorm(dtype=dt, name="norm")(h) + x


class EfficientViTBlock(nn.Module):
    head_dim: int
    norm_type: str
    scales: tuple[int, ...] = ()
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = LinearAttention(self.head_dim, self.norm_type, self.scales, dtype=self.dtype,
                            precision=self.precision, name="attn")(x)
        return GLUMBConv(dtype=self.dtype, precision=self.precision, name="conv_out")(x)


class DownBlock(nn.Module):
    """Stride-2 conv (or conv + pixel-unshuffle), plus an unshuffle-and-average shortcut."""
    out_channels: int
    pixel_unshuffle: bool
    shortcut: bool
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        cin, cout = x.shape[-1], self.out_channels
        if self.pixel_unshuffle:
            if cout % 4:
                raise ValueError(f"pixel-unshuffle downsampling needs out_channels % 4 == 0, got {cout}")
            y = pixel_unshuffle(_conv(cout // 4, 3, "conv", self.dtype, self.precision)(x), 2)
        else:
            y = _conv(cout, 3, "conv", self.dtype, self.precision, stride=2)(x)
        if self.shortcut:
            s = pixel_unshuffle(x, 2)
            group = cin * 4 // cout
            s = s.reshape(*s.shape[:-1], cout, group).mean(axis=-1)
            y = y + s
        return y


class UpBlock(nn.Module):
    """Conv + pixel-shuffle (or nearest x2 + conv), plus a channel-duplicating shortcut."""
    out_channels: int
    interpolate: bool
    shortcut: bool
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        cin, cout = x.shape[-1], self.out_channels
        if self.interpolate:
            y = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            y = _conv(cout, 3, "conv", self.dtype, self.precision)(y)
        else:
            y = pixel_shuffle(_conv(cout * 4, 3, "conv", self.dtype, self.precision)(x), 2)
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, cout * 4 // cin, axis=-1), 2)
        return y


def _block(kind: str, cfg: DCAEConfig, norm: str, act: str, scales, dtype, precision, name):
    if kind == "ResBlock":
        return ResBlock(norm, act, dtype, precision, name=name)
    if kind in ("EfficientViTBlock", "EViT_GLU", "EViTS5_GLU"):
        return EfficientViTBlock(cfg.attention_head_dim, norm, tuple(scales), dtype, precision,
                                 name=name)
    raise ValueError(f"DC-AE block type {kind!r} not supported; expected 'ResBlock' or "
                     "'EfficientViTBlock'")


class DCEncoder(nn.Module):
    cfg: DCAEConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):  # [B, H, W, 3] -> [B, H/32, W/32, latent]
        c, dt, pr = self.cfg, self.dtype, self.precision
        widths, depths = c.encoder_block_out_channels, c.encoder_layers_per_block
        unshuffle = c.downsample_block_type == "pixel_unshuffle"
        if depths[0] > 0:
            x = _conv(widths[0], 3, "conv_in", dt, pr)(x)
        else:
            x = DownBlock(widths[1], unshuffle, False, dt, pr, name="conv_in")(x)
        n = len(widths)
        for i, (w, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                x = _block(c.encoder_block_types[i], c, "rms_norm", "silu",
                           c.encoder_qkv_multiscales[i], dt, pr, f"down_blocks_{i}_{j}")(x)
            if i < n - 1 and depth > 0:
                x = DownBlock(widths[i + 1], unshuffle, True, dt, pr, name=f"down_blocks_{i}_{depth}")(x)
        y = _conv(c.latent_channels, 3, "conv_out", dt, pr)(x)
        if c.encoder_out_shortcut:
            group = widths[-1] // c.latent_channels
            y = y + x.reshape(*x.shape[:-1], c.latent_channels, group).mean(axis=-1)
        return y


class DCDecoder(nn.Module):
    cfg: DCAEConfig
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, z):  # [B, h, w, latent] -> [B, 32h, 32w, 3]
        c, dt, pr = self.cfg, self.dtype, self.precision
        widths, depths = c.decoder_block_out_channels, c.decoder_layers_per_block
        interp = c.upsample_block_type == "interpolate"
        x = _conv(widths[-1], 3, "conv_in", dt, pr)(z)
        if c.decoder_in_shortcut:
            x = x + jnp.repeat(z, widths[-1] // c.latent_channels, axis=-1).astype(x.dtype)
        n = len(widths)
        for i in reversed(range(n)):
            j = 0
            if i < n - 1 and depths[i] > 0:
                x = UpBlock(widths[i], interp, True, dt, pr, name=f"up_blocks_{i}_0")(x)
                j = 1
            for _ in range(depths[i]):
                x = _block(c.decoder_block_types[i], c, c.decoder_norm_types[i], c.decoder_act_fns[i],
                           c.decoder_qkv_multiscales[i], dt, pr, f"up_blocks_{i}_{j}")(x)
                j += 1
        x = _act(c.decoder_conv_act_fn)(RMSNorm(dtype=dt, name="norm_out")(x))
        if depths[0] > 0:
            return _conv(c.in_channels, 3, "conv_out", dt, pr)(x)
        return UpBlock(c.in_channels, interp, False, dt, pr, name="conv_out")(x)


class AutoencoderDC(nn.Module):
    """Deterministic DC-AE: ``encode`` -> latent (unscaled), ``decode`` -> image."""
    cfg: DCAEConfig = DC_AE_F32C32_IN
    dtype: Any = jnp.float32
    precision: Any = None

    def setup(self):
        self.encoder = DCEncoder(self.cfg, self.dtype, self.precision)
        self.decoder = DCDecoder(self.cfg, self.dtype, self.precision)

    def encode(self, x):  # [B, H, W, 3] -> [B, H/s, W/s, C] float32
        return self.encoder(x).astype(jnp.float32)

    def decode(self, z):  # [B, h, w, C] -> [B, h*s, w*s, 3]
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))
