"""Autoregressive sampling for ``model.arch='ar'``: one ``lax.scan`` over raster positions.

Step i draws token x_i from the model's next-token logits with classifier-free guidance
(LlamaGen's l_u + w (l_c - l_u), ``sample.cfg_scale`` at every step; the unconditional rows
use label -1), then ``sample.temperature`` / ``top_k`` / ``top_p`` through the masked
sampler's ``filter_logits`` and a Gumbel-max draw.

``cached=True`` (the default) decodes with a KV cache: each step is one single-token pass
(``ARGenerator.decode``), O(N) passes of one token for the whole image. ``cached=False``
recomputes the full causal pass at every step (O(N^2) token work); it exists as the
reference the cached path must match token for token (same key -> same Gumbel noise).

Randomness: step i uses key i of ``split(fold_in(rng, AR_STREAM), num_tokens)``; the tag
keeps these keys apart from the masked sampler's, which draws from ``rng`` itself, so the AR
prefix and the masked completion of ``sample.ar_prefix`` can share one key.

NFE = forward passes per image = num_tokens (x 2 with guidance: the unconditional rows are a
second pass), counted by the scan and predicted by ``expected_ar_nfe``.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp

from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.models import build_model, seq_len
from emigm_jax.models.ar import init_cache
from emigm_jax.sampling.draws import filter_logits, gumbel_from_uniform

AR_STREAM = 0xA7  # fold_in tag of the AR sampler's key stream


def is_guided(sample_cfg) -> bool:
    return float(sample_cfg.cfg_scale) != 1.0


def expected_ar_nfe(sample_cfg, num_tokens: int) -> int:
    """Forward passes per image for ``num_tokens`` AR steps."""
    return num_tokens * (2 if is_guided(sample_cfg) else 1)


def ar_step_keys(rng: jax.Array, num_tokens: int) -> jax.Array:
    """[num_tokens] keys, one per raster position."""
    return jax.random.split(jax.random.fold_in(rng, AR_STREAM), num_tokens)


def draw_tokens(logits: jax.Array, key: jax.Array, sample_cfg, batch: int) -> jax.Array:
    """logits [B or 2B, V] (conditional rows first) -> tokens [B] int32 (CFG, filters, Gumbel)."""
    w = float(sample_cfg.cfg_scale)
    if is_guided(sample_cfg):
        lc, lu = logits[:batch], logits[batch:]
        logits = lu + w * (lc - lu)
    filtered = filter_logits(logits, float(sample_cfg.temperature), int(sample_cfg.top_k),
                             float(sample_cfg.top_p))
    v = filtered.shape[-1]
    u = jax.random.uniform(key, (batch * v,), jnp.float32).reshape(batch, v)
    return jnp.argmax(filtered + gumbel_from_uniform(u), axis=-1).astype(jnp.int32)


def _build(config, num_tokens: int, cached: bool):
    validate_config(config)
    if config.model.arch != "ar":
        raise ConfigError(f"config.model.arch={config.model.arch!r} is invalid for the AR "
                          f"sampler: expected 'ar'")
    n = seq_len(config)
    if not 0 <= num_tokens <= n:
        raise ConfigError(f"AR sampling of {num_tokens} tokens is invalid: expected 0..{n}")
    model, sc = build_model(config), config.sample
    guided = is_guided(sc)
    pair = lambda x: jnp.concatenate([x, x]) if guided else x

    def step(carry, xs, params, labels):
        tokens, prev, caches, nfe = carry
        i, key = xs
        if cached:
            logits, caches = model.apply({"params": params}, pair(prev), labels, i, caches,
                                         method="decode")
        else:
            full = model.apply({"params": params}, pair(tokens), labels)  # [B', N, V]
            logits = jax.lax.dynamic_index_in_dim(full, i, axis=1, keepdims=False)
        tok = draw_tokens(logits, key, sc, tokens.shape[0])  # [B]
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, i, axis=1)
        return (tokens, tok, caches, nfe + 1 + int(guided)), None

    def sampler(params, labels, rng):
        b = labels.shape[0]
        both = jnp.concatenate([labels, -jnp.ones_like(labels)]) if guided else labels
        caches = init_cache(model, both.shape[0]) if cached else ()
        carry = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), jnp.int32), caches,
                 jnp.int32(0))
        xs = (jnp.arange(num_tokens, dtype=jnp.int32), ar_step_keys(rng, num_tokens))
        (tokens, _, _, nfe), _ = jax.lax.scan(
            lambda c, x: step(c, x, params, both), carry, xs)
        return tokens, {"nfe": nfe}

    return sampler


_SAMPLERS: dict[Any, Any] = {}


def make_ar_sampler(config, num_tokens: int | None = None, cached: bool = True):
    """jitted ``(params, labels [B], rng) -> (tokens [B, N] int32, info)`` (cached per config).

    Only the first ``num_tokens`` raster positions are drawn (default: all N); the others
    are 0 in the output.
    """
    num_tokens = seq_len(config) if num_tokens is None else int(num_tokens)
    key = (json.dumps({"model": config.model.to_dict(), "sample": config.sample.to_dict()},
                      sort_keys=True, default=str), num_tokens, cached)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = jax.jit(_build(config, num_tokens, cached))
    return _SAMPLERS[key]


def sample(params, labels: jax.Array, rng: jax.Array, config, num_tokens: int | None = None,
           cached: bool = True):
    """Samples raster tokens for ``labels`` [B] (-1 = unconditional): (tokens [B, N], info)."""
    return make_ar_sampler(config, num_tokens, cached)(params, labels, rng)
