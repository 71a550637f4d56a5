"""The 16-bit dropout: exact expectation, the stated drop probability, position-keyed bits."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from emigm_jax.models.dropout import Dropout, drop_threshold, dropout, uniform_u16


def test_bits_are_the_threefry_words_of_each_elements_block():
    """Element (i, j) of a [R, C] draw is 16-bit word j % 4 of the threefry2x32 block with
    counter (0, i * ceil(C / 4) + j // 4): its bits depend on its position only, never on
    how the array is split over devices."""
    key = jax.random.key(7)
    r, c = 3, 10
    got = np.asarray(uniform_u16(key, (r, c)))
    k = np.asarray(jax.random.key_data(key))
    g = -(-c // 4)
    blocks = np.arange(r * g, dtype=np.uint32)
    w1, w2 = (np.asarray(w) for w in threefry2x32_p.bind(
        jnp.uint32(k[0]), jnp.uint32(k[1]), jnp.zeros_like(blocks), jnp.asarray(blocks)))
    words = np.stack([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], -1).reshape(r, 4 * g)
    np.testing.assert_array_equal(got, words[:, :c].astype(np.uint16))
    assert got.dtype == np.uint16


def test_drop_probability_and_exact_expectation():
    rate = 0.1
    q = drop_threshold(rate) / 65536
    assert drop_threshold(rate) == 6554 and abs(q - rate) < 2 ** -17
    x = jnp.full((256, 1001), 3.0)  # last axis not a multiple of 4
    y = np.asarray(dropout(jax.random.key(0), x, rate))
    dropped = (y == 0).mean()
    n = y.size
    assert abs(dropped - q) < 5 * np.sqrt(q * (1 - q) / n), dropped  # 5 sigma
    np.testing.assert_allclose(y[y != 0], 3.0 / (1 - q), rtol=1e-6)
    np.testing.assert_allclose(y.mean(), 3.0, rtol=5 * np.sqrt(q / (1 - q) / n))
    u = np.asarray(uniform_u16(jax.random.key(1), (512, 512))).astype(np.float64)
    hist = np.bincount((u // 4096).astype(int).ravel(), minlength=16)  # 16 equal bins
    chi2 = (((hist - u.size / 16) ** 2) / (u.size / 16)).sum()
    assert chi2 < 45.0, chi2  # 15 dof: p ~ 1e-4
    a = np.asarray(dropout(jax.random.key(2), x, rate))
    assert (a != y).any()  # another key, another mask


def test_module_is_identity_when_deterministic_or_rate_zero():
    x = jnp.arange(1.0, 13.0).reshape(3, 4)
    mod = Dropout(0.5)
    assert np.array_equal(mod.apply({}, x, deterministic=True), x)
    assert np.array_equal(Dropout(0.0).apply({}, x, False, rngs={"dropout": jax.random.key(0)}), x)
    y = np.asarray(mod.apply({}, x, False, rngs={"dropout": jax.random.key(0)}))
    assert set(np.unique(y[y != 0] / np.asarray(x)[y != 0])) == {2.0} and (y == 0).any()
