"""The unified masked-generation loss (paper eq. 7) for every head and switch combination.

  L = E_t [ w(t) * sum_{i masked} -log p_theta(x0^i | x_t) ] / normaliser

The per-token term is the head's own objective: the iDDPM hybrid loss (eps MSE + VLB on the
learned variance) for the diffusion head, cross-entropy for the categorical head. The
normaliser is the number of masked tokens in the batch (``mask.loss_norm='masked'``, the
reference code) or the token count B*N (``'tokens'``, the unbiased Monte-Carlo estimate of
eq. 7 with one t per sample).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from emigm_jax.diffusion import gaussian
from emigm_jax.masking import sample_mask
from emigm_jax.models import build_model
from emigm_jax.models.categorical_head import cross_entropy
from emigm_jax.schedules import schedule_from_config


@functools.lru_cache(maxsize=8)
def train_diffusion(num_steps: int):
    """The head's training diffusion: cosine betas, ``num_steps`` steps, no respacing."""
    return gaussian.create_diffusion(None, "cosine", num_steps)


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float) -> jax.Array:
    """Replaces each label by -1 (unconditional) with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    return jnp.where(jax.random.uniform(rng, labels.shape) < prob, -1, labels)


def diffusion_token_loss(model, params, x0, z, rng, batch_mul: int, num_steps: int):
    """Per-token iDDPM hybrid loss averaged over ``batch_mul`` independent (t, noise) draws.

    x0: [B, N, C] targets, z: [B, N, D] conditions -> (loss, mse, vb), each [B, N].
    """
    b, n, c = x0.shape
    x = jnp.tile(x0.reshape(b * n, c), (batch_mul, 1))  # [mul*B*N, C]
    zz = jnp.tile(z.reshape(b * n, -1), (batch_mul, 1))
    rng_t, rng_e = jax.random.split(rng)
    t = jax.random.randint(rng_t, (x.shape[0],), 0, num_steps)
    noise = jax.random.normal(rng_e, x.shape, jnp.float32)

    def model_fn(x_t, t_in):
        return model.apply({"params": params}, x_t, t_in.astype(jnp.float32), zz, method="head")

    terms = train_diffusion(num_steps).training_losses(model_fn, x, t, noise)
    return tuple(terms[k].reshape(batch_mul, b, n).mean(axis=0) for k in ("loss", "mse", "vb"))


def loss_fn(params, batch, rng: jax.Array, config, train: bool = True):
    """Eq. 7 on one batch. batch: {'tokens': [B, N, C] float or [B, N] int, 'label': [B] int}.

    Returns (loss scalar, metrics dict of scalars).
    """
    if config.model.arch == "ar":
        return next_token_loss(params, batch, rng, config, train)
    model = build_model(config)
    tokens, labels = batch["tokens"], batch["label"]
    b, n = tokens.shape[:2]
    rng_mask, rng_drop, rng_dropout, rng_head = jax.random.split(rng, 4)
    schedule = schedule_from_config(config.mask)
    draw = sample_mask(rng_mask, b, n, config.mask, schedule)
    if train:
        labels = drop_labels(rng_drop, labels, config.model.label_drop_prob)
    z = model.apply({"params": params}, tokens, draw.mask, labels, deterministic=not train,
                    t=draw.p, rngs={"dropout": rng_dropout}, method="transformer")
    z = z.astype(jnp.float32)

    metrics = {}
    if config.model.head == "diffusion":
        per_token, mse, vb = diffusion_token_loss(
            model, params, tokens.astype(jnp.float32), z, rng_head,
            config.model.diffusion_batch_mul, config.model.num_diffusion_steps)
    else:
        logits = model.apply({"params": params}, z, method="logits")
        per_token = cross_entropy(logits, tokens, config.train.label_smoothing)

    maskf = draw.mask.astype(jnp.float32)
    weight = schedule.weight(draw.p, config.mask.weight)[:, None]  # [B, 1]
    if config.mask.loss_norm == "masked":
        denom = jnp.maximum(maskf.sum(), 1.0)
    else:
        denom = jnp.float32(b * n)
    loss = jnp.sum(per_token * weight * maskf) / denom

    masked_mean = lambda v: jnp.sum(v * maskf) / jnp.maximum(maskf.sum(), 1.0)
    metrics["loss"] = loss
    metrics["mask_ratio"] = jnp.mean(maskf)
    metrics["t"] = jnp.mean(draw.p)
    metrics["token_loss"] = masked_mean(per_token)
    if config.model.head == "diffusion":
        metrics["mse"] = masked_mean(mse)
        metrics["vb"] = masked_mean(vb)
    return loss, metrics


def next_token_loss(params, batch, rng: jax.Array, config, train: bool = True):
    """The autoregressive model's loss (``model.arch='ar'``): mean next-token cross-entropy.

    L = -1/(B N) sum_{b, i} log p_theta(x_i | class, x_<i), one causal pass (teacher
    forcing); the class is dropped with ``model.label_drop_prob`` for CFG, as for eq. 7.
    """
    tokens, labels = batch["tokens"], batch["label"]
    rng_drop, rng_dropout = jax.random.split(rng)
    if train:
        labels = drop_labels(rng_drop, labels, config.model.label_drop_prob)
    logits = build_model(config).apply({"params": params}, tokens, labels,
                                       deterministic=not train, rngs={"dropout": rng_dropout})
    per_token = cross_entropy(logits, tokens, config.train.label_smoothing)  # [B, N]
    loss = jnp.mean(per_token)
    hit = jnp.argmax(logits, axis=-1) == tokens
    return loss, {"loss": loss, "token_loss": jnp.mean(cross_entropy(logits, tokens)),
                  "token_accuracy": jnp.mean(hit.astype(jnp.float32))}
