import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from emigm_jax.masking import sample_mask
from emigm_jax.schedules import get_schedule


def mask_cfg(**kw):
    c = dict(distribution="bernoulli", schedule="exp", exp_rate=5.0, pow_rho=0.5, poly_p=0.5,
             weight="one", t_min=0.2, t_eps=0.0, coupling_ratio=0.0, p_eps=1e-3, t_per="batch",
             min_masked=2, loss_norm="masked")
    c.update(kw)
    return ml_collections.ConfigDict(c)


def draws(cfg, n_draws=400, batch=8, n=64, seed=0):
    fn = jax.jit(jax.vmap(lambda k: sample_mask(k, batch, n, cfg), in_axes=0))
    return fn(jax.random.split(jax.random.key(seed), n_draws))


@pytest.mark.parametrize("dist", ["bernoulli", "uniform_count"])
@pytest.mark.parametrize("t_per", ["batch", "sample"])
def test_mask_fraction_matches_gamma(dist, t_per):
    cfg = mask_cfg(distribution=dist, t_per=t_per)
    d = draws(cfg)
    n = d.mask.shape[-1]
    s = get_schedule("exp")
    frac = np.asarray(d.mask.mean(-1), np.float64).reshape(-1)
    p = np.asarray(d.p, np.float64).reshape(-1)
    # conditional on p the masked fraction has mean gamma(p) (ceil adds < 1/n for counts)
    resid = frac - s.gamma(p, np)
    if dist == "uniform_count":
        resid = frac - np.ceil(n * s.gamma(p, np) - 1e-6) / n
        assert np.abs(resid).max() < 1e-6
    else:
        se = np.sqrt((s.gamma(p, np) * (1 - s.gamma(p, np)) / n).mean() / resid.size)
        # batch-level draws share one vector: effective sample size is the number of draws
        if t_per == "batch":
            se = se * np.sqrt(resid.size / d.mask.shape[0])
        assert abs(resid.mean()) < 3 * se + 1e-3
    # truncation: p >= (1 - eps) t_min + eps
    assert p.min() >= 0.999 * 0.2 + 0.001 - 1e-6


def test_reference_variant_same_count_permuted_and_at_least_two():
    cfg = mask_cfg(t_min=0.0)
    d = draws(cfg, n_draws=300)
    counts = np.asarray(d.mask.sum(-1))  # [draws, B]
    assert counts.min() >= 2
    assert np.all(counts == counts[:, :1])  # same count across the batch
    m = np.asarray(d.mask)
    differs = np.mean([not np.array_equal(m[i, 0], m[i, 1]) for i in range(m.shape[0])
                       if 2 <= counts[i, 0] <= 62])
    assert differs > 0.95  # each sample has its own arrangement
    p = np.asarray(d.p)
    assert np.all(p == p[:, :1])  # one t per batch


def test_min_masked_rejection_at_small_t():
    # with t_min=0, gamma(p) can be ~0.005 -> rejection must kick in often; still >= 2
    cfg = mask_cfg(t_min=0.0, min_masked=2, schedule="linear", t_per="sample")
    d = draws(cfg, n_draws=200, n=16)
    assert int(d.mask.sum(-1).min()) >= 2


def test_t_eps_range():
    cfg = mask_cfg(t_min=0.0, t_eps=0.25, p_eps=0.0, t_per="sample")
    d = draws(cfg, n_draws=50)
    p = np.asarray(d.p)
    assert p.min() >= 0.25 - 1e-6 and p.max() <= 0.75 + 1e-6


@pytest.mark.parametrize("dist", ["bernoulli", "uniform_count"])
def test_coupling_keeps_a_fixed_share_unmasked_and_changes_nothing_else(dist):
    """DI's conditional coupling: round(c N) random positions per row are never masked; the
    rest of the draw (time, mask elsewhere) is the uncoupled one, and c = 0 is bit-identical."""
    base = draws(mask_cfg(distribution=dist, t_per="sample"), n_draws=50, n=16)
    off = draws(mask_cfg(distribution=dist, t_per="sample", coupling_ratio=0.0), n_draws=50, n=16)
    np.testing.assert_array_equal(np.asarray(off.mask), np.asarray(base.mask))
    np.testing.assert_array_equal(np.asarray(off.p), np.asarray(base.p))
    on = draws(mask_cfg(distribution=dist, t_per="sample", coupling_ratio=0.25), n_draws=50, n=16)
    m0, m1 = np.asarray(base.mask), np.asarray(on.mask)
    np.testing.assert_array_equal(np.asarray(on.p), np.asarray(base.p))
    assert not (m1 & ~m0).any()                      # coupling only unmasks
    assert ((m0 & ~m1).sum(-1) <= 4).all()           # at most the 4 coupled positions per row
    assert (m1.sum(-1) <= 12).all()                  # 4 of 16 always visible
    assert ((m0 & ~m1).sum(-1) > 0).mean() > 0.5     # and it does bind
    # the coupled set is uniform over positions: each position is coupled ~25% of the time
    full = draws(mask_cfg(distribution="uniform_count", t_per="sample", t_min=0.99,
                          coupling_ratio=0.25), n_draws=200, n=16)
    visible = 1.0 - np.asarray(full.mask, np.float64).reshape(-1, 16).mean(0)
    assert np.abs(visible - 0.25).max() < 0.06


def test_coupling_ratio_out_of_range_is_named():
    from emigm_jax.masking import coupled_positions
    with pytest.raises(ValueError, match="mask.coupling_ratio=1.0 is invalid"):
        coupled_positions(jax.random.key(0), 2, 16, 1.0)
