"""MaskGIL's AR-prefix sampling (``sample.ar_prefix``): an AR model writes the first share of
the raster tokens, the masked model completes the rest (MaskGIL paper, Sec. 4.4, Table 5:
steps = share x N AR + the masked sampler's steps).

With share s the prefix is the first m = round(s N) raster positions, drawn by
`emigm_jax.sampling.ar` from the AR checkpoint (``sample.ar_workdir``, with that run's own
``sample`` settings); the masked sampler then starts from those m tokens committed and the
other N - m masked, and its reveal counts scale to the N - m masked tokens. Both halves take
the same ``rng`` (the AR sampler folds in its own stream tag), so share 0 is the masked
sampler and share 1 the AR sampler, bit for bit. NFE = AR passes + masked passes, predicted
by ``expected_prefix_nfe``.
"""
from __future__ import annotations

import json
import os

import jax

from emigm_jax.config_files import load_config
from emigm_jax.config_validation import ConfigError
from emigm_jax.models import seq_len
from emigm_jax.sampling import ar as ar_sampling
from emigm_jax.sampling import plan
from emigm_jax.sampling import sampler as masked


def prefix_length(config) -> int:
    """m = round(sample.ar_prefix * N) raster tokens from the AR model."""
    return plan.ar_prefix_length(config.sample, seq_len(config))


def check_pair(config, ar_config) -> None:
    """The AR model must write the masked model's tokens: same grid and vocabulary."""
    if ar_config.model.arch != "ar":
        raise ConfigError(f"sample.ar_workdir holds a model.arch={ar_config.model.arch!r} run: "
                          f"expected an 'ar' model")
    for field in ("vocab_size", "image_size", "latent_stride", "patch_size", "num_classes"):
        a, b = ar_config.model[field], config.model[field]
        if a != b:
            raise ConfigError(f"the AR model's model.{field}={a!r} differs from the masked "
                              f"model's {b!r}: the prefix tokens would not fit")


def expected_prefix_nfe(config, ar_config) -> int:
    """Forward passes per image: the AR steps (x 2 with AR guidance) + the masked sampler's."""
    m, n = prefix_length(config), seq_len(config)
    rest = plan.expected_nfe(config.sample) if m < n else 0
    return ar_sampling.expected_ar_nfe(ar_config.sample, m) + rest


def sample(params, labels: jax.Array, rng: jax.Array, config, *, ar_params, ar_config):
    """(tokens [B, N] int32, info) with info['nfe'] = AR passes + masked passes."""
    check_pair(config, ar_config)
    m, n = prefix_length(config), seq_len(config)
    if m == 0:
        return masked.sample(params, labels, rng, config)
    prefix, ar_info = ar_sampling.sample(ar_params, labels, rng, ar_config, num_tokens=m)
    if m == n:
        return prefix, {"nfe": ar_info["nfe"], "ar_nfe": ar_info["nfe"]}
    tokens, info = masked.sample(params, labels, rng, config, prefix=prefix)
    return tokens, dict(info, ar_nfe=ar_info["nfe"], nfe=info["nfe"] + ar_info["nfe"])


def load_ar_config(workdir: str):
    """The AR run's config (its config.json) named by ``sample.ar_workdir``, over today's
    defaults (configs/base.py), so a record written before a field existed still builds."""
    path = os.path.join(workdir, "config.json")
    if not workdir or not os.path.exists(path):
        raise FileNotFoundError(f"config.sample.ar_workdir={workdir!r} has no config.json: "
                                "train a model.arch='ar' model there first (configs/digits_ar.py)")
    config = load_config("base")
    with open(path, encoding="utf-8") as f:
        config.update(json.load(f))  # recursive: the record's fields over the defaults
    return config


def make_prefix_sampler(config, ar_config):
    """``(params {'masked', 'ar'}, labels [B], rng) -> (tokens, info)``, jitted: the
    generation loop's sampler when ``sample.ar_prefix`` > 0."""
    def run(params, labels, rng):
        return sample(params["masked"], labels, rng, config, ar_params=params["ar"],
                      ar_config=ar_config)
    return jax.jit(run)
