"""MaskGIL's AR prefix (sample.ar_prefix): the AR model writes the first raster tokens, the
masked sampler completes the rest; both ends reduce to the plain samplers bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax import sampling
from emigm_jax.sampling import ar as ar_sampling
from emigm_jax.sampling import ar_prefix
from emigm_jax.config_validation import ConfigError
from emigm_jax.models import random_params
from tests.conftest import tiny_config
from tests.test_ar import tiny_ar

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_ar_prefix")


def tiny_masked(order="confidence", cfg_scale=2.0):
    """A 16-token, 7-symbol single-stack categorical model (the MaskGIL layout)."""
    c = tiny_config("categorical", "single")
    m = c.model
    m.dec_depth, m.buffer_size, m.cfg_mode = 0, 1, "fake_class"
    s = c.sample
    s.num_iter, s.schedule, s.order, s.cfg_scale = 4, "arccos", order, cfg_scale
    s.cfg_t_min, s.cfg_t_max, s.temperature, s.top_k, s.top_p = 0.0, 1.0, 1.0, 0, 1.0
    return c


@pytest.fixture(scope="module")
def models():
    c, a = tiny_masked(), tiny_ar()
    a.sample.cfg_scale = 1.5
    return c, random_params(c, seed=1), a, random_params(a, seed=2)


def run(models, share, rng=5, order="confidence"):
    c, p, a, ap = models
    c = tiny_masked(order)
    c.sample.ar_prefix = share
    return ar_prefix.sample(p, jnp.array([0, 3, 7]), jax.random.key(rng), c, ar_params=ap,
                            ar_config=a)


def test_share_zero_is_the_masked_sampler_bit_for_bit(models):
    c, p, a, _ = models
    tokens, info = run(models, 0.0)
    ref, ref_info = sampling.sample(p, jnp.array([0, 3, 7]), jax.random.key(5), c)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref))
    assert int(info["nfe"]) == int(ref_info["nfe"]) == ar_prefix.expected_prefix_nfe(c, a)


def test_share_one_is_the_ar_sampler_bit_for_bit(models):
    c, _, a, ap = models
    tokens, info = run(models, 1.0)
    ref, ref_info = ar_sampling.sample(ap, jnp.array([0, 3, 7]), jax.random.key(5), a)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ref))
    c.sample.ar_prefix = 1.0
    assert int(info["nfe"]) == int(ref_info["nfe"]) == 32 == ar_prefix.expected_prefix_nfe(c, a)


@pytest.mark.parametrize("order", ["confidence", "random"])
def test_partial_share_keeps_the_ar_prefix_and_completes_the_rest(models, order):
    c, _, a, ap = models
    tokens, info = run(models, 0.5, order=order)
    prefix, _ = ar_sampling.sample(ap, jnp.array([0, 3, 7]), jax.random.key(5), a,
                                   num_tokens=8)
    np.testing.assert_array_equal(np.asarray(tokens[:, :8]), np.asarray(prefix[:, :8]))
    assert int(np.asarray(info["reveal_counts"]).sum()) == 8   # only the masked half
    assert int(info["masked_left"]) == 0
    c2 = tiny_masked(order)
    c2.sample.ar_prefix = 0.5
    # 8 AR steps x 2 (AR guidance 1.5) + 4 masked steps x 2 (CFG on every step)
    assert int(info["nfe"]) == 8 * 2 + 4 * 2 == ar_prefix.expected_prefix_nfe(c2, a)
    assert int(info["ar_nfe"]) == 16
    other, _ = run(models, 0.5, rng=6, order=order)
    assert (np.asarray(other) != np.asarray(tokens)).any()


def test_count_reveal_scales_to_the_masked_remainder(models):
    """Confidence order, count reveal: after step k, ceil((N - m) gamma(s_k)) stay masked."""
    _, _, _, _ = models
    c = tiny_masked("confidence")
    c.sample.ar_prefix = 0.25
    _, info = run(models, 0.25)
    from emigm_jax.schedules import schedule_from_config
    s = sampling.time_grid(c.sample)[1:]
    keep = np.ceil(12 * schedule_from_config(c.sample).gamma(s, np) - 1e-6).astype(int)
    keep[-1] = 0
    expected = np.diff(np.concatenate([[12], keep])) * -1
    np.testing.assert_array_equal(np.asarray(info["reveal_counts"]), np.maximum(expected, 1))


def test_bad_pairs_and_shares_are_named(models):
    c, p, a, ap = models
    c = tiny_masked()
    c.sample.ar_prefix = 1.5
    with pytest.raises(ConfigError, match="sample.ar_prefix=1.5"):
        ar_prefix.prefix_length(c)
    c.sample.ar_prefix = 0.5
    bad = tiny_ar()
    bad.model.vocab_size = 9
    with pytest.raises(ConfigError, match="model.vocab_size=9"):
        ar_prefix.sample(p, jnp.array([0]), jax.random.key(0), c, ar_params=ap, ar_config=bad)
    with pytest.raises(ConfigError, match="expected an 'ar' model"):
        ar_prefix.check_pair(c, tiny_masked())


def test_ar_config_from_an_older_record_takes_todays_defaults(tmp_path):
    """A config.json written before a field existed (here model.norm_eps) still builds: the
    record overrides configs/base.py's defaults, field by field."""
    import json
    from emigm_jax.workdir import config_as_json
    record = config_as_json(tiny_ar())
    del record["model"]["norm_eps"]
    assert record["model"]["width"] == 32  # the tiny AR model; base.py says 768
    (tmp_path / "config.json").write_text(json.dumps(record))
    c = ar_prefix.load_ar_config(str(tmp_path))
    assert c.model.norm_eps == 1e-6 and c.model.width == 32 and c.model.arch == "ar"
    assert c.sample.cfg_scale == record["sample"]["cfg_scale"]
    with pytest.raises(FileNotFoundError, match="ar_workdir"):
        ar_prefix.load_ar_config(str(tmp_path / "none"))
