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

from emigm_jax.buckets import gather_rows, keep_first_order, put_rows, switch_on_count
from emigm_jax.diffusion import gaussian
from emigm_jax.masking import MaskDraw, sample_mask
from emigm_jax.models import DTYPES, build_model, loss_ladder
from emigm_jax.models.categorical_head import cross_entropy
from emigm_jax.schedules import schedule_from_config
from emigm_jax.sharding import constrain_rows, gather_weights


@functools.lru_cache(maxsize=8)
def train_diffusion(num_steps: int):
    """The head's training diffusion: cosine betas, ``num_steps`` steps, no respacing."""
    return gaussian.create_diffusion(None, "cosine", num_steps)


def drop_labels(rng: jax.Array, labels: jax.Array, prob: float) -> jax.Array:
    """Replaces each label by -1 (unconditional) with probability ``prob`` (CFG training)."""
    if prob <= 0:
        return labels
    return jnp.where(jax.random.uniform(rng, labels.shape) < prob, -1, labels)


def diffusion_token_loss(model, params, x0, z, rng, batch_mul: int, num_steps: int,
                         mask=None, rungs: tuple[int, ...] = ()):
    """Per-token iDDPM hybrid loss averaged over ``batch_mul`` independent (t, noise) draws.

    x0: [B, N, C] targets, z: [B, N, D] conditions -> (loss, mse, vb), each [B, N].

    With ``mask`` [B, N] (True = masked) and row ``rungs`` (sizes per sample, last = N), the
    head runs only on the smallest rung holding the batch's largest masked count: masked
    positions are gathered first, and positions the head skipped get 0 (every caller weights
    them by the mask). The (t, noise) of each (draw, position) is the same as without rungs,
    so the loss and its gradients are the same.
    """
    b, n, c = x0.shape
    rng_t, rng_e = jax.random.split(rng)
    t = jax.random.randint(rng_t, (batch_mul * b * n,), 0, num_steps).reshape(batch_mul, b, n)
    noise = jax.random.normal(rng_e, (batch_mul * b * n, c), jnp.float32)
    noise = noise.reshape(batch_mul, b, n, c)
    process = train_diffusion(num_steps)

    def rows_loss(x_r, z_r, t_r, noise_r):
        """x_r [B, R, C], z_r [B, R, D], t_r [mul, B, R], noise_r [mul, B, R, C] -> 3 x [B, R]."""
        # Token-major rows (row i = token i // mul): with the batch split over devices each
        # image's rows stay on its device; the (t, noise) of every (draw, token) is unchanged.
        r = x_r.shape[1]
        zz = constrain_rows(jnp.repeat(z_r.reshape(b * r, -1), batch_mul, axis=0))  # [B*R*mul, D]
        x_rows = constrain_rows(jnp.repeat(x_r.reshape(b * r, c), batch_mul, axis=0))
        t_rows = jnp.moveaxis(t_r, 0, -1).reshape(-1)  # [B*R*mul]
        noise_rows = jnp.moveaxis(noise_r, 0, 2).reshape(-1, c)  # [B*R*mul, C]

        def model_fn(x_t, t_in):
            return model.apply({"params": params}, x_t, t_in.astype(jnp.float32), zz,
                               method="head")

        terms = process.training_losses(model_fn, x_rows, t_rows, noise_rows)
        return tuple(terms[k].reshape(b, r, batch_mul).mean(axis=-1) for k in ("loss", "mse", "vb"))

    if mask is None or tuple(rungs) in ((), (n,)):
        return rows_loss(x0, z, t, noise)
    order = keep_first_order(mask)  # [B, N]: masked positions first

    def branch(cap):
        def run(x0, z, t, noise):
            idx = order[:, :cap]  # [B, cap]
            take_m = jax.vmap(gather_rows, in_axes=(0, None))  # over the batch_mul draws
            parts = rows_loss(gather_rows(x0, idx), gather_rows(z, idx), take_m(t, idx),
                              take_m(noise, idx))
            return tuple(put_rows(jnp.zeros((b, n), v.dtype), idx, v) for v in parts)
        return run

    need = jnp.max(jnp.sum(mask, axis=1))
    return switch_on_count(need, rungs, branch, x0, z, t, noise)


def training_mask(rng: jax.Array, batch: int, n: int, config) -> MaskDraw:
    """The mask ``loss_fn`` draws from its key ``rng`` for a batch of ``batch`` sequences.

    The host makes the same draw from the same key (``emigm_jax.step_dispatch.StepDispatch``) to learn
    the step's visible and masked counts before it dispatches the step.
    """
    return sample_mask(jax.random.split(rng, 4)[0], batch, n, config.mask)


def loss_fn(params, batch, rng: jax.Array, config, train: bool = True):
    """Eq. 7 on one batch. batch: {'tokens': [B, N, C] float or [B, N] int, 'label': [B] int},
    optionally with the step's mask already drawn ('mask': [B, N] bool, 'mask_p': [B] float,
    as ``training_mask`` draws them from ``rng``).

    Returns (loss scalar, metrics dict of scalars).
    """
    if config.model.arch == "ar":
        return next_token_loss(params, batch, rng, config, train)
    model = build_model(config)
    params = gather_weights(params, skip_blocks=True, dtype=DTYPES[config.model.dtype])
    tokens, labels = batch["tokens"], batch["label"]
    b, n = tokens.shape[:2]
    _, rng_drop, rng_dropout, rng_head = jax.random.split(rng, 4)
    schedule = schedule_from_config(config.mask)
    if "mask" in batch:
        draw = MaskDraw(mask=batch["mask"], p=batch["mask_p"], ratio=schedule.gamma(batch["mask_p"]))
    else:
        draw = training_mask(rng, b, n, config)
    if train:
        labels = drop_labels(rng_drop, labels, config.model.label_drop_prob)
    z = model.apply({"params": params}, tokens, draw.mask, labels, deterministic=not train,
                    t=draw.p, rngs={"dropout": rng_dropout}, method="transformer")
    z = z.astype(jnp.float32)

    if config.model.head == "diffusion":
        per_token, mse, vb = diffusion_token_loss(
            model, params, tokens.astype(jnp.float32), z, rng_head,
            config.model.diffusion_batch_mul, config.model.num_diffusion_steps, draw.mask,
            loss_ladder(config))
    else:
        logits = model.apply({"params": params}, z, method="logits")
        per_token = cross_entropy(logits, tokens, config.train.label_smoothing)

    maskf = draw.mask.astype(jnp.float32)
    num_masked = jnp.maximum(maskf.sum(), 1.0)
    weight = schedule.weight(draw.p, config.mask.weight)[:, None]  # [B, 1]
    denom = num_masked if config.mask.loss_norm == "masked" else jnp.float32(b * n)
    loss = jnp.sum(per_token * weight * maskf) / denom

    masked_mean = lambda v: jnp.sum(v * maskf) / num_masked
    metrics = {"loss": loss, "mask_ratio": jnp.mean(maskf), "t": jnp.mean(draw.p),
               "token_loss": masked_mean(per_token)}
    if config.model.head == "diffusion":
        metrics.update(mse=masked_mean(mse), vb=masked_mean(vb))
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
