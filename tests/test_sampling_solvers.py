"""BAG's momentum solver (sample.mgt_solver) and guided masked-Z scoring (sample.z_cfg):
closed forms, NFE accounting, and off-switches equal to the plain sampler bit for bit."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from emigm_jax import sampling
from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.models import random_params, seq_len
from tests.conftest import tiny_config

NEW_SWITCHES = ("mgt_solver", "z_cfg", "ar_prefix", "ar_workdir")


def cat_config(**sample):
    """16 tokens over 7 symbols; sample overrides."""
    c = tiny_config("categorical", "single")
    c.model.dec_depth, c.model.buffer_size, c.model.cfg_mode = 0, 1, "fake_class"
    s = c.sample
    s.schedule, s.cfg_t_min, s.cfg_t_max, s.top_k, s.top_p = "cosine", 0.0, 1.0, 0, 1.0
    for k, v in sample.items():
        s[k] = v
    return c


def label_transformer(params, tokens, mask, labels):
    """z depends on the label (guidance matters) and on the state (steps differ)."""
    zc, zu = params["test_zc"], params["test_zu"]
    reps = (tokens.shape[0] // zc.shape[0], 1, 1)
    z = jnp.where((labels >= 0)[:, None, None], jnp.tile(zc, reps), jnp.tile(zu, reps))
    state = jnp.mean(jnp.where(mask, -1.0, tokens.astype(jnp.float32) - 3.0), axis=1)  # [B]
    return z + state[:, None, None] * jnp.roll(z, 1, axis=-1)


def stand_in_params(c, b=3, seed=0):
    n, d = seq_len(c), c.model.width
    p = dict(random_params(c, seed))
    head = p["cat_head"]  # N(0, 0.02) weights give near-uniform logits: make them decisive
    p["cat_head"] = dict(head, out=dict(head["out"], kernel=100.0 * head["out"]["kernel"]))
    p["test_zc"] = 3.0 * jax.random.normal(jax.random.key(seed + 10), (b, n, d))
    p["test_zu"] = 3.0 * jax.random.normal(jax.random.key(seed + 11), (b, n, d))
    return p


def run(c, params, key=0):
    tokens, info = sampling.make_sampler(c, label_transformer)(params, jnp.arange(3),
                                                               jax.random.key(key))
    return np.asarray(tokens), info


@pytest.mark.parametrize("z_sampling", ["none", "masked"])
def test_new_off_switches_reproduce_the_plain_sampler_bit_for_bit(z_sampling):
    kw = dict(num_iter=5, order="confidence", cfg_scale=2.5, z_sampling=z_sampling,
              temperature=1.2)
    plain = cat_config(**kw)
    plain.sample = ml_collections.ConfigDict(
        {k: v for k, v in plain.sample.to_dict().items() if k not in NEW_SWITCHES})
    params = stand_in_params(plain)
    t0, i0 = run(plain, params, key=2)
    t1, i1 = run(cat_config(**kw, mgt_solver="vanilla", z_cfg=0.0, ar_prefix=0.0), params, key=2)
    np.testing.assert_array_equal(t1, t0)
    assert int(i1["nfe"]) == int(i0["nfe"])


def test_momentum_coefficients_closed_form():
    """Linear schedule, uniform grid: sigma steps are equal, so c_k = 1/2 for k >= 1."""
    sc = cat_config(num_iter=4, schedule="linear").sample
    c = sampling.momentum_coefficients(sc)
    np.testing.assert_allclose(c, [0.0, 0.5, 0.5, 0.5], rtol=1e-12)
    # cosine: c_k = (s_k - s_{k+1}) / (2 (s_{k-1} - s_k)), sigma = cos(pi/2 (1 - t))
    sc = cat_config(num_iter=3, schedule="cosine", t_end=0.0).sample
    sig = np.cos(0.5 * np.pi * (1.0 - np.linspace(1.0, 0.0, 4)))
    want = [0.0] + [(sig[k] - sig[k + 1]) / (2 * (sig[k - 1] - sig[k])) for k in (1, 2)]
    np.testing.assert_allclose(sampling.momentum_coefficients(sc), want, rtol=1e-9)


def test_momentum_probs_matches_numpy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=(2, 5))
    q = rng.dirichlet(np.ones(7), size=(2, 5))
    got = np.asarray(sampling.momentum_probs(jnp.asarray(p, jnp.float32),
                                             jnp.asarray(q, jnp.float32), 0.8), np.float64)
    want = np.maximum(p + 0.8 * (p - q), 0.0)
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (want == 0).any()  # the clip binds somewhere in this draw


def test_momentum2_is_vanilla_at_step_zero_and_differs_later():
    params = stand_in_params(cat_config())
    for k, same in ((1, True), (6, False)):
        kw = dict(num_iter=k, order="confidence", cfg_scale=2.0, temperature=1.0)
        t0, i0 = run(cat_config(**kw), params, key=5)
        t1, i1 = run(cat_config(**kw, mgt_solver="momentum2"), params, key=5)
        assert np.array_equal(t0, t1) == same
        np.testing.assert_array_equal(i1["reveal_counts"], i0["reveal_counts"])
        assert int(i1["nfe"]) == int(i0["nfe"]) and int(i1["masked_left"]) == 0


def test_z_cfg_scores_with_guidance_and_counts_the_pass():
    kw = dict(num_iter=4, order="confidence", cfg_scale=2.0, z_sampling="masked", z_steps=2)
    params = stand_in_params(cat_config())
    t0, i0 = run(cat_config(**kw), params, key=7)
    t1, i1 = run(cat_config(**kw, z_cfg=1.0), params, key=7)
    # w = 1: l_u + 1 (l_c - l_u) = l_c, today's score, one unconditional pass more per zigzag
    np.testing.assert_array_equal(t1, t0)
    assert int(i1["nfe"]) == int(i0["nfe"]) + 2
    c3 = cat_config(**kw, z_cfg=4.0)
    t3, i3 = run(c3, params, key=7)
    assert int(i3["nfe"]) == sampling.expected_nfe(c3.sample) == int(i0["nfe"]) + 2
    assert not np.array_equal(t3, t0)
    assert sampling.z_score_passes(c3.sample) == 2
    assert sampling.z_score_passes(cat_config(z_sampling="random", z_cfg=4.0).sample) == 0


def test_bad_solver_values_are_named():
    with pytest.raises(ConfigError, match="sample.mgt_solver='rk4'"):
        validate_config(cat_config(mgt_solver="rk4"))
    with pytest.raises(ConfigError, match="sample.z_cfg=-1.0"):
        sampling.companion_options(cat_config(z_cfg=-1.0).sample)
    with pytest.raises(ConfigError, match="mgt_solver='momentum2' needs token probabilities"):
        sampling.companion_options(cat_config(mgt_solver="momentum2").sample, categorical=False)
