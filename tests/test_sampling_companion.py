"""Companion-paper sampler switches (DI and BAG papers), categorical head.

Oracles: the default sampler itself (every off-switch must give the same tokens bit for
bit from the same key), closed forms of the reveal rules (ceil(N gamma(s_k)) masked after
count step k, DI's Euler probability), numpy float64 versions of DI eq. 5 and BAG eqs. 1-3.
A trivial ``transformer_fn`` (z read from the params pytree) keeps every compile small.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from emigm_jax import sampling
from emigm_jax.config_validation import ConfigError
from emigm_jax.models import build_model, seq_len
from emigm_jax.schedules import schedule_from_config
from tests.test_sampling import random_params, recording_transformer, small_config


def z_transformer(params, tokens, mask, labels):
    """z = params['test_zc'] for labelled rows, params['test_zu'] for labels < 0."""
    reps = (tokens.shape[0] // params["test_zc"].shape[0], 1, 1)
    cond = (labels >= 0)[:, None, None]
    return jnp.where(cond, jnp.tile(params["test_zc"], reps), jnp.tile(params["test_zu"], reps))


def z_params(c, b, seed=0, scale=3.0):
    n, d = seq_len(c), c.model.width
    zc = scale * jax.random.normal(jax.random.key(seed), (b, n, d))
    zu = scale * jax.random.normal(jax.random.key(seed + 1), (b, n, d))
    return random_params(c, seed=seed, test_zc=zc, test_zu=zu)


def model_logits(c, params, z):
    return np.asarray(build_model(c).apply({"params": params}, z, method="logits"), np.float64)


def run(c, params, labels, key=0):
    tokens, info = sampling.make_sampler(c, z_transformer)(params, labels, jax.random.key(key))
    return np.asarray(tokens), info


OFF = dict(final_argmax=False, cfg_space="logits", gumbel_anneal="linear", noise_reg="abs_cos",
           noise_reg_scale=0.0, diff_frac=0.0, argmax_from=-1, z_sampling="none", z_steps=-1)


# ------------------------------------------------------------------------- off == today
@pytest.mark.parametrize("order,reveal", [("random", "bernoulli"), ("confidence", "count")])
def test_off_switches_reproduce_default_sampler_bit_for_bit(order, reveal):
    b = 2
    kw = dict(side=4, num_iter=6, order=order, cfg_scale=3.0, cfg_t_min=0.2, cfg_t_max=0.9,
              temperature=1.3, top_p=0.9, choice_temperature=2.0)
    base = small_config("categorical", **kw)
    # "without the fields": drop them even once configs/base.py defines them
    base.sample = ml_collections.ConfigDict(
        {k: v for k, v in base.sample.to_dict().items() if k not in OFF and k != "reveal"})
    assert "reveal" not in base.sample and "diff_frac" not in base.sample
    params = z_params(base, b)
    labels = jnp.arange(b)
    t0, i0 = run(base, params, labels, key=4)
    for extra in (OFF, dict(OFF, reveal=reveal), dict(reveal="auto")):
        t1, i1 = run(small_config("categorical", **kw, **extra), params, labels, key=4)
        np.testing.assert_array_equal(t1, t0)
        np.testing.assert_array_equal(i1["reveal_counts"], i0["reveal_counts"])
        assert int(i1["nfe"]) == int(i0["nfe"])
    # and the switches do act: noise_reg on changes the sample
    t2, _ = run(small_config("categorical", **kw, noise_reg="abs_cos"), params, labels, key=4)
    assert not np.array_equal(t2, t0)


def test_bad_switch_values_raise_clear_errors():
    for field, value, msg in [("reveal", "exact", "reveal='exact'"),
                              ("cfg_space", "eps", "cfg_space='eps'"),
                              ("noise_reg", "cos", "noise_reg='cos'"),
                              ("gumbel_anneal", "cosine", "gumbel_anneal='cosine'"),
                              ("diff_frac", 1.5, "diff_frac=1.5"),
                              ("argmax_from", -3, "argmax_from=-3")]:
        c = small_config("categorical", **{field: value})
        with pytest.raises(ConfigError, match=msg):
            sampling.make_sampler(c, z_transformer)
    for field, value in [("final_argmax", True), ("diff_frac", 0.5), ("cfg_space", "probs")]:
        with pytest.raises(ConfigError, match=field):
            sampling.companion_options(small_config("diffusion", **{field: value}).sample,
                                       categorical=False)


# --------------------------------------------------------------------------- reveal rules
def test_euler_reveal_probability_closed_form():
    sc = small_config("categorical", num_iter=5, schedule="cosine", t_end=1e-5,
                      reveal="euler").sample
    a, b = sampling.time_grid(sc)[:-1], sampling.time_grid(sc)[1:]
    g = np.cos(0.5 * np.pi * (1 - a))
    dg = 0.5 * np.pi * np.sin(0.5 * np.pi * (1 - a))
    want = np.clip((a - b) * dg / g, 0, 1)
    want[-1] = 1.0
    np.testing.assert_allclose(sampling.reveal_probabilities(sc), want, rtol=1e-12)
    # linear: Euler == exact (gamma(a) - gamma(b)) / gamma(a)
    lin = small_config("categorical", num_iter=7, schedule="linear", reveal="euler").sample
    lin_b = small_config("categorical", num_iter=7, schedule="linear").sample
    np.testing.assert_allclose(sampling.reveal_probabilities(lin),
                               sampling.reveal_probabilities(lin_b), rtol=1e-12)
    # pow rho < 1: gamma'(1) = inf -> clipped to 1
    p = sampling.reveal_probabilities(small_config("categorical", num_iter=4, schedule="pow",
                                                   pow_rho=0.5, reveal="euler").sample)
    assert p[0] == 1.0 and np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize("order", ["random", "confidence"])
def test_count_reveal_leaves_ceil_gamma_n_masked(order):
    """After step k, ceil(N gamma(s_k)) stay masked, s_k = t_{k+1}; the last step: 0."""
    c = small_config("categorical", side=8, num_iter=8, schedule="cosine", reveal="count",
                     order=order, cfg_scale=1.0)
    n = seq_len(c)
    _, info = run(c, z_params(c, 2), jnp.arange(2))
    g_s = schedule_from_config(c.sample).gamma(sampling.time_grid(c.sample)[1:], np)
    want = np.ceil(n * g_s - 1e-9).astype(int)
    want[-1] = 0
    assert np.all(np.diff(np.concatenate([[n], want])) < 0)  # the >= 1 rule never binds
    left = n - np.cumsum(np.asarray(info["reveal_counts"]))
    np.testing.assert_array_equal(left, want)
    assert int(info["masked_left"]) == 0


def test_euler_reveal_runs_and_reveals_all():
    c = small_config("categorical", side=4, num_iter=5, reveal="euler", cfg_scale=1.0)
    tokens, info = run(c, z_params(c, 2), jnp.arange(2))
    assert int(info["masked_left"]) == 0 and int(np.sum(info["reveal_counts"])) == 16
    assert np.all(np.asarray(info["reveal_counts"]) >= 1)


# ---------------------------------------------------------------- token-choice switches
@pytest.mark.parametrize("num_iter", [1, 3])
def test_final_argmax_takes_argmax_and_leaves_no_mask(num_iter):
    b = 2
    c = small_config("categorical", side=4, num_iter=num_iter, final_argmax=True,
                     temperature=5.0, cfg_scale=1.0)
    params = z_params(c, b)
    tokens, info = run(c, params, jnp.arange(b))
    assert int(info["masked_left"]) == 0
    greedy = np.argmax(model_logits(c, params, params["test_zc"]), -1)
    if num_iter == 1:  # everything revealed at the (only, last) step
        np.testing.assert_array_equal(tokens, greedy)
    else:  # at temperature 5, some earlier draws are not the argmax
        assert not np.array_equal(tokens, greedy)


def test_argmax_from_zero_is_greedy_everywhere():
    b = 2
    c = small_config("categorical", side=4, num_iter=4, argmax_from=0, temperature=5.0,
                     cfg_scale=1.0)
    params = z_params(c, b)
    tokens, _ = run(c, params, jnp.arange(b))
    np.testing.assert_array_equal(tokens, np.argmax(model_logits(c, params, params["test_zc"]),
                                                    -1))


def test_cfg_probs_closed_form_and_sampler_greedy():
    rs = np.random.RandomState(0)
    lc, lu = rs.normal(0, 2, (3, 5, 7)), rs.normal(0, 2, (3, 5, 7))
    w = 3.0
    sm = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    mix = np.maximum(sm(lu) + w * (sm(lc) - sm(lu)), 0)
    mix /= mix.sum(-1, keepdims=True)
    assert (mix == 0).any()  # w = 3 gives negative mass: the clip matters
    out = np.asarray(sampling.cfg_probs_logits(jnp.asarray(lc, jnp.float32),
                                               jnp.asarray(lu, jnp.float32), w))
    np.testing.assert_allclose(sm(out.astype(np.float64)), mix, atol=1e-6)
    # in the sampler (one guided step, top_k = 1): tokens = argmax of the mixture
    b = 2
    c = small_config("categorical", side=4, num_iter=1, cfg_space="probs", cfg_scale=w,
                     cfg_t_min=0.0, cfg_t_max=1.0, top_k=1, t_end=0.05)
    params = z_params(c, b)
    tokens, info = run(c, params, jnp.arange(b))
    assert int(info["nfe"]) == 2
    pc = sm(model_logits(c, params, params["test_zc"]))
    pu = sm(model_logits(c, params, params["test_zu"]))
    np.testing.assert_array_equal(tokens, np.argmax(pu + w * (pc - pu), -1))


def test_gumbel_anneal_none_is_constant():
    k = np.arange(6)
    np.testing.assert_allclose(sampling.gumbel_scale(4.5, k, 6, "none"), np.full(6, 4.5))
    np.testing.assert_allclose(sampling.gumbel_scale(4.5, k, 6, "linear"),
                               4.5 * (1 - (k + 1) / 6))
    c = small_config("categorical", side=4, num_iter=4, order="confidence",
                     gumbel_anneal="none", cfg_scale=1.0)
    _, info = run(c, z_params(c, 2), jnp.arange(2))
    assert int(info["masked_left"]) == 0


def test_noise_reg_strength_closed_form():
    r = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(sampling.noise_reg_strength("abs_cos", jnp.asarray(r)),
                               np.abs(np.cos(np.pi * r)), atol=1e-6)
    np.testing.assert_allclose(sampling.noise_reg_strength("half_abs_cos", jnp.asarray(r)),
                               0.5 * np.abs(np.cos(np.pi * r)), atol=1e-6)
    np.testing.assert_allclose(sampling.noise_reg_strength("none", jnp.asarray(r)), 0.0)


def test_noise_reg_huge_scale_dominates_logits():
    """scale 1e4 at r = 0 (I = 1): the draw is the argmax of the noise, not of the model."""
    b = 2
    c = small_config("categorical", side=4, num_iter=1, noise_reg="abs_cos",
                     noise_reg_scale=1e4, argmax_from=0, cfg_scale=1.0)
    params = z_params(c, b)
    tokens, _ = run(c, params, jnp.arange(b), key=9)
    key0 = jax.random.split(jax.random.key(9), (1, 2))[0, 0]
    n, v = seq_len(c), c.model.vocab_size
    eps = np.asarray(jax.random.normal(jax.random.fold_in(key0, 1), (b * n * v,))).reshape(b, n, v)
    logits = model_logits(c, params, params["test_zc"])
    np.testing.assert_array_equal(tokens, np.argmax(logits + 1e4 * eps, -1))


def test_differential_draw_matches_numpy():
    rs = np.random.RandomState(3)
    b, n, v, frac = 2, 6, 5, 0.5
    filtered = rs.normal(0, 1.5, (b, n, v)).astype(np.float32)
    p_prev = rs.dirichlet(np.ones(v), (b, n)).astype(np.float32)
    # KL = 0 and |p_k - p_{k-1}| sums to 0 at (0, 1): chosen first, falls back to p_k
    p_prev[0, 1] = np.asarray(jax.nn.softmax(jnp.asarray(filtered), axis=-1))[0, 1]
    mask = np.ones((b, n), bool)
    mask[:, 0] = False
    g = rs.gumbel(size=(b, n, v)).astype(np.float32)
    drawn = rs.randint(0, v, (b, n))
    out, p_now = sampling.differential_draw(jnp.asarray(filtered), jnp.asarray(p_prev),
                                            jnp.asarray(g), jnp.asarray(mask), 1.0, frac,
                                            jnp.asarray(drawn))
    out = np.asarray(out)
    p = np.exp(filtered.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(p_now), p, rtol=1e-5)
    kl = (p * (np.log(p) - np.log(p_prev))).sum(-1)
    for row in range(b):
        masked = np.flatnonzero(mask[row])
        n_sel = int(np.floor(frac * masked.size))
        sel = masked[np.argsort(kl[row, masked], kind="stable")[:n_sel]]
        assert n_sel == 2 and (row == 1 or 1 in sel)
        for j in range(n):
            if j in sel:
                d = np.abs(p[row, j] - p_prev[row, j])
                pt = p[row, j] if (row, j) == (0, 1) else d / d.sum()
                want = np.argmax(np.log(np.maximum(pt, 1e-300)) + g[row, j])
            else:
                want = drawn[row, j]
            assert out[row, j] == want, (row, j)
    # step 0: no previous step, nothing changes
    out0, _ = sampling.differential_draw(jnp.asarray(filtered), jnp.asarray(p_prev),
                                         jnp.asarray(g), jnp.asarray(mask), 0.0, frac,
                                         jnp.asarray(drawn))
    np.testing.assert_array_equal(np.asarray(out0), drawn)


def test_differential_sampling_runs_in_the_scan():
    c = small_config("categorical", side=4, num_iter=5, diff_frac=0.75, cfg_scale=1.0)
    base = small_config("categorical", side=4, num_iter=5, cfg_scale=1.0)
    params = z_params(c, 2)
    t1, info = run(c, params, jnp.arange(2), key=2)
    t0, info0 = run(base, params, jnp.arange(2), key=2)
    assert int(info["masked_left"]) == 0
    assert ((t1 >= 0) & (t1 < c.model.vocab_size)).all()
    np.testing.assert_array_equal(info["reveal_counts"], info0["reveal_counts"])


# ----------------------------------------------------------------------------- Z-sampling
@pytest.mark.parametrize("mode,z_steps", [("masked", -1), ("random", 2), ("recover", 3)])
def test_z_sampling_nfe_matches_expected_and_passes_run(mode, z_steps):
    """info['nfe'] == expected_nfe == the forward passes actually run (logged per call)."""
    b, k = 2, 5
    c = small_config("categorical", side=4, num_iter=k, reveal="count", cfg_scale=3.0,
                     cfg_t_min=0.3, cfg_t_max=0.7, z_sampling=mode, z_steps=z_steps)
    guided = sampling.guided_steps(c.sample).astype(int)
    assert guided.tolist() == [0, 1, 1, 0, 0]
    zig = np.arange(k) < (k if z_steps == -1 else z_steps)
    want = (1 + guided) + zig * ((mode == "masked") + 1 + guided)
    np.testing.assert_array_equal(sampling.step_nfe(c.sample), want)
    assert sampling.expected_nfe(c.sample) == want.sum()
    z = jax.random.normal(jax.random.key(5), (b, seq_len(c), c.model.width))
    log = []
    _, info = sampling.make_sampler(c, recording_transformer(c, log))(
        random_params(c, test_z=z), jnp.arange(b), jax.random.key(3))
    jax.effects_barrier()
    assert int(info["nfe"]) == sampling.expected_nfe(c.sample)
    assert sum(x[0] for x in log) == b * sampling.expected_nfe(c.sample)
    assert int(info["masked_left"]) == 0
    # count reveal: the redone step restores the schedule's count, min(ceil(N g), m - 1)
    g_s = schedule_from_config(c.sample).gamma(sampling.time_grid(c.sample)[1:], np)
    want_left, m = [], 16
    for step in range(k):
        m = 0 if step == k - 1 else min(int(np.ceil(16 * g_s[step] - 1e-9)), m - 1)
        want_left.append(m)
    np.testing.assert_array_equal(16 - np.cumsum(np.asarray(info["reveal_counts"])), want_left)


def test_z_sampling_off_and_none_expected_nfe_unchanged():
    c = small_config("categorical", num_iter=16, cfg_scale=4.0)
    assert sampling.expected_nfe(c.sample) == 19
    c.sample.z_sampling = "none"
    c.sample.z_steps = 4
    assert sampling.expected_nfe(c.sample) == 19
    c.sample.z_sampling = "masked"
    assert sampling.expected_nfe(c.sample) == 19 + 4 * 2
    with pytest.raises(ConfigError, match="z_steps=-2"):
        sampling.z_sampling_steps(small_config("categorical", z_sampling="masked",
                                               z_steps=-2).sample)


def state_recorder(log):
    """z = params['test_z'] for every call; logs (mask, tokens) of every call in order."""
    from jax.experimental import io_callback

    def record(mask, tokens):
        log.append((np.asarray(mask), np.asarray(tokens)))
        return np.int32(0)

    def fn(params, tokens, mask, labels):
        dep = io_callback(record, jax.ShapeDtypeStruct((), jnp.int32), mask, tokens,
                          ordered=True)
        return params["test_z"] + dep.astype(jnp.float32)
    return fn


@pytest.mark.parametrize("mode", ["masked", "recover"])
def test_z_sampling_remasks_lowest_logprob_or_same_mask(mode):
    b, k = 2, 4
    c = small_config("categorical", side=4, num_iter=k, reveal="count", schedule="linear",
                     cfg_scale=1.0, temperature=3.0, z_sampling=mode)
    z = 3.0 * jax.random.normal(jax.random.key(8), (b, seq_len(c), c.model.width))
    params = random_params(c, test_z=z)
    log = []
    _, info = sampling.make_sampler(c, state_recorder(log))(params, jnp.arange(b),
                                                             jax.random.key(1))
    jax.effects_barrier()
    per = 3 if mode == "masked" else 2
    assert len(log) == per * k == int(info["nfe"])
    logp = np.log(np.asarray(jax.nn.softmax(jnp.asarray(model_logits(c, params, z)), -1)))
    for step in range(k - 1):  # the last step reveals everything: nothing left to check
        first, *rest = log[per * step: per * (step + 1)]
        redo_mask = rest[-1][0]
        assert (redo_mask.sum(1) == first[0].sum(1)).all()  # back to the previous count
        if mode == "recover":
            np.testing.assert_array_equal(redo_mask, first[0])
            continue
        mask1, tokens1 = rest[0]
        assert (mask1.sum(1) < first[0].sum(1)).all() and (redo_mask >= mask1).all()
        score = np.take_along_axis(logp, tokens1[..., None], -1)[..., 0]  # [B, N]
        for row in range(b):
            remasked = redo_mask[row] & ~mask1[row]
            kept = ~redo_mask[row]
            if kept.any():
                assert score[row][remasked].max() <= score[row][kept].min() + 1e-5
