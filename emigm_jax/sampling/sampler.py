"""The mask-prediction sampler: one jit-compiled ``lax.scan`` over a ``SamplerState``.

A step is ``mask_predict_step`` (transformer pass, reveal count, values for the revealed
tokens, reveal); ``sampler_step`` adds BAG's Z-sampling zig-zag. Companion switches are
Python branches on the static ``SamplerSpec``. Overview: docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from emigm_jax.buckets import gather_rows
from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.masking import row_ranks
from emigm_jax.models import build_model, seq_len, token_dim
from emigm_jax.models.transformer import ReadRows
from emigm_jax.sampling import draws
from emigm_jax.sampling.head_draw import HeadDraw, make_head_draw, revealed_values
from emigm_jax.sampling.plan import (CompanionOptions, StepPlan, ar_prefix_length,
                                     companion_options, head_ladder, make_plan,
                                     momentum_coefficients, read_ladder, z_sampling_steps,
                                     z_score_passes)
from emigm_jax.sharding import gather_weights


@flax.struct.dataclass
class SamplerState:
    """What one step hands the next."""
    tokens: jax.Array      # [B, N] int32 (categorical) or [B, N, C] float32
    mask: jax.Array        # [B, N] bool, True = still masked
    nfe: jax.Array         # [] int32, forward passes per image so far
    probs: Any = None      # [B, N, V] previous step's filtered probs (diff_frac > 0), else None
    pred: Any = None       # [B, N, V] previous step's guided probs (mgt_solver momentum2)


@flax.struct.dataclass
class StepInputs:
    """The scan's per-step inputs (leading axis K when stacked)."""
    k: jax.Array           # [] float32 step index
    p_reveal: jax.Array    # [] float32 per-token reveal probability
    gamma_s: jax.Array     # [] float32 mask ratio after the step
    guided: jax.Array      # [] bool, runs the unconditional pass
    is_last: jax.Array     # [] bool
    key: jax.Array         # [2] keys: uniforms, DDPM noise
    momentum: Any = None   # [] float32 c_k of mgt_solver momentum2, else None


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerSpec:
    """Everything static about one config's sampler."""
    model: Any
    net: Callable          # (params, tokens, mask, labels, t [B], read) -> z [B, N, D]
    n: int
    c: int
    vocab: int             # 0 for the diffusion head
    opts: CompanionOptions
    plan: StepPlan
    sample_cfg: Any
    t_before: jax.Array    # [K] time of the state entering step k
    t_after: jax.Array     # [K] time of the state after step k
    head: HeadDraw | None
    prefix: int = 0        # raster positions committed before step 0 (sample.ar_prefix)
    read_rungs: tuple = ()  # decoder's last-block query rungs (ReadRows); () = every row

    @property
    def categorical(self) -> bool:
        return self.vocab > 0

    @property
    def guidance(self) -> bool:
        """Whether any step runs the unconditional pass (else it is never traced)."""
        return float(self.sample_cfg.cfg_scale) != 1.0 and bool(self.plan.guided.any())

    @property
    def num_features(self) -> int:
        """Uniforms per position and step: order, count, confidence Gumbel, then V Gumbels
        (categorical) or C normals (diffusion head noise, per position)."""
        return 3 + (self.vocab if self.categorical else self.c)


def step_uniforms(spec: SamplerSpec, key, b: int):
    """[B, N, F] uniforms, drawn flat: XLA compiles a 1-D threefry draw ~4x faster."""
    shape = (b, spec.n, spec.num_features)
    return jax.random.uniform(key, (b * spec.n * spec.num_features,), jnp.float32).reshape(shape)


def transformer_pass(spec: SamplerSpec, params, labels, state: SamplerState, xs: StepInputs,
                     order=None, count=None):
    """(z_c, z_u) [B, N, D] float32; z_u is zeros unless the step is guided.

    With ``order`` [B, N] the rows come in that order, and only the first ``count`` are
    meaningful: the decoder's last block computes just those (``spec.read_rungs``).
    """
    tokens, mask = state.tokens, state.mask
    t_now = jnp.full((tokens.shape[0],), spec.t_before[xs.k.astype(jnp.int32)])
    read = None
    if order is not None and spec.read_rungs:
        read = ReadRows(order, count, spec.read_rungs)

    def cond_only(_):
        z = spec.net(params, tokens, mask, labels, t_now, read)
        return z, jnp.zeros_like(z)

    def cond_and_uncond(_):
        return tuple(jnp.split(both_passes(spec, params, tokens, mask, labels, t_now, read), 2))

    if spec.guidance:
        z_c, z_u = jax.lax.cond(xs.guided, cond_and_uncond, cond_only, None)
    else:
        z_c, z_u = cond_only(None)
    if order is not None and read is None:
        z_c, z_u = gather_rows(z_c, order), gather_rows(z_u, order)
    return z_c.astype(jnp.float32), z_u.astype(jnp.float32)


def both_passes(spec: SamplerSpec, params, tokens, mask, labels, t, read=None):
    """z [2B, N, D] of one pass over the batch twice: with its labels, then unconditional."""
    if read is not None:
        read = read._replace(order=jnp.concatenate([read.order, read.order]))
    return spec.net(params, jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask]),
                    jnp.concatenate([labels, -jnp.ones_like(labels)]), jnp.concatenate([t, t]),
                    read)


def cfg_logits(spec: SamplerSpec, lc, lu, w):
    """Guided logits at weight w in the sampler's CFG space (logits or probabilities)."""
    if spec.opts.cfg_space == "probs":
        return draws.cfg_probs_logits(lc, lu, w)
    return lu + w * (lc - lu)


def reveal_count(spec: SamplerSpec, mask, xs: StepInputs, u):
    """Tokens revealed this step, the same for every sample: int32 [].

    The count rule keeps ceil(gamma(s) (N - prefix)) masked: it scales to the tokens that
    started masked (all N unless an AR prefix is committed).
    """
    n = spec.n
    n_masked = jnp.sum(mask[0])
    if spec.opts.reveal == "count":
        keep_masked = jnp.ceil((n - spec.prefix) * xs.gamma_s - 1e-6).astype(jnp.int32)
        count = jnp.clip(n_masked - keep_masked, 1, n_masked)
    else:  # Binomial(n_masked, p_reveal), shared by the batch, at least 1
        count = jnp.sum((jnp.arange(n) < n_masked) & (u[0, :, 1] < xs.p_reveal))
        count = jnp.maximum(count, 1)
    return jnp.where(xs.is_last, n_masked, jnp.minimum(count, n_masked)).astype(jnp.int32)


def guidance_weight(spec: SamplerSpec, mask, count, guided):
    """CFG weight w of this step ([] float32): its schedule reads the revealed fraction."""
    sc = spec.sample_cfg
    revealed_after = (spec.n - jnp.sum(mask[0]) + count).astype(jnp.float32) / spec.n
    return jnp.where(guided, draws.cfg_weight(float(sc.cfg_scale), sc.cfg_schedule,
                                              revealed_after), 1.0)


def guided_logits(spec: SamplerSpec, params, z_c, z_u, w, xs: StepInputs):
    """Logits [B, N, V] after CFG (logit or probability space) and noise regularisation."""
    apply = functools.partial(spec.model.apply, {"params": params}, method="logits")
    logits = apply(z_c)
    if spec.guidance:
        logits = jnp.where(xs.guided, cfg_logits(spec, logits, apply(z_u), w), logits)
    if spec.opts.noise_on:
        # BAG eq. 1 at r = k / T, after CFG and before filtering; its own key
        b, n, v = logits.shape
        eps = jax.random.normal(jax.random.fold_in(xs.key[0], 1), (b * n * v,),
                                jnp.float32).reshape(b, n, v)
        strength = spec.opts.noise_reg_scale * draws.noise_reg_strength(
            spec.opts.noise_reg, xs.k / int(spec.sample_cfg.num_iter))
        logits = logits + strength * eps
    return logits


def momentum_logits(logits, state: SamplerState, xs: StepInputs):
    """(logits, pred): BAG momentum2 (``plan`` module doc) from step 1 on; pred = this
    step's guided probs for the next step's finite difference."""
    pred = jax.nn.softmax(logits, axis=-1)
    extrapolated = draws.log_or_min(draws.momentum_probs(pred, state.pred, xs.momentum))
    return jnp.where(xs.k >= 1, extrapolated, logits), pred


def draw_categorical(spec: SamplerSpec, logits, state: SamplerState, xs: StepInputs, u):
    """(tokens [B, N], probs for the next step) drawn from the filtered logits."""
    sc, opts = spec.sample_cfg, spec.opts
    filtered = draws.filter_logits(logits, float(sc.temperature), int(sc.top_k),
                                   float(sc.top_p))
    g_tok = draws.gumbel_from_uniform(u[..., 3:])
    drawn = jnp.argmax(filtered + g_tok, axis=-1)  # [B, N] Gumbel-max
    probs = state.probs
    if opts.diff_frac > 0:
        drawn, probs = draws.differential_draw(filtered, state.probs, g_tok, state.mask, xs.k,
                                               opts.diff_frac, drawn)
    if opts.argmax_from >= 0:
        drawn = jnp.where(xs.k >= opts.argmax_from, jnp.argmax(filtered, axis=-1), drawn)
    if opts.final_argmax:
        # DI: every token still masked at the last step takes argmax p_theta (the guided,
        # noise-regularised logits; temperature / top-k / top-p keep it)
        drawn = jnp.where(xs.is_last, jnp.argmax(logits, axis=-1), drawn)
    return drawn, probs


def confidence_score(spec: SamplerSpec, logits, drawn, xs: StepInputs, u):
    """MaskGIT's score [B, N]: log p of the drawn token plus annealed Gumbel noise."""
    sc = spec.sample_cfg
    logp = jax.nn.log_softmax(logits, axis=-1)
    conf = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]
    anneal = draws.gumbel_scale(float(sc.choice_temperature), xs.k, int(sc.num_iter),
                                spec.opts.gumbel_anneal)
    return conf + anneal * draws.gumbel_from_uniform(u[..., 2])


def reveal_positions(mask, score, count):
    """(reveal [B, N] bool, order [B, N]): the ``count`` best-scoring masked positions;
    order lists masked positions first, best first (the head's order)."""
    score = jnp.where(mask, score, -jnp.inf)
    order = jnp.argsort(-score, axis=1)
    rank = jnp.argsort(order, axis=1)
    return mask & (rank < count), order


def categorical_step(spec, params, z_c, z_u, w, count, state: SamplerState, xs, u):
    """Tokens and probs after a categorical step."""
    logits = guided_logits(spec, params, z_c, z_u, w, xs)
    pred = state.pred
    if spec.opts.mgt_solver == "momentum2":
        logits, pred = momentum_logits(logits, state, xs)
    drawn, probs = draw_categorical(spec, logits, state, xs, u)
    score = u[..., 0]  # random order
    if spec.sample_cfg.order == "confidence":
        score = confidence_score(spec, logits, drawn, xs, u)
    reveal, _ = reveal_positions(state.mask, score, count)
    tokens = jnp.where(reveal, drawn.astype(state.tokens.dtype), state.tokens)
    return state.replace(tokens=tokens, mask=state.mask & ~reveal, probs=probs, pred=pred)


def diffusion_step(spec, params, z_c, z_u, w, count, state: SamplerState, xs, u, reveal,
                   order):
    """Tokens after a diffusion-head step: the head draws only the revealed, from z in
    reveal ``order`` (``transformer_pass``)."""
    noise = draws.normal_from_uniform(u[..., 3:])  # [B, N, C]
    values = revealed_values(spec.head, params, z_c, z_u, w, noise, order, count, xs.key[1],
                             xs.guided, spec.guidance)
    tokens = jnp.where(reveal[..., None], values, state.tokens)
    return state.replace(tokens=tokens, mask=state.mask & ~reveal)


def mask_predict_step(spec: SamplerSpec, params, labels, state: SamplerState, xs: StepInputs):
    """One step t_k -> t_{k+1}: (new state, tokens revealed [])."""
    u = step_uniforms(spec, xs.key[0], state.tokens.shape[0])
    count = reveal_count(spec, state.mask, xs, u)
    w = guidance_weight(spec, state.mask, count, xs.guided)
    if spec.categorical:
        z_c, z_u = transformer_pass(spec, params, labels, state, xs)
        after = categorical_step(spec, params, z_c, z_u, w, count, state, xs, u)
    else:  # random order: the revealed positions are known before the pass
        reveal, order = reveal_positions(state.mask, u[..., 0], count)
        z_c, z_u = transformer_pass(spec, params, labels, state, xs, order, count)
        after = diffusion_step(spec, params, z_c, z_u, w, count, state, xs, u, reveal, order)
    return after.replace(nfe=state.nfe + 1 + xs.guided.astype(jnp.int32)), count


def zigzag_remask(spec, params, labels, before: SamplerState, after: SamplerState, count,
                  xs: StepInputs):
    """(mask [B, N] to redo from, nfe): ``count`` tokens of ``after`` masked again.

    ``recover`` restores the step's starting mask; ``masked`` scores every unmasked token by
    log p(x_j | state) from one extra conditional pass (older tokens may be re-masked; with
    ``z_cfg`` w != 0 also an unconditional pass, scored with the sampler's guidance at w);
    ``random`` picks them at random.
    """
    mode, b, n = spec.opts.z_sampling, after.tokens.shape[0], spec.n
    unmasked, nfe = ~after.mask, after.nfe
    if mode == "recover":
        return after.mask | (before.mask & ~after.mask), nfe
    if mode == "masked":
        logp = jax.nn.log_softmax(zigzag_score_logits(spec, params, labels, after, xs), axis=-1)
        score = jnp.take_along_axis(logp, after.tokens[..., None], axis=-1)[..., 0]
        nfe = nfe + z_score_passes(spec.sample_cfg)
    else:  # random
        score = jax.random.uniform(jax.random.fold_in(xs.key[0], 3), (b * n,),
                                   jnp.float32).reshape(b, n)
    score = jnp.where(unmasked, score, jnp.inf)
    return after.mask | (unmasked & (row_ranks(score) < count)), nfe


def zigzag_score_logits(spec: SamplerSpec, params, labels, after: SamplerState, xs):
    """Logits [B, N, V] of the masked-Z inversion scoring on the state after the step: the
    conditional pass (z_cfg = 0, BAG's default), or guided at w = z_cfg in the sampler's
    CFG space (an unconditional pass more)."""
    b, w = after.tokens.shape[0], spec.opts.z_cfg
    t_next = jnp.full((b,), spec.t_after[xs.k.astype(jnp.int32)])
    apply = functools.partial(spec.model.apply, {"params": params}, method="logits")
    if w == 0.0:
        return apply(spec.net(params, after.tokens, after.mask, labels, t_next).astype(jnp.float32))
    z = both_passes(spec, params, after.tokens, after.mask, labels, t_next)
    return cfg_logits(spec, *jnp.split(apply(z.astype(jnp.float32)), 2), w)


def sampler_step(spec: SamplerSpec, params, labels, state: SamplerState, xs: StepInputs):
    """A step, then (Z-sampling) re-mask back to the step's starting count and redo it with
    fresh randomness; the redo's result is kept."""
    first, count = mask_predict_step(spec, params, labels, state, xs)
    if spec.opts.z_sampling == "none":
        return first, count

    def zigzag(after: SamplerState):
        mask, nfe = zigzag_remask(spec, params, labels, state, after, count, xs)
        redo = SamplerState(tokens=after.tokens, mask=mask, nfe=nfe, probs=state.probs,
                            pred=state.pred)
        redo_keys = jax.vmap(lambda kk: jax.random.fold_in(kk, 2))(xs.key)
        return mask_predict_step(spec, params, labels, redo, xs.replace(key=redo_keys))

    z_steps = z_sampling_steps(spec.sample_cfg)
    if z_steps >= int(spec.sample_cfg.num_iter):
        return zigzag(first)
    return jax.lax.cond(xs.k < z_steps, zigzag, lambda f: (f, count), first)


def initial_state(spec: SamplerSpec, b: int, prefix=None) -> SamplerState:
    """Everything masked (token values are placeholders), or with ``prefix`` [B, N] int the
    first ``spec.prefix`` raster positions committed to its values (AR prefix)."""
    if spec.categorical:
        tokens = jnp.zeros((b, spec.n), jnp.int32)
    else:
        tokens = jnp.zeros((b, spec.n, spec.c), jnp.float32)
    mask = jnp.ones((b, spec.n), bool)
    if spec.prefix > 0:
        if prefix is None:
            raise ValueError(f"sample.ar_prefix commits {spec.prefix} tokens: pass their "
                             "values (emigm_jax.ar_prefix.sample does)")
        committed = jnp.arange(spec.n) < spec.prefix  # [N]
        tokens = jnp.where(committed, prefix.astype(jnp.int32), tokens)
        mask = jnp.broadcast_to(~committed, (b, spec.n))
    probs = pred = None
    if spec.opts.diff_frac > 0:
        probs = jnp.zeros((b, spec.n, spec.vocab), jnp.float32)
    if spec.opts.mgt_solver == "momentum2":
        pred = jnp.zeros((b, spec.n, spec.vocab), jnp.float32)
    return SamplerState(tokens=tokens, mask=mask, nfe=jnp.int32(0), probs=probs, pred=pred)


def step_inputs(spec: SamplerSpec, rng) -> StepInputs:
    """The scan's xs: [K] per-step constants and keys [K, 2] (uniforms, DDPM noise)."""
    k_steps, plan = int(spec.sample_cfg.num_iter), spec.plan
    momentum = None
    if spec.opts.mgt_solver == "momentum2":
        momentum = jnp.asarray(momentum_coefficients(spec.sample_cfg), jnp.float32)
    return StepInputs(k=jnp.arange(k_steps, dtype=jnp.float32),
                      p_reveal=jnp.asarray(plan.p_reveal, jnp.float32),
                      gamma_s=jnp.asarray(plan.gamma_s, jnp.float32),
                      guided=jnp.asarray(plan.guided), is_last=jnp.arange(k_steps) == k_steps - 1,
                      key=jax.random.split(rng, (k_steps, 2)), momentum=momentum)


def run_sampler(spec: SamplerSpec, params, labels, rng, prefix=None):
    """(tokens, info) for ``labels`` [B]; see ``sample``."""
    state = initial_state(spec, labels.shape[0], prefix)
    state, counts = jax.lax.scan(
        lambda st, xs: sampler_step(spec, params, labels, st, xs), state, step_inputs(spec, rng))
    return state.tokens, {"nfe": state.nfe, "reveal_counts": counts,
                          "masked_left": jnp.sum(state.mask)}


def model_net(model, params, tokens, mask, labels, t, read=None):
    """The transformer; ``t`` [B] (the state's time) reaches only an ETM network; ``read``:
    ``ReadRows`` (z in read order, the last decoder block on those rows only)."""
    params = gather_weights(params, True, model.dtype)  # FSDP: blocks gather per layer
    return model.apply({"params": params}, tokens, mask, labels, t=t, read=read,
                       method="transformer")


def stand_in_net(transformer_fn, params, tokens, mask, labels, t, read=None):
    """A test stand-in ``(params, tokens, mask, labels) -> z``: it takes no time (and no
    ``read``: the sampler spec of a stand-in has no read rungs)."""
    del t, read
    return transformer_fn(params, tokens, mask, labels)


def build_spec(config, transformer_fn: Callable | None = None) -> SamplerSpec:
    """Checks the config and resolves everything static; ConfigError names a bad value."""
    validate_config(config)
    sc, model = config.sample, build_model(config)
    n, c = seq_len(config), token_dim(config)
    categorical = config.model.head == "categorical"
    if sc.order == "confidence" and not categorical:
        raise ValueError("sample.order='confidence' needs token probabilities: it is only "
                         "available with model.head='categorical' (got 'diffusion')")
    opts, plan = companion_options(sc, categorical), make_plan(sc, n)
    net = (functools.partial(model_net, model) if transformer_fn is None
           else functools.partial(stand_in_net, transformer_fn))
    head = None if categorical else make_head_draw(sc, model, c, plan.chunk, head_ladder(sc, n))
    prefix = ar_prefix_length(sc, n)
    if prefix and not categorical:
        raise ConfigError(f"config.sample.ar_prefix={sc.ar_prefix!r} needs token ids from an "
                          "AR model: only available with model.head='categorical'")
    read_rungs = () if categorical or transformer_fn is not None else read_ladder(sc, n)
    return SamplerSpec(model=model, net=net, n=n, c=c,
                       vocab=int(config.model.vocab_size) if categorical else 0, opts=opts,
                       plan=plan, sample_cfg=sc, t_before=jnp.asarray(plan.t, jnp.float32),
                       t_after=jnp.asarray(plan.s, jnp.float32), head=head, prefix=prefix,
                       read_rungs=read_rungs)


_SAMPLERS: dict[str, Any] = {}


def make_sampler(config, transformer_fn: Callable | None = None):
    """jitted ``(params, labels [B], rng) -> (tokens, info)`` for this config (cached)."""
    if transformer_fn is not None:
        return jax.jit(functools.partial(run_sampler, build_spec(config, transformer_fn)))
    key = json.dumps({"model": config.model.to_dict(), "sample": config.sample.to_dict()},
                     sort_keys=True, default=str)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = jax.jit(functools.partial(run_sampler, build_spec(config)))
    return _SAMPLERS[key]


def sample(params, labels: jax.Array, rng: jax.Array, config, prefix=None):
    """Samples tokens for ``labels`` [B] (-1 = unconditional) with ``config.sample``.

    Returns (tokens [B, N, C] float32 or [B, N] int32, info) with info['nfe'] the forward
    passes per image actually spent, info['reveal_counts'] [num_iter] tokens revealed per
    step (the same for every image) and info['masked_left'] (always 0). Compiled once per
    (model, sample) config and input shapes; ``rng`` fixes the result, also when the batch
    is sharded over devices. ``prefix`` [B, N] int: the AR-prefix tokens when
    ``sample.ar_prefix`` > 0 (``emigm_jax.ar_prefix.sample`` draws them).
    """
    return make_sampler(config)(params, labels, rng, prefix)
