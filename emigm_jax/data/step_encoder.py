"""Image batches encoded to tokens inside the train step (sources that yield images)."""
from __future__ import annotations

from typing import Any, Callable

import jax

from emigm_jax import sharding as shd
from emigm_jax.convert.tokenizers import tokenizer_from_config
from emigm_jax.models import seq_len, token_dim

IMAGE_SOURCES = ("folder", "tfds")  # pipelines that yield images, encoded in the step
PrepareFn = Callable[[Any, Any, jax.Array], Any]  # (aux, batch, rng) -> batch with 'tokens'


def image_encoder(config, mesh) -> tuple[PrepareFn, Any]:
    """(prepare_batch, tokenizer variables on the mesh) for image sources (folder, tfds).

    Images are encoded to tokens inside the train step with the frozen tokenizer of
    ``config.tokenizer`` (KL-16: a fresh posterior sample each step). Caching latents once
    (``emigm_jax.data.cache_latents``, ``data.source='cached'``) is much cheaper for
    multi-epoch training; this path is for quick runs and new datasets.
    """

    tok, variables = tokenizer_from_config(config)
    grid = tok.latent_shape(int(config.data.image_size))
    n, c = grid[0] * grid[1], grid[2]
    # a codebook tokenizer yields one id per position: only the token count must match
    if n != seq_len(config) or (not tok.discrete and c != token_dim(config)):
        raise ValueError(
            f"tokenizer {tok.name} turns {config.data.image_size}px images into {n} tokens of "
            f"{c} channels, but the model expects {seq_len(config)} x {token_dim(config)} "
            f"(model.image_size/latent_stride/patch_size/latent_channels)")
    variables = jax.device_put(variables, shd.replicated(mesh))

    def prepare(aux, batch, rng):
        return {"tokens": tok.images_to_tokens(aux, batch["image"], rng),
                "label": batch["label"]}
    return prepare, variables
