"""One interface over the image tokenizers: images <-> "moments" <-> tokens [B, N, C].

Why "moments": the latent cache stores what the tokenizer's encoder determines, before any
randomness — KL-16's posterior (mean, logvar), K = 2; DC-AE's deterministic latent, K = 1 —
as an array [B, K, h, w, C]. Tokens are derived from moments by `moments_to_tokens`
(sample z = mean + std * eps for KL, take the latent for DC-AE, multiply by ``scale``, flatten
the h x w grid in raster order), identically on device (JAX) and on host (numpy, see
`emigm_jax.data.latent_dataset`).

Names: ``kl16`` (MAR's KL-16, scale 0.2325), ``dcae_f32c32`` (DC-AE f32c32-in-1.0, scale
0.3189) and ``vq`` (LlamaGen VQ-16, discrete: K = 0, "moments" are the code ids
[B, 1, h, w, 1] and tokens are int32 ids [B, N]); ``vq8`` is LlamaGen's VQ-8 (same codebook,
stride 8); ``sdvq_f8`` is latent-diffusion's VQ-f8 (16,384 x 4 codebook, plain L2, stride 8:
Discrete Interpolants' tokens). ``arch`` overrides architecture fields
(tiny test models with the same code).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax.tokenizers.dcae import DC_AE_F32C32_IN, AutoencoderDC, DCAEConfig
from emigm_jax.tokenizers.sdvq import SD_VQ_F8, SDVQConfig, SDVQModel
from emigm_jax.tokenizers.vae import (KL16, AutoencoderKL, KLVAEConfig, abstract_variables,
                                      sample_posterior)
from emigm_jax.tokenizers.vq import VQ8, VQ16, VQConfig, VQModel, token_grid

DEFAULT_SCALES = {"kl16": 0.2325, "dcae_f32c32": 0.3189, "vq": 1.0, "vq8": 1.0, "sdvq_f8": 1.0}
TOKENIZER_NAMES = tuple(DEFAULT_SCALES)
WEIGHT_FILES = {"kl16": "kl16.ckpt from MAR",
                "dcae_f32c32": "the dc-ae-f32c32-in-1.0-diffusers directory",
                "vq": "LlamaGen's vq_ds16_c2i.pt", "vq8": "LlamaGen's vq_ds8_c2i.pt",
                "sdvq_f8": "latent-diffusion's vq-f8 model.ckpt"}


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A Flax autoencoder plus how its latents become tokens.

    num_moments: K, 2 for a Gaussian posterior (mean, logvar), 1 for a deterministic latent,
    0 for a discrete codebook (tokens are ids).
    """
    name: str
    module: Any          # AutoencoderKL | AutoencoderDC | VQModel | SDVQModel
    arch: Any            # KLVAEConfig | DCAEConfig | VQConfig | SDVQConfig
    scale: float
    num_moments: int

    @property
    def stride(self) -> int:
        return self.arch.stride

    @property
    def channels(self) -> int:
        if self.num_moments == 0:
            return 1
        return self.arch.embed_dim if self.num_moments == 2 else self.arch.latent_channels

    @property
    def discrete(self) -> bool:
        return self.num_moments == 0

    @property
    def stochastic(self) -> bool:
        return self.num_moments == 2

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.stride:
            raise ValueError(f"image size {image_size} is not a multiple of the {self.name} "
                             f"stride {self.stride}")
        g = image_size // self.stride
        return g, g, self.channels

    def variable_shapes(self, image_size: int | None = None):
        return abstract_variables(self.module, image_size or self.stride)

    def random_variables(self, seed: int = 0) -> dict:
        """Random weights for tests and benchmarks (real use loads converted weights).

        Filled with numpy over the abstract shapes rather than by ``module.init``, which
        compiles every initializer and takes tens of seconds for these conv stacks. Kernels
        ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.05^2), biases ~ N(0, 0.02^2), BatchNorm
        statistics mean ~ N(0, 0.05^2), var ~ U(0.5, 1.5).
        """
        rng = np.random.default_rng(seed)

        def fill(path, leaf):
            names = [getattr(p, "key", str(p)) for p in path]
            shape, name = leaf.shape, names[-1]
            if names[0] == "batch_stats":
                a = rng.uniform(0.5, 1.5, shape) if name == "var" else 0.05 * rng.standard_normal(shape)
            elif name == "kernel":
                a = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
            elif name == "scale":
                a = 1.0 + 0.05 * rng.standard_normal(shape)
            else:
                a = 0.02 * rng.standard_normal(shape)
            return a.astype(leaf.dtype)
        return jax.tree_util.tree_map_with_path(fill, self.variable_shapes())

    def encode_moments(self, variables, images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] -> moments [B, K, h, w, C] float32."""
        if self.num_moments == 0:
            ids = self.module.apply(variables, images, method="encode")  # [B, h*w]
            g = int(round(ids.shape[1] ** 0.5))
            return ids.reshape(ids.shape[0], 1, g, g, 1)
        if self.num_moments == 2:
            mean, logvar = self.module.apply(variables, images, method=AutoencoderKL.encode)
            return jnp.stack([mean, logvar], axis=1)
        z = self.module.apply(variables, images, method=AutoencoderDC.encode)
        return z[:, None]

    def moments_to_tokens(self, moments: jax.Array, rng: jax.Array | None) -> jax.Array:
        """[B, K, h, w, C] -> scaled tokens [B, h*w, C] (raster order); ids [B, h*w] for vq."""
        if self.num_moments == 0:
            return moments.reshape(moments.shape[0], -1).astype(jnp.int32)
        if self.num_moments == 2:
            if rng is None:
                raise ValueError(f"{self.name} latents are stochastic: pass an rng")
            z = sample_posterior(moments[:, 0], moments[:, 1], rng)
        else:
            z = moments[:, 0]
        b, h, w, c = z.shape
        return (z * self.scale).reshape(b, h * w, c)

    def images_to_tokens(self, variables, images: jax.Array, rng: jax.Array | None) -> jax.Array:
        """uint8 [B, H, W, 3] or float in [-1, 1] -> tokens [B, N, C] (on-the-fly training)."""
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 127.5 - 1.0
        return self.moments_to_tokens(self.encode_moments(variables, images), rng)

    def decode_tokens(self, variables, tokens: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """Scaled tokens [B, N, C] (ids [B, N] for vq) -> images [B, H, W, 3] (roughly [-1, 1])."""
        if self.num_moments == 0:
            return self.module.apply(variables, tokens, grid, method="decode")
        b, n, c = tokens.shape
        h, w = token_grid(n, grid)
        z = (tokens / self.scale).reshape(b, h, w, c)
        method = AutoencoderKL.decode if self.num_moments == 2 else AutoencoderDC.decode
        return self.module.apply(variables, z, method=method)


def _to_plain(value):
    """ConfigDict/list overrides -> hashable tuples for the frozen arch dataclasses."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_to_plain(v) for v in value)
    return value


def build_tokenizer(name: str, *, scale: float | None = None, arch: Mapping | None = None,
                    dtype: Any = jnp.float32, precision: Any = None) -> Tokenizer:
    """A `Tokenizer` by registry name; ``arch`` overrides architecture fields."""
    if name not in DEFAULT_SCALES:
        raise ValueError(f"unknown tokenizer {name!r}: expected one of {TOKENIZER_NAMES}")
    scale = DEFAULT_SCALES[name] if scale is None else float(scale)
    overrides = _to_plain(arch or {})
    base, cls, module_cls, k = {
        "kl16": (KL16, KLVAEConfig, AutoencoderKL, 2),
        "dcae_f32c32": (DC_AE_F32C32_IN, DCAEConfig, AutoencoderDC, 1),
        "vq": (VQ16, VQConfig, VQModel, 0),
        "vq8": (VQ8, VQConfig, VQModel, 0),
        "sdvq_f8": (SD_VQ_F8, SDVQConfig, SDVQModel, 0),
    }[name]
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"tokenizer.arch fields {bad} do not exist for {name}; known: {sorted(known)}")
    cfg = dataclasses.replace(base, **overrides)
    return Tokenizer(name, module_cls(cfg, dtype=dtype, precision=precision), cfg, scale, k)


# numpy twin of `Tokenizer.moments_to_tokens` for host-side input pipelines.
def moments_to_tokens_np(moments: np.ndarray, scale: float, noise: np.ndarray | None) -> np.ndarray:
    """[K, h, w, C] -> [h*w, C] float32; ``noise`` ~ N(0, 1) of shape [h, w, C] when K == 2."""
    moments = np.asarray(moments, np.float32)
    if moments.shape[0] == 2:
        if noise is None:
            raise ValueError("stochastic (K=2) moments need noise")
        z = moments[0] + np.exp(0.5 * moments[1]) * noise
    elif moments.shape[0] == 1:
        z = moments[0]
    else:
        raise ValueError(f"moments must have K in (1, 2) on axis 0, got shape {moments.shape}")
    h, w, c = z.shape
    return (z * np.float32(scale)).reshape(h * w, c).astype(np.float32)

