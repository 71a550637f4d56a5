"""The mask-prediction sampler: reveal counts, interval CFG and NFE, CFG
schedules, categorical filters and confidence order, head buffers, DPM-Solver CFG, DDPM,
compilation and sharding.

Most tests inject a trivial ``transformer_fn`` (z read from the params pytree, or zeros) so
that only the sampler's own logic is compiled; the real tiny model runs in the DDPM /
compile-once test and in the sharded-determinism subprocess. Oracles: float64 numpy (the
exact distribution of the per-step reveal counts by dynamic programming over the number of
masked tokens, closed forms of the CFG shapes, numpy top-k / top-p) and identities (CFG as
an affine combination of an affine head).
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import io_callback
from scipy.special import gammaln

from emigm_jax import sampling
from emigm_jax.config_validation import ConfigError
from emigm_jax import models
from emigm_jax.models import build_model, seq_len, token_dim
from emigm_jax.schedules import schedule_from_config
from tests.conftest import ROOT, tiny_config

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_sampling")


# ------------------------------------------------------------------------------ helpers
def small_config(head="diffusion", side=4, **sample):
    """tiny_config with a side x side token grid (N = side^2) and sample overrides."""
    c = tiny_config(head)
    c.model.image_size = side * c.model.latent_stride
    c.sample.head_capacity = "auto"
    for k, v in sample.items():
        c.sample[k] = v
    return c


def random_params(config, seed=0, **extra):
    """The model's random parameters plus ``extra`` top-level leaves (read by test stand-ins)."""
    params = dict(models.random_params(config, seed))
    params.update(extra)
    return params


def zeros_transformer(config):
    d = config.model.width

    def fn(params, tokens, mask, labels):
        return jnp.zeros(tokens.shape[:2] + (d,), jnp.float32)
    return fn


def _count_kernel(p, n, last):
    """[m, c] = P(count c | m masked): Binomial(m, p) with c >= 1 forced; all at the last step."""
    m = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    if last:
        return (c == m).astype(np.float64)
    lf = gammaln(np.arange(n + 1) + 1.0)  # log k!
    ok = c <= m
    d = np.where(ok, m - c, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logpmf = lf[m] - lf[c] - lf[d] + c * np.log(p) + d * np.log1p(-p)
    kern = np.where(ok, np.exp(logpmf), 0.0)
    kern[1:, 1] += kern[1:, 0]
    kern[1:, 0] = 0.0
    return kern


def exact_count_distribution(p_reveal, n):
    """Exact joint law of the reference's reveal rule (float64), step by step.

    State: m tokens masked. Step k draws c ~ Binomial(m, p_k), forces c >= 1 while m >= 1,
    and the last step reveals all m. Yields (pmf of m before the step [n+1], kernel [m, c]).
    """
    dist = np.zeros(n + 1)
    dist[n] = 1.0
    m = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    for k, p in enumerate(p_reveal):
        kern = _count_kernel(p, n, k == len(p_reveal) - 1)
        yield dist, kern
        joint = dist[:, None] * kern  # [m, c]
        new = np.zeros(n + 1)
        np.add.at(new, np.clip(m - c, 0, n).ravel(), joint.ravel())
        dist = new


def exact_count_moments(p_reveal, n):
    """Exact mean and variance of every step's count, and P(m masked) after the last step."""
    means, variances = [], []
    c = np.arange(n + 1)
    for dist, kern in exact_count_distribution(p_reveal, n):
        pmf = dist @ kern
        means.append((c * pmf).sum())
        variances.append((c ** 2 * pmf).sum() - means[-1] ** 2)
    final = np.zeros(n + 1)
    np.add.at(final, np.clip(np.arange(n + 1)[:, None] - c[None], 0, n).ravel(),
              (dist[:, None] * kern).ravel())
    return np.array(means), np.array(variances), final


def run_many(sampler, params, labels, n_runs, seed):
    """Independent runs of a jitted sampler, vmapped over rng keys."""
    keys = jax.random.split(jax.random.key(seed), n_runs)
    return jax.jit(jax.vmap(sampler, in_axes=(None, None, 0)))(params, labels, keys)


# ------------------------------------------------------------------- host-side numbers
def test_time_grid_and_reveal_probabilities_closed_form():
    sc = small_config(num_iter=5, schedule="cosine", t_end=1e-5).sample
    grid = sampling.time_grid(sc)
    np.testing.assert_allclose(grid, np.linspace(1.0, 1e-5, 6), rtol=0, atol=0)
    g = np.cos(0.5 * np.pi * (1.0 - grid))
    want = 1.0 - g[1:] / g[:-1]
    want[-1] = 1.0
    np.testing.assert_allclose(sampling.reveal_probabilities(sc), want, rtol=1e-12)


@pytest.mark.parametrize("num_iter,lo,hi,nfe", [
    (16, 0.1, 0.3, 19), (128, 0.18, 0.6, 181), (128, 0.05, 0.4, 173), (128, 0.3, 0.7, 179),
    (64, 0.25, 0.5, 80), (16, 0.2, 0.4, 19), (16, 0.15, 0.35, 19)])
def test_expected_nfe_matches_spec_presets(num_iter, lo, hi, nfe):
    sc = small_config(num_iter=num_iter, cfg_t_min=lo, cfg_t_max=hi, cfg_scale=4.0).sample
    assert sampling.expected_nfe(sc) == nfe
    s = sampling.time_grid(sc)[1:]
    np.testing.assert_array_equal(sampling.guided_steps(sc), (s > lo) & (s <= hi))
    sc.cfg_scale = 1.0
    assert sampling.expected_nfe(sc) == num_iter  # scale 1: never an unconditional pass


# eMIGM paper presets: (default preset NFE, named preset, its NFE).
CONFIG_PRESETS = {
    "emigm_xs_256": (19, "iter128", 181), "emigm_s_256": (19, "iter128", 181),
    "emigm_b_256": (19, "iter128", 173), "emigm_l_256": (19, "iter128", 181),
    "emigm_h_256": (19, "iter128", 179), "emigm_xs_512": (19, "iter64", 80),
    "emigm_s_512": (19, "iter64", 80), "emigm_b_512": (19, "iter64", 80),
    "emigm_l_512": (19, "iter64", 80),
}


@pytest.mark.parametrize("name", sorted(CONFIG_PRESETS))
def test_config_presets_give_spec_nfe(name):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config()
    default_nfe, preset, preset_nfe = CONFIG_PRESETS[name]
    assert config.sample.cfg_scale == 4.0 and config.sample.cfg_schedule == "constant"
    assert (config.sample.num_iter, config.sample.solver_steps) == (16, 8)
    assert sampling.expected_nfe(config.sample) == default_nfe
    sc = ml_collections.ConfigDict(config.sample.to_dict())
    sc.update(dict(config.sample_presets[preset]))
    assert sampling.expected_nfe(sc) == preset_nfe
    assert sc.solver_steps == 14


def test_cfg_weight_shapes_closed_form():
    r = np.linspace(0.0, 1.0, 11)
    w = 4.0
    shapes = {"linear": r, "power": r ** 2, "cubic": r ** 3, "exp": 1.0 - np.exp(-5.0 * r),
              "cosine": np.cos(0.5 * np.pi * (1.0 - r))}
    np.testing.assert_allclose(sampling.cfg_weight(w, "constant", jnp.asarray(r)),
                               np.full_like(r, w), rtol=1e-6)
    for name, shape in shapes.items():
        np.testing.assert_allclose(sampling.cfg_weight(w, name, jnp.asarray(r, jnp.float32)),
                                   1.0 + (w - 1.0) * shape, rtol=1e-6, atol=1e-6, err_msg=name)
    # MAR's linear schedule at the two ends: 1 before anything is revealed, w at the end.
    np.testing.assert_allclose(sampling.cfg_weight(w, "linear", jnp.array([0.0, 1.0])),
                               [1.0, w])
    with pytest.raises(ValueError, match="cfg_schedule 'quadratic'"):
        sampling.cfg_weight(w, "quadratic", jnp.asarray(r))


def test_gumbel_scale_anneals_to_zero_at_last_step():
    k = np.arange(8)
    np.testing.assert_allclose(sampling.gumbel_scale(4.5, k, 8), 4.5 * (1 - (k + 1) / 8))
    assert sampling.gumbel_scale(4.5, 7, 8) == 0.0


def test_head_chunk():
    assert sampling.head_chunk(small_config().sample, 256) == 16  # default
    assert sampling.head_chunk(small_config(head_chunk=64).sample, 256) == 64
    assert sampling.head_chunk(small_config(head_chunk=64).sample, 16) == 16
    assert sampling.head_chunk(small_config(head_capacity="full").sample, 256) == 256


def test_bad_values_raise_clear_errors():
    c = small_config(head_capacity="half")
    with pytest.raises(ConfigError, match="head_capacity='half'"):
        sampling.make_sampler(c, zeros_transformer(c))
    c = small_config(head_chunk=0)
    with pytest.raises(ConfigError, match="head_chunk=0"):
        sampling.make_sampler(c, zeros_transformer(c))
    c = small_config(order="confidence")
    with pytest.raises(ValueError, match="order='confidence'"):
        sampling.make_sampler(c, zeros_transformer(c))
    c = small_config(cfg_schedule="quadratic")
    with pytest.raises(ConfigError, match="cfg_schedule"):
        sampling.make_sampler(c, zeros_transformer(c))


# ---------------------------------------------------------------- categorical filters
def _np_filter(logits, temperature, top_k, top_p):
    x = logits.astype(np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        kth = np.sort(x, axis=-1)[..., -top_k][..., None]
        keep &= x >= kth
    if top_p < 1.0:
        xk = np.where(keep, x, -np.inf)
        for idx in np.ndindex(x.shape[:-1]):
            row = xk[idx]
            order = np.argsort(-row, kind="stable")
            p = np.exp(row[order] - row[order][0])
            p /= p.sum()
            before = np.cumsum(p) - p
            kept = order[before < top_p]
            mask = np.zeros(row.shape, bool)
            mask[kept] = True
            keep[idx] &= mask
    return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.6), (2.0, 4, 0.8), (0.7, 1, 0.3)])
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.random.RandomState(0).normal(0, 2.0, (5, 9)).astype(np.float32)
    out = np.asarray(jax.jit(sampling.filter_logits, static_argnums=(1, 2, 3))(
        jnp.asarray(logits), temperature, top_k, top_p))
    keep = _np_filter(logits, temperature, top_k, top_p)
    neg = np.finfo(np.float32).min
    np.testing.assert_array_equal(out == neg, ~keep)
    np.testing.assert_allclose(out[keep], (logits / temperature)[keep], rtol=1e-6)
    # Gumbel-max over the filtered logits (as the sampler draws) never picks a removed token
    g = np.random.RandomState(1).gumbel(size=(200,) + out.shape).astype(np.float32)
    draws = np.argmax(out[None] + g, axis=-1)  # [200, 5]
    assert keep[np.arange(5)[None], draws].all()


# --------------------------------------------------------------------- reveal counts
@pytest.mark.parametrize("schedule", ["exp", "cosine", "linear"])
def test_reveal_count_expectation_matches_schedule(schedule):
    """E[count_k] = N (gamma(t_k) - gamma(t_{k+1})) / gamma(t_0) within 3 standard errors.

    (Each token is masked at t_k with probability gamma(t_k) / gamma(t_0): all N start
    masked; gamma(1) = 1 for cosine/linear, 0.9933 for exp.) Four steps at N = 256 keep the
    "at least 1 per step" rule's effect below 0.2 standard errors; the exact moments with
    that rule are checked too.
    """
    c = small_config("categorical", side=16, num_iter=4, schedule=schedule, cfg_scale=1.0)
    n, runs = 256, 400
    sampler = sampling.make_sampler(c, zeros_transformer(c))
    _, info = run_many(sampler, random_params(c), jnp.zeros((1,), jnp.int32), runs, seed=1)
    counts = np.asarray(info["reveal_counts"])  # [runs, K]
    assert (counts.sum(1) == n).all() and (counts >= 1).all()
    assert (np.asarray(info["masked_left"]) == 0).all()
    g = schedule_from_config(c.sample).gamma(sampling.time_grid(c.sample), np)
    closed = n * (g[:-1] - g[1:]) / g[0]
    closed[-1] = n * g[-2] / g[0]
    mean, se = counts.mean(0), counts.std(0, ddof=1) / np.sqrt(runs)
    assert (np.abs(mean - closed) < 3 * se).all(), (mean, closed, se)
    exact_mean, exact_var, _ = exact_count_moments(sampling.reveal_probabilities(c.sample), n)
    assert (np.abs(mean - exact_mean) < 3 * np.sqrt(exact_var / runs)).all()
    np.testing.assert_allclose(exact_mean, closed, atol=0.02)


@pytest.fixture(scope="module")
def chunked_runs():
    """exp, 16 steps, N = 256, diffusion head run in chunks of 16 tokens per sample."""
    c = small_config("diffusion", side=16, num_iter=16, cfg_scale=1.0, solver_steps=1,
                     solver_order=1, head_capacity="auto", head_chunk=16)
    sampler = sampling.make_sampler(c, zeros_transformer(c))
    return c, run_many(sampler, random_params(c), jnp.zeros((1,), jnp.int32), 200, 2)


def test_reveal_counts_with_at_least_one_rule_match_exact_distribution(chunked_runs):
    """16 steps at N = 256: early steps expect < 1 token, so the >= 1 rule matters."""
    c, (_, info) = chunked_runs
    counts = np.asarray(info["reveal_counts"])
    runs = counts.shape[0]
    assert (counts.sum(1) == 256).all() and (counts >= 1).all()
    mean, var, final = exact_count_moments(sampling.reveal_probabilities(c.sample), 256)
    assert final[0] == pytest.approx(1.0)
    assert mean[0] > 0.99  # the rule, not the schedule (0.63 expected), drives step 0
    assert (np.abs(counts.mean(0) - mean) < 3 * np.sqrt(var / runs)).all()


def test_chunked_head_fills_every_revealed_token(chunked_runs):
    """Late steps reveal up to ~100 tokens: several chunks of 16, all written.

    (That chunked and 'full' heads give the same counts and tokens for the same key is
    checked in test_dpm_solver_cfg_is_eps_u_plus_w_times_c_minus_u.)"""
    c, (tokens, info) = chunked_runs
    assert (np.asarray(info["masked_left"]) == 0).all()
    assert np.asarray(info["reveal_counts"])[:, -1].max() > 3 * 16
    tokens = np.asarray(tokens)  # [runs, 1, N, C]
    assert np.isfinite(tokens).all()
    # zero-initialised tokens stay exactly zero only where the head never wrote
    assert (np.abs(tokens).sum(-1) > 0).all()


# ------------------------------------------------- interval CFG, confidence order, NFE
def recording_transformer(config, log):
    """z = params['test_z'] for every row; logs (batch size, mask) of every call, in order."""
    def record(batch, mask):
        log.append((int(batch), np.asarray(mask)))
        return np.int32(0)

    def fn(params, tokens, mask, labels):
        dep = io_callback(record, jax.ShapeDtypeStruct((), jnp.int32),
                          jnp.int32(tokens.shape[0]), mask, ordered=True)
        z = params["test_z"]
        z = jnp.tile(z, (tokens.shape[0] // z.shape[0], tokens.shape[1] // z.shape[1], 1))
        return z + dep.astype(jnp.float32)
    return fn


def test_interval_cfg_passes_nfe_and_confidence_order():
    b, side = 2, 8
    c = small_config("categorical", side=side, num_iter=16, cfg_scale=4.0, cfg_t_min=0.1,
                     cfg_t_max=0.3, order="confidence", choice_temperature=0.0, top_k=1)
    n = side * side
    z = jax.random.normal(jax.random.key(5), (b, n, c.model.width))
    params = random_params(c, test_z=z)
    log = []
    tokens, info = sampling.make_sampler(c, recording_transformer(c, log))(
        params, jnp.arange(b), jax.random.key(3))
    jax.effects_barrier()
    guided = sampling.guided_steps(c.sample)
    assert [x[0] for x in log] == [2 * b if g else b for g in guided]
    assert int(info["nfe"]) == sampling.expected_nfe(c.sample) == 19
    assert sum(x[0] for x in log) == b * 19

    # confidence order: after step k exactly min(ceil(N gamma(s)), masked - 1) stay masked
    masks = np.stack([x[1][:b] for x in log] + [np.zeros((b, n), bool)])  # [K + 1, B, N]
    left = masks.sum(-1)
    assert (left == left[:, :1]).all()  # same count in every row
    g_s = schedule_from_config(c.sample).gamma(sampling.time_grid(c.sample)[1:], np)
    want, m = [], n
    for k in range(16):
        m = 0 if k == 15 else min(int(np.ceil(n * g_s[k])), m - 1)
        want.append(m)
    np.testing.assert_array_equal(left[1:, 0], want)
    np.testing.assert_array_equal(np.asarray(info["reveal_counts"]), -np.diff(left[:, 0]))
    # choice_temperature 0, greedy tokens: positions are revealed by decreasing confidence
    model = build_model(c)
    logits = model.apply({"params": params}, z, method="logits")
    conf = np.asarray(jnp.max(jax.nn.log_softmax(logits, -1), -1))  # [B, N]
    step_of = np.argmax(~masks[1:], axis=0)  # step at which each position was revealed
    for row in range(b):
        assert _sorted_within_steps(conf[row], step_of[row])
    np.testing.assert_array_equal(tokens, np.asarray(jnp.argmax(logits, -1)))


def _sorted_within_steps(conf, step_of):
    """Every token revealed at step k is at least as confident as any revealed later."""
    for k in np.unique(step_of):
        now, later = conf[step_of == k], conf[step_of > k]
        if later.size and now.min() < later.max() - 1e-6:
            return False
    return True


def test_cfg_scale_one_makes_no_unconditional_pass():
    b = 3
    c = small_config("categorical", side=8, num_iter=8, cfg_scale=1.0, cfg_t_min=0.0,
                     cfg_t_max=1.0)
    params = random_params(c, test_z=jnp.zeros((1, 1, c.model.width)))
    log = []
    _, info = sampling.make_sampler(c, recording_transformer(c, log))(
        params, jnp.arange(b), jax.random.key(0))
    jax.effects_barrier()
    assert [x[0] for x in log] == [b] * 8
    assert int(info["nfe"]) == 8 == sampling.expected_nfe(c.sample)


# ------------------------------------------------------------ diffusion head: CFG, DDPM
def affine_head_params(config, seed=0, **extra):
    """Head params that make eps(x, t, z) affine in z for fixed (x, t).

    Residual gates are 0 (blocks are identities); cond_embed is the identity plus a bias of
    60 so silu(y) = y to float precision; the final adaLN and output layers are random. Then
    eps(x, t, z) = LN(h(x)) (1 + S y(t, z)) L + (S' y(t, z)) L + b with y affine in z.
    """
    p = random_params(config, seed, **extra)
    net = jax.tree_util.tree_map(lambda a: a, p["diffloss"]["net"])
    rs = np.random.RandomState(seed + 1)
    for name in net:
        if name.startswith("res_blocks_"):
            blk = net[name]["adaLN_modulation_1"]
            net[name]["adaLN_modulation_1"] = {k: jnp.zeros_like(v) for k, v in blk.items()}
    w = net["cond_embed"]["kernel"].shape
    net["cond_embed"] = {"kernel": jnp.eye(*w), "bias": jnp.full((w[1],), 60.0)}
    fl = net["final_layer"]
    fl["adaLN_modulation_1"] = {
        "kernel": jnp.asarray(rs.normal(0, 0.01, fl["adaLN_modulation_1"]["kernel"].shape),
                              jnp.float32),
        "bias": jnp.zeros_like(fl["adaLN_modulation_1"]["bias"])}
    fl["linear"] = {"kernel": jnp.asarray(rs.normal(0, 0.1, fl["linear"]["kernel"].shape),
                                          jnp.float32),
                    "bias": jnp.asarray(rs.normal(0, 0.1, fl["linear"]["bias"].shape),
                                        jnp.float32)}
    p["diffloss"] = {"net": net}
    return p


def labelled_transformer(params, tokens, mask, labels):
    """z_c for labelled rows, z_u for the unconditional rows (labels < 0)."""
    reps = (tokens.shape[0] // params["test_zc"].shape[0], 1, 1)
    cond = (labels >= 0)[:, None, None]
    return jnp.where(cond, jnp.tile(params["test_zc"], reps), jnp.tile(params["test_zu"], reps))


def test_dpm_solver_cfg_is_eps_u_plus_w_times_c_minus_u():
    """With an affine head, guided eps(z_c, z_u) = eps(z_u + w (z_c - z_u)): a guided run
    must equal an unguided run fed z_g = z_u + w (z_c - z_u), on the same rng.

    The guided run calls the head once on all N per step ('full'), the unguided one in
    chunks of 2 tokens per sample: head noise is drawn per position, so the chunking must
    not change the sample.
    """
    b, w = 2, 3.0
    c_cfg = small_config("diffusion", side=4, num_iter=8, cfg_scale=w, cfg_t_min=0.0,
                         cfg_t_max=1.0, solver_steps=2, solver_order=1, head_capacity="full")
    c_one = small_config("diffusion", side=4, num_iter=8, cfg_scale=1.0, solver_steps=2,
                         solver_order=1, head_capacity="auto", head_chunk=2)
    assert sampling.guided_steps(c_cfg.sample).all()
    assert sampling.make_plan(c_cfg.sample, 16).chunk == 16
    assert sampling.make_plan(c_one.sample, 16).chunk == 2
    n, d = seq_len(c_cfg), c_cfg.model.width
    zc = jax.random.normal(jax.random.key(1), (b, n, d))
    zu = jax.random.normal(jax.random.key(2), (b, n, d))
    zg = zu + w * (zc - zu)
    labels, rng = jnp.arange(b), jax.random.key(7)
    guided_run = sampling.make_sampler(c_cfg, labelled_transformer)
    plain_run = sampling.make_sampler(c_one, labelled_transformer)
    tok_cfg, info = guided_run(affine_head_params(c_cfg, test_zc=zc, test_zu=zu), labels, rng)
    tok_g, info_g = plain_run(affine_head_params(c_cfg, test_zc=zg, test_zu=zg), labels, rng)
    tok_c, _ = plain_run(affine_head_params(c_cfg, test_zc=zc, test_zu=zc), labels, rng)
    assert int(info["nfe"]) == 16 and int(info_g["nfe"]) == 8
    np.testing.assert_array_equal(info["reveal_counts"], info_g["reveal_counts"])
    tok_cfg, tok_g, tok_c = map(np.asarray, (tok_cfg, tok_g, tok_c))
    scale = np.abs(tok_g).max()
    np.testing.assert_allclose(tok_cfg, tok_g, atol=2e-5 * scale, rtol=0)
    # and guidance changed the sample far beyond that tolerance
    assert np.abs(tok_cfg - tok_c).max() > 1e-2 * scale


# ------------------------------------- real tiny model: DDPM, compile once, sharding
# Both configs run on one device here and on a 4-device mesh in a subprocess started when
# this module starts (so its compilation overlaps the tests in between).
def ddpm_config():
    """Diffusion head, DDPM with temperature, interval CFG with the linear w schedule."""
    return small_config("diffusion", side=4, num_iter=6, head_sampler="ddpm", ddpm_steps=4,
                        temperature=0.7, cfg_scale=2.5, cfg_t_min=0.3, cfg_t_max=0.8,
                        cfg_schedule="linear", head_capacity="full")


def categorical_config():
    """Categorical head, MaskGIT confidence order, top-k / top-p, interval CFG."""
    return small_config("categorical", side=4, num_iter=6, order="confidence",
                        choice_temperature=2.0, temperature=0.9, top_k=5, top_p=0.9,
                        cfg_scale=3.0, cfg_t_min=0.3, cfg_t_max=0.8)


REAL_CONFIGS = {"ddpm": ddpm_config, "categorical": categorical_config}
REAL_LABELS = np.array([1, 2, 3, 4], np.int32)
REAL_KEY = 11

SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, {root!r})
    from tests.test_sampling import REAL_CONFIGS, REAL_KEY, REAL_LABELS, random_params
    from emigm_jax import sampling
    assert len(jax.devices()) == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    out = {{}}
    for name, make in REAL_CONFIGS.items():
        c = make()
        labels = jax.device_put(jnp.asarray(REAL_LABELS), NamedSharding(mesh, P("data")))
        params = jax.device_put(random_params(c, seed=3), NamedSharding(mesh, P()))
        tokens, info = sampling.sample(params, labels, jax.random.key(REAL_KEY), c)
        assert len(tokens.sharding.device_set) == 4, tokens.sharding
        out[name + "_tokens"] = np.asarray(tokens)
        out[name + "_counts"] = np.asarray(info["reveal_counts"])
        out[name + "_nfe"] = int(info["nfe"])
    np.savez({out!r}, **out)
""")


@pytest.fixture(scope="module", autouse=True)
def sharded_run(tmp_path_factory):
    """Starts the 4-device subprocess at module start; yields (Popen, output path)."""
    out = str(tmp_path_factory.mktemp("sharded") / "sharded.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", SHARDED_SCRIPT.format(root=ROOT, out=out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def single_device_runs():
    out = {}
    for name, make in REAL_CONFIGS.items():
        c = make()
        params = random_params(c, seed=3)
        tokens, info = sampling.sample(params, jnp.asarray(REAL_LABELS),
                                       jax.random.key(REAL_KEY), c)
        out[name] = (c, params, np.asarray(tokens), info)
    return out


def test_ddpm_path_with_temperature_and_cfg(single_device_runs):
    c, params, t1, i1 = single_device_runs["ddpm"]
    assert t1.shape == (4, seq_len(c), token_dim(c)) and np.isfinite(t1).all()
    assert int(i1["nfe"]) == sampling.expected_nfe(c.sample) == 6 + 3  # s = 2/3, 1/2, 1/3
    assert int(i1["masked_left"]) == 0 and int(np.sum(i1["reveal_counts"])) == seq_len(c)


def test_categorical_real_model_and_compile_once(single_device_runs):
    c, params, t1, i1 = single_device_runs["categorical"]
    assert t1.shape == (4, seq_len(c)) and t1.dtype == np.int32
    assert ((t1 >= 0) & (t1 < c.model.vocab_size)).all()
    assert int(i1["nfe"]) == sampling.expected_nfe(c.sample) == 9
    # a second batch (other labels, other key, a fresh but equal config) reuses the program
    t2, _ = sampling.sample(params, jnp.asarray([5, 6, 7, 8]), jax.random.key(12),
                            categorical_config())
    t3, _ = sampling.sample(params, jnp.asarray(REAL_LABELS), jax.random.key(REAL_KEY),
                            categorical_config())
    assert sampling.make_sampler(categorical_config())._cache_size() == 1
    assert not np.array_equal(t1, np.asarray(t2))
    np.testing.assert_array_equal(t1, np.asarray(t3))  # same key, same tokens


def test_tokens_identical_on_one_and_four_sharded_devices(single_device_runs, sharded_run):
    """Same key -> same tokens with the batch sharded over 4 devices (threefry is
    partitionable). Discrete outputs are bit-identical; continuous tokens agree to float
    rounding (each device runs the matmuls at batch 1 instead of 4, and the random-weight
    DDPM head amplifies last-bit differences), with identical reveal counts."""
    proc, out = sharded_run
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    res = np.load(out)
    for name in REAL_CONFIGS:
        _, _, single, info = single_device_runs[name]
        assert int(res[name + "_nfe"]) == int(info["nfe"])
        np.testing.assert_array_equal(res[name + "_counts"], np.asarray(info["reveal_counts"]))
    np.testing.assert_array_equal(res["categorical_tokens"], single_device_runs["categorical"][2])
    ddpm = single_device_runs["ddpm"][2]
    np.testing.assert_allclose(res["ddpm_tokens"], ddpm, rtol=1e-5,
                               atol=1e-6 * np.abs(ddpm).max())
