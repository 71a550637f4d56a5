"""Launch-time config checks: every bad value is named with what was expected.

Runs before anything is traced or compiled, so a typo in a sweep fails in a second with a
readable message instead of as a shape error deep inside jit.
"""
from __future__ import annotations

from emigm_jax.buckets import check_fractions
from emigm_jax.schedules import SCHEDULE_ALIASES, SCHEDULE_NAMES, WEIGHT_NAMES
from emigm_jax.tokenizers.registry import TOKENIZER_NAMES

CHOICES = {
    "model.arch": ("mae", "single", "ar"),
    "model.head": ("diffusion", "categorical"),
    "model.cfg_mode": ("mask_token", "fake_class"),
    "model.dtype": ("float32", "bfloat16"),
    "model.block": ("vit", "llama"),
    "model.pos_emb": ("learned", "rope2d"),
    "model.rope_pairing": ("half", "interleaved"),
    "model.rope_prefix": ("identity", "zero"),
    "model.time_cond": ("none", "explicit"),
    "mask.distribution": ("bernoulli", "uniform_count"),
    "mask.schedule": SCHEDULE_NAMES + tuple(SCHEDULE_ALIASES),
    "mask.weight": WEIGHT_NAMES,
    "mask.t_per": ("batch", "sample"),
    "mask.loss_norm": ("masked", "tokens"),
    "sample.schedule": SCHEDULE_NAMES + tuple(SCHEDULE_ALIASES),
    "sample.order": ("random", "confidence"),
    "sample.head_sampler": ("dpm_solver", "ddpm"),
    "sample.solver_method": ("singlestep", "multistep"),
    "sample.solver_skip": ("logSNR", "time_uniform"),
    "sample.cfg_schedule": ("constant", "linear", "power", "cubic", "exp", "cosine"),
    "sample.reveal": ("auto", "bernoulli", "euler", "count"),
    "sample.cfg_space": ("auto", "eps", "logits", "probs"),
    "sample.gumbel_anneal": ("linear", "none"),
    "sample.noise_reg": ("none", "abs_cos", "half_abs_cos"),
    "sample.z_sampling": ("none", "masked", "random", "recover"),
    "plan.what": ("train", "sample", "both"),
    "optim.decay": ("constant", "cosine"),
    "model.scan_layers": (False, True),
    "model.remat": (False, True),
    "train.ladders": (False, True),
    "sample.mgt_solver": ("vanilla", "momentum2"),
}


class ConfigError(ValueError):
    """A config field holds a value the framework cannot run."""


def as_dict(node) -> dict:
    """A ConfigDict (or mapping, or None) as a plain dict."""
    return node.to_dict() if hasattr(node, "to_dict") else dict(node or {})


def merged_section(config, section: str, defaults: dict) -> dict:
    """``config.<section>`` over ``defaults`` (a section may be given in part); an unknown
    field is an error (typo guard)."""
    given = as_dict(config[section])
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config.{section} fields {unknown}; known: {sorted(defaults)}")
    return dict(defaults, **given)


def sample_preset(config, name: str, source: str = "sample preset ",
                  also_accepted: tuple[str, ...] = ()) -> dict:
    """The sample-field overrides ``config.sample_presets[name]``, checked.

    Shared by ``--sample_preset`` and ``sweep.presets``. ``source`` prefixes the name in the
    error (what the user typed); ``also_accepted`` lists names the caller handles itself.
    """
    presets = as_dict(config.sample_presets)
    if name not in presets:
        raise ConfigError(f"{source}{name!r} is not in config.sample_presets (available: "
                          f"{sorted(presets) + list(also_accepted)})")
    overrides = as_dict(presets[name])
    unknown = sorted(set(overrides) - set(config.sample.keys()))
    if unknown:
        raise ConfigError(f"sample preset {name!r} sets unknown fields "
                          f"{['sample.' + u for u in unknown]}")
    return overrides


def _require(cond: bool, field: str, value, expected: str):
    if not cond:
        raise ConfigError(f"config.{field}={value!r} is invalid: expected {expected}")


def _is_int(value) -> bool:
    return not isinstance(value, bool) and int(value) == value


def _validate_run_fields(config) -> None:
    """Counts and intervals of the training run, checkpoints and tokenizer choice."""
    if "train" in config:
        t = config.train
        _require(_is_int(t.num_steps) and (t.num_steps == -1 or t.num_steps > 0),
                 "train.num_steps", t.num_steps, "a positive integer, or -1 for train.epochs")
        if t.num_steps == -1:
            _require(t.epochs > 0, "train.epochs", t.epochs, "a value > 0 (train.num_steps=-1)")
        _require(_is_int(t.log_every) and t.log_every >= 1, "train.log_every", t.log_every,
                 "an integer >= 1")
        _require(_is_int(t.sample_every) and t.sample_every >= 0, "train.sample_every",
                 t.sample_every, "an integer >= 0 (0 = off)")
        _require(_is_int(t.max_nonfinite_steps) and t.max_nonfinite_steps >= 0,
                 "train.max_nonfinite_steps", t.max_nonfinite_steps,
                 "an integer >= 0 (0 = stop at the first non-finite step)")
    if "optim" in config:
        o = config.optim
        _require(_is_int(o.warmup_steps) and o.warmup_steps >= -1, "optim.warmup_steps",
                 o.warmup_steps, "an integer >= 0, or -1 for optim.warmup_epochs")
        _require(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "a value >= 0")
    if "checkpoint" in config:
        c = config.checkpoint
        _require(_is_int(c.keep) and c.keep >= 1, "checkpoint.keep", c.keep, "an integer >= 1")
        for name in ("every_steps", "keep_every"):
            _require(_is_int(c[name]) and c[name] >= 0, f"checkpoint.{name}", c[name],
                     "an integer >= 0 (0 = off)")
    if "tokenizer" in config and "data" in config:
        name = config.tokenizer.name
        if config.data.source == "digits":
            _require(name == "identity", "tokenizer.name", name,
                     "'identity' with data.source='digits' (pixels are the tokens)")
        elif config.data.source in ("folder", "tfds", "cached"):  # others: named by preflight
            _require(name in TOKENIZER_NAMES, "tokenizer.name", name,
                     f"one of {TOKENIZER_NAMES}")


def validate_config(config) -> None:
    """Raises ConfigError naming the first bad field; returns None when the config is usable."""
    _validate_run_fields(config)
    _check_choices(config)
    side = _check_model(config.model, config.mask)
    _check_mask(config.mask, side)
    if "optim" in config:
        _check_optim(config.optim)
    if "train" in config:
        _check_train(config.train)
    if "sample" in config:
        _check_sample(config.sample)


def _check_choices(config) -> None:
    for field, allowed in CHOICES.items():
        section, name = field.split(".")
        if section not in config or name not in config[section]:
            continue
        value = config[section][name]
        _require(value in allowed, field, value, f"one of {allowed}")


def _check_model(m, mask) -> int:
    """Checks config.model; returns the token grid side."""
    for name in ("width", "enc_depth", "num_heads", "num_classes", "image_size",
                 "latent_stride", "patch_size", "latent_channels", "head_depth", "head_width"):
        _require(int(m[name]) == m[name] and m[name] > 0, f"model.{name}", m[name],
                 "a positive integer")
    _require(m.width % m.num_heads == 0, "model.num_heads", m.num_heads,
             f"a divisor of model.width={m.width}")
    _require(m.dec_depth >= 0 and int(m.dec_depth) == m.dec_depth, "model.dec_depth",
             m.dec_depth, "an integer >= 0")
    if m.dec_depth == 0:
        _require(m.arch != "mae", "model.dec_depth", m.dec_depth,
                 ">= 1 with model.arch='mae' (the decoder re-inserts the dropped tokens)")
    if m.arch == "ar":
        _require(m.head == "categorical", "model.head", m.head,
                 "'categorical' with model.arch='ar' (next-token logits)")
        _require(m.dec_depth == 0, "model.dec_depth", m.dec_depth,
                 "0 with model.arch='ar' (one causal stack of model.enc_depth blocks)")
    _check_ar_options(m)
    if m.pos_emb == "rope2d":
        _require((m.width // m.num_heads) % 4 == 0, "model.num_heads", m.num_heads,
                 "a head count whose head dimension is divisible by 4 (rope2d)")
    _require(m.buffer_size >= 0, "model.buffer_size", m.buffer_size, "an integer >= 0")
    _require(m.image_size % (m.latent_stride * m.patch_size) == 0, "model.image_size",
             m.image_size, f"a multiple of latent_stride*patch_size={m.latent_stride * m.patch_size}")
    for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
        _require(0.0 <= m[name] < 1.0, f"model.{name}", m[name], "a probability in [0, 1)")
    _require(m.diffusion_batch_mul >= 1, "model.diffusion_batch_mul", m.diffusion_batch_mul,
             "an integer >= 1")
    if m.head == "categorical":
        _require(m.vocab_size >= 2, "model.vocab_size", m.vocab_size,
                 "the codebook size K >= 2 for the categorical head")
    side = m.image_size // m.latent_stride // m.patch_size
    total = m.buffer_size + side * side
    _require(m.encoder_capacity == 0 or 0 < m.encoder_capacity <= total,
             "model.encoder_capacity", m.encoder_capacity, f"0 (exact) or in [1, {total}]")
    if m.encoder_capacity:
        _require(m.buffer_size + side * side - mask.min_masked <= m.encoder_capacity,
                 "model.encoder_capacity", m.encoder_capacity,
                 f">= buffer_size + seq_len - mask.min_masked = "
                 f"{total - mask.min_masked} (else kept tokens could be cut)")
    loss_capacity = int(m.get("loss_capacity", 0))
    _require(0 <= loss_capacity <= side * side, "model.loss_capacity", loss_capacity,
             f"0 (exact) or in [1, {side * side}] (the train step sets it per rung)")
    for name in ("encoder_buckets", "loss_buckets"):
        reason = check_fractions(m.get(name, ()), f"model.{name}")
        if reason:
            raise ConfigError(reason)
    return side


def _check_ar_options(m) -> None:
    """norm_eps / rope_pairing / rope_prefix: positive, and only model.arch='ar' reads them."""
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "a value > 0")
    if m.arch == "ar":
        return
    for name, default in (("norm_eps", 1e-6), ("rope_pairing", "half"),
                          ("rope_prefix", "identity")):
        value = m[name]
        _require(value == default, f"model.{name}", value,
                 f"{default!r} with model.arch={m.arch!r} (only model.arch='ar' reads it)")


def _check_mask(k, side: int) -> None:
    _require(0.0 <= k.t_min < 1.0, "mask.t_min", k.t_min, "a value in [0, 1)")
    _require(0.0 <= k.t_eps < 0.5, "mask.t_eps", k.t_eps,
             "a value in [0, 0.5)")
    _require(0.0 <= k.p_eps < 1.0, "mask.p_eps", k.p_eps, "a value in [0, 1)")
    _require(1 <= k.min_masked <= side * side, "mask.min_masked", k.min_masked,
             f"an integer in [1, seq_len={side * side}]")
    _require(0.0 <= k.coupling_ratio < 1.0, "mask.coupling_ratio",
             k.coupling_ratio, "a value in [0, 1)")
    for name in ("exp_rate", "pow_rho", "poly_p"):
        _require(k[name] > 0, f"mask.{name}", k[name], "a value > 0")


def _check_optim(o) -> None:
    _require(o.base_lr > 0, "optim.base_lr", o.base_lr, "a value > 0")
    _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1/b2", (o.b1, o.b2),
             "values in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a value >= 0")
    _require(o.grad_clip > 0, "optim.grad_clip", o.grad_clip, "a value > 0")
    _require(0 <= o.ema_decay < 1, "optim.ema_decay", o.ema_decay, "a value in [0, 1)")


def _check_train(t) -> None:
    _require(t.batch_size > 0, "train.batch_size", t.batch_size, "a positive integer")
    _require(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0, "train.grad_accum",
             t.grad_accum, f"a divisor of train.batch_size={t.batch_size}")
    _require(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing,
             "a value in [0, 1)")


def _check_sample(s) -> None:
    _require(s.num_iter >= 1, "sample.num_iter", s.num_iter, "an integer >= 1")
    _require(0.0 <= s.t_end < 1.0, "sample.t_end", s.t_end, "a value in [0, 1)")
    _require(s.cfg_scale >= 0, "sample.cfg_scale", s.cfg_scale, "a value >= 0")
    _require(0.0 <= s.cfg_t_min <= s.cfg_t_max <= 1.0, "sample.cfg_t_min/cfg_t_max",
             (s.cfg_t_min, s.cfg_t_max), "0 <= cfg_t_min <= cfg_t_max <= 1")
    _require(s.solver_order in (1, 2, 3), "sample.solver_order", s.solver_order,
             "one of (1, 2, 3)")
    _require(s.solver_steps >= 1, "sample.solver_steps", s.solver_steps, "an integer >= 1")
    _require(s.temperature > 0, "sample.temperature", s.temperature, "a value > 0")
    _require(0.0 < s.top_p <= 1.0, "sample.top_p", s.top_p, "a value in (0, 1]")
    _require(s.top_k >= 0, "sample.top_k", s.top_k, "an integer >= 0 (0 = off)")
    share = s.get("ar_prefix", 0.0)  # companion switches may be absent (see sampling.plan)
    _require(0.0 <= share <= 1.0, "sample.ar_prefix", share, "a share in [0, 1] (0 = off)")
    _require(s.get("z_cfg", 0.0) >= 0, "sample.z_cfg", s.get("z_cfg", 0.0),
             "a value >= 0 (0 = no guidance pass in the masked-Z scoring)")
