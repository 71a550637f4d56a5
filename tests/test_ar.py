"""The autoregressive model (model.arch='ar'): causality, loss, KV-cached sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax import losses
from emigm_jax.sampling import ar as ar_sampling
from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.models import build_model, init_params, random_params
from emigm_jax.models.ar import init_cache
from tests.conftest import tiny_config


def tiny_ar(pos_emb: str = "rope2d", block: str = "llama"):
    """4x4 grid (16 tokens), vocabulary 7, two causal blocks of width 32 (head dim 8)."""
    c = tiny_config("categorical", "ar")
    m = c.model
    m.dec_depth, m.enc_depth, m.buffer_size = 0, 2, 0
    m.block, m.pos_emb, m.head_mlp = block, pos_emb, False
    c.sample.cfg_scale, c.sample.temperature, c.sample.top_k, c.sample.top_p = 1.0, 1.0, 0, 1.0
    return c


def _tokens(seed, b=3, n=16, v=7):
    return jax.random.randint(jax.random.key(seed), (b, n), 0, v)


@pytest.mark.parametrize("pos_emb", ["rope2d", "learned"])
def test_logits_at_i_depend_only_on_class_and_earlier_tokens(pos_emb):
    c = tiny_ar(pos_emb)
    model, params = build_model(c), random_params(c, seed=1)
    tokens, labels = _tokens(0), jnp.array([1, 4, -1])
    base = np.asarray(model.apply({"params": params}, tokens, labels))
    for j in (0, 5, 15):
        changed = tokens.at[:, j].set((tokens[:, j] + 3) % 7)
        out = np.asarray(model.apply({"params": params}, changed, labels))
        np.testing.assert_array_equal(out[:, :j + 1], base[:, :j + 1])  # x_j feeds i > j only
        if j < 15:
            assert np.abs(out[:, j + 1] - base[:, j + 1]).max() > 1e-4
    other = np.asarray(model.apply({"params": params}, tokens, jnp.array([2, 4, 3])))
    assert np.abs(other[0] - base[0]).max() > 1e-4 and np.abs(other[2] - base[2]).max() > 1e-4
    np.testing.assert_array_equal(other[1], base[1])


@pytest.mark.parametrize("pos_emb", ["rope2d", "learned"])
def test_cached_decode_equals_teacher_forcing_logits(pos_emb):
    c = tiny_ar(pos_emb)
    model, params = build_model(c), random_params(c, seed=2)
    tokens, labels = _tokens(1), jnp.array([0, 9, -1])
    full = np.asarray(model.apply({"params": params}, tokens, labels))  # [B, N, V]
    caches = init_cache(model, 3)
    prev = jnp.zeros((3,), jnp.int32)
    for i in range(16):
        logits, caches = model.apply({"params": params}, prev, labels, jnp.int32(i), caches,
                                     method="decode")
        np.testing.assert_allclose(np.asarray(logits), full[:, i], rtol=1e-5, atol=1e-5)
        prev = tokens[:, i]


def test_next_token_loss_matches_hand_computation():
    """Mean over (b, i) of -log softmax(logits of x_i from the class and x_<i)[x_i], float64,
    with the logits taken from the step-by-step cached decode (an independent code path)."""
    c = tiny_ar()
    model, params = build_model(c), random_params(c, seed=3)
    tokens, labels = _tokens(2), jnp.array([3, 1, 7])
    caches, prev, nll, uni = init_cache(model, 3), jnp.zeros((3,), jnp.int32), [], []
    for i in range(16):
        logits, caches = model.apply({"params": params}, prev, labels, jnp.int32(i), caches,
                                     method="decode")
        lg = np.asarray(logits, np.float64)
        logp = lg - lg.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(3), np.asarray(tokens[:, i])])
        uni.append(-logp.mean(-1))
        prev = tokens[:, i]
    nll, uni = np.mean(nll), np.mean(uni)
    batch = {"tokens": tokens, "label": labels}
    loss, metrics = losses.loss_fn(params, batch, jax.random.key(0), c, train=False)
    np.testing.assert_allclose(float(loss), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["token_loss"]), nll, rtol=1e-5)
    c.train.label_smoothing = 0.1
    loss_s, _ = losses.loss_fn(params, batch, jax.random.key(0), c, train=False)
    np.testing.assert_allclose(float(loss_s), 0.9 * nll + 0.1 * uni, rtol=1e-5)


def test_label_drop_in_training_uses_the_fake_class():
    c = tiny_ar()
    c.model.label_drop_prob = 0.999999
    params = random_params(c, seed=4)
    tokens, labels = _tokens(3), jnp.array([3, 1, 7])
    batch = {"tokens": tokens, "label": labels}
    loss_train, _ = losses.loss_fn(params, batch, jax.random.key(5), c, train=True)
    uncond = {"tokens": tokens, "label": -jnp.ones_like(labels)}
    loss_uncond, _ = losses.loss_fn(params, uncond, jax.random.key(5), c, train=False)
    np.testing.assert_allclose(float(loss_train), float(loss_uncond), rtol=1e-6)


@pytest.mark.parametrize("cfg_scale,top_k,top_p,temperature", [
    (1.0, 0, 1.0, 1.0), (3.0, 4, 0.8, 0.7)])
def test_kv_cached_sampling_equals_uncached_token_for_token(cfg_scale, top_k, top_p,
                                                            temperature):
    c = tiny_ar()
    s = c.sample
    s.cfg_scale, s.top_k, s.top_p, s.temperature = cfg_scale, top_k, top_p, temperature
    params = random_params(c, seed=6)
    labels = jnp.array([0, 3, 5, 9])
    tc, ic = ar_sampling.sample(params, labels, jax.random.key(11), c)
    tu, iu = ar_sampling.sample(params, labels, jax.random.key(11), c, cached=False)
    np.testing.assert_array_equal(np.asarray(tc), np.asarray(tu))
    assert int(ic["nfe"]) == int(iu["nfe"]) == ar_sampling.expected_ar_nfe(s, 16)
    assert int(ic["nfe"]) == (32 if cfg_scale != 1.0 else 16)
    assert len(np.unique(np.asarray(tc))) > 2  # the draw is not degenerate
    t2, _ = ar_sampling.sample(params, labels, jax.random.key(12), c)
    assert (np.asarray(t2) != np.asarray(tc)).any()


def test_partial_sampling_is_the_prefix_of_full_sampling():
    c = tiny_ar()
    params = random_params(c, seed=7)
    labels = jnp.array([1, 2])
    full, _ = ar_sampling.sample(params, labels, jax.random.key(3), c)
    part, info = ar_sampling.sample(params, labels, jax.random.key(3), c, num_tokens=6)
    np.testing.assert_array_equal(np.asarray(part[:, :6]), np.asarray(full[:, :6]))
    assert (np.asarray(part[:, 6:]) == 0).all() and int(info["nfe"]) == 6


def test_greedy_sampling_takes_the_argmax_of_the_guided_logits():
    """Temperature -> 0 (1e-6) draws argmax(l_u + w (l_c - l_u)) at every position."""
    c = tiny_ar()
    c.sample.cfg_scale, c.sample.temperature = 2.0, 1e-6
    model, params = build_model(c), random_params(c, seed=8)
    labels = jnp.array([4, 6])
    tokens, _ = ar_sampling.sample(params, labels, jax.random.key(0), c)
    lc = np.asarray(model.apply({"params": params}, tokens, labels), np.float64)
    lu = np.asarray(model.apply({"params": params}, tokens, -jnp.ones_like(labels)), np.float64)
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(lu + 2.0 * (lc - lu), axis=-1))


def test_ar_config_errors_name_the_field():
    c = tiny_ar()
    c.model.head = "diffusion"
    with pytest.raises(ConfigError, match="model.head='diffusion'"):
        validate_config(c)
    c = tiny_ar()
    c.model.dec_depth = 2
    with pytest.raises(ConfigError, match="model.dec_depth=2"):
        validate_config(c)
    c = tiny_ar()
    with pytest.raises(ConfigError, match="AR sampling of 17 tokens"):
        ar_sampling.make_ar_sampler(c, num_tokens=17)


def test_digits_ar_config_builds_and_counts():
    from configs import digits_ar
    c = digits_ar.get_config()
    validate_config(c)
    params = init_params(c, jax.random.key(0))
    assert params["out"]["kernel"].shape == (96, 17) and "bias" not in params["out"]
    assert set(params["blocks"]) == {"block_0", "block_1", "block_2"}
