"""Tokenizer weights: (Tokenizer, variables) from ``config.tokenizer``.

The registry (``emigm_jax.tokenizers``) builds the networks; the converters here fill them
from official checkpoints (or converted .msgpack files), so the networks never import the
converters.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from emigm_jax.convert.dcae import load_dcae
from emigm_jax.convert.sdvq import load_sdvq
from emigm_jax.convert.vae import load_kl_vae
from emigm_jax.convert.vq import load_vq
from emigm_jax.tokenizers.registry import WEIGHT_FILES, Tokenizer, build_tokenizer


def load_tokenizer_variables(tok: Tokenizer, path: str) -> dict:
    """Converted Flax variables from an official checkpoint (or a converted .msgpack)."""
    if tok.name == "kl16":
        return load_kl_vae(path, tok.arch)
    if tok.name in ("vq", "vq8"):
        return load_vq(path, tok.arch)
    if tok.name == "sdvq_f8":
        return load_sdvq(path, tok.arch)
    return load_dcae(path, tok.arch)[0]


def tokenizer_from_config(config, *, dtype: Any = None) -> tuple[Tokenizer, dict]:
    """(Tokenizer, variables) from ``config.tokenizer``.

    Fields: name, path (weights), scale; optional ``arch`` (dict of architecture overrides),
    ``random_init`` (bool: random weights when path is empty — tests/smoke runs only),
    ``dtype`` ('float32' | 'bfloat16').
    """
    t = config.tokenizer
    dtype = dtype or jnp.dtype(t.get("dtype", "float32"))
    tok = build_tokenizer(t.name, scale=t.get("scale", None), arch=t.get("arch", None), dtype=dtype)
    path = t.get("path", "")
    if path:
        return tok, load_tokenizer_variables(tok, path)
    if t.get("random_init", False):
        return tok, tok.random_variables(int(t.get("seed", 0)))
    raise ValueError(
        f"config.tokenizer.path is empty: point it at the {t.name} weights "
        f"({WEIGHT_FILES[t.name]}), or set tokenizer.random_init=True for a random-weight test run")
