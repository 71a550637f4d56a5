"""Gaussian diffusion of the head: schedule arrays, respacing, the iDDPM hybrid loss.

Oracles: closed forms in float64 numpy, and numbers printed by the reference code
(eMIGM diffusion/respace.py) where a rule (not a formula) decides.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.diffusion import gaussian as gd
from emigm_jax.diffusion.gaussian import (GaussianDiffusion, create_diffusion,
                                          get_named_beta_schedule, space_timesteps)

T = 1000


def _abar(t):
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2


def test_cosine_betas_closed_form():
    b = get_named_beta_schedule("cosine", T)
    i = np.arange(T, dtype=np.float64)
    expected = np.minimum(1.0 - _abar((i + 1) / T) / _abar(i / T), 0.999)
    np.testing.assert_allclose(b, expected, rtol=1e-12, atol=0)
    assert b.dtype == np.float64 and b.shape == (T,)
    # only the very last beta hits the 0.999 clip (abar(1) = cos(pi/2)^2 ~ 0)
    assert np.sum(b == 0.999) == 1 and b[-1] == 0.999
    assert b[0] == pytest.approx(1 - _abar(1e-3) / _abar(0.0), rel=1e-12)
    assert b[0] == pytest.approx(4.12842e-05, rel=1e-5)


def test_derived_arrays_closed_form():
    d = create_diffusion()
    b = get_named_beta_schedule("cosine", T)
    ac = np.cumprod(1 - b)
    np.testing.assert_allclose(d.betas, b, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod, ac, rtol=1e-12)
    # unclipped steps telescope to abar((i+1)/T) / abar(0)
    i = np.arange(T - 1)
    np.testing.assert_allclose(d.alphas_cumprod[:-1], _abar((i + 1) / T) / _abar(0.0),
                               rtol=1e-9)
    ac_prev = np.append(1.0, ac[:-1])
    np.testing.assert_allclose(d.alphas_cumprod_prev, ac_prev, rtol=1e-12)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ac - 1), rtol=1e-12)
    # posterior of x_{t-1} given x_t, x_0 as a product of two Gaussians (precision form)
    prec = 1 / (1 - ac_prev[1:]) + (1 - b[1:]) / b[1:]
    var = 1 / prec
    np.testing.assert_allclose(d.posterior_variance[1:], var, rtol=1e-9)
    assert d.posterior_variance[0] == 0.0
    np.testing.assert_allclose(d.posterior_mean_coef1[1:],
                               var * np.sqrt(ac_prev[1:]) / (1 - ac_prev[1:]), rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2[1:],
                               var * np.sqrt(1 - b[1:]) / b[1:], rtol=1e-9)
    # the log variance at t = 0 is clipped to the t = 1 value
    assert d.posterior_log_variance_clipped[0] == np.log(d.posterior_variance[1])
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:],
                               np.log(d.posterior_variance[1:]), rtol=1e-12)


def test_space_timesteps_reference_rule():
    s100 = space_timesteps(T, "100")
    assert len(s100) == 100 and s100[0] == 0 and s100[-1] == 999
    # printed by the reference space_timesteps(1000, "100"): Python round of k * 999/99
    assert s100[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    assert s100[-6:] == [949, 959, 969, 979, 989, 999]
    assert s100 == space_timesteps(T, 100)
    assert space_timesteps(T, "8") == [0, 143, 285, 428, 571, 714, 856, 999]
    s3 = space_timesteps(T, "10,15,20")
    assert len(s3) == 45 and s3[9:13] == [333, 334, 358, 381] and s3[24:27] == [666, 667, 684]
    assert space_timesteps(T, "ddim50")[:5] == [0, 20, 40, 60, 80]
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(T, "1001")
    with pytest.raises(ValueError, match="bad timestep respacing"):
        space_timesteps(T, "ten")


def test_respaced_process():
    base = create_diffusion()
    d = create_diffusion("100")
    assert d.num_timesteps == 100 and d.original_num_steps == 1000
    np.testing.assert_array_equal(d.timestep_map, space_timesteps(T, "100"))
    # the respaced chain keeps the marginals of the kept steps
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map],
                               rtol=1e-10)
    ac = base.alphas_cumprod[d.timestep_map]
    np.testing.assert_allclose(d.betas, 1 - ac / np.append(1.0, ac[:-1]), rtol=1e-12)
    # the model sees the original index, not a rescaled one
    np.testing.assert_array_equal(np.asarray(d.model_time(jnp.array([0, 1, 99]))),
                                  [0.0, 10.0, 999.0])


def test_q_sample_closed_form():
    d = create_diffusion()
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(5, 3)).astype(np.float32)
    n = rng.normal(size=(5, 3)).astype(np.float32)
    t = np.array([0, 1, 500, 998, 999])
    ab = d.alphas_cumprod[t][:, None]
    np.testing.assert_allclose(np.asarray(d.q_sample(x0, t, n)),
                               np.sqrt(ab) * x0 + np.sqrt(1 - ab) * n, rtol=1e-5, atol=1e-6)


def test_learned_range_endpoints():
    d = create_diffusion()
    x = jnp.ones((4, 2))
    t = jnp.array([0, 1, 400, 999])
    lo = d.p_mean_variance_from_output(jnp.concatenate([x, -jnp.ones((4, 2))], 1), x, t)
    hi = d.p_mean_variance_from_output(jnp.concatenate([x, jnp.ones((4, 2))], 1), x, t)
    np.testing.assert_allclose(np.asarray(lo["log_variance"][:, 0]),
                               d.posterior_log_variance_clipped[np.asarray(t)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(hi["log_variance"][:, 0]),
                               np.log(d.betas[np.asarray(t)]), rtol=1e-6)
    with pytest.raises(ValueError, match="2\\*C = 4"):
        d.p_mean_variance_from_output(jnp.ones((4, 3)), x, t)


def test_normal_kl_and_discretized_ll():
    m1, lv1, m2, lv2 = 0.3, -1.0, -0.2, 0.5
    kl = 0.5 * (lv2 - lv1 + (math.exp(lv1) + (m1 - m2) ** 2) / math.exp(lv2) - 1)
    assert float(gd.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(kl, rel=1e-6)
    # interior bin: Phi((x+1/255-m)/s) - Phi((x-1/255-m)/s) with the tanh approximation
    x, m, ls = np.array([0.1, -1.0, 1.0]), np.array([0.12, -0.98, 0.97]), np.log(0.05)

    def phi(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

    s = 0.05
    exp = np.array([np.log(phi((x[0] + 1 / 255 - m[0]) / s) - phi((x[0] - 1 / 255 - m[0]) / s)),
                    np.log(phi((x[1] + 1 / 255 - m[1]) / s)),         # x < -0.999: left tail
                    np.log(1 - phi((x[2] - 1 / 255 - m[2]) / s))])    # x > 0.999: right tail
    got = gd.discretized_gaussian_log_likelihood(jnp.asarray(x, jnp.float32),
                                                 jnp.asarray(m, jnp.float32),
                                                 jnp.full(3, ls, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-4)


def _np_training_losses(d, model_np, x0, t, noise):
    """float64 numpy re-derivation of the reference training_losses (LossType.MSE)."""
    ab = d.alphas_cumprod[t][:, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    out = model_np(xt, d.timestep_map[t].astype(np.float64))
    C = x0.shape[1]
    eps, v = out[:, :C], out[:, C:]
    mse = np.mean((noise - eps) ** 2, axis=1)
    c1, c2 = d.posterior_mean_coef1[t][:, None], d.posterior_mean_coef2[t][:, None]
    true_mean = c1 * x0 + c2 * xt
    true_lv = d.posterior_log_variance_clipped[t][:, None]
    x0_hat = np.sqrt(1 / ab) * xt - np.sqrt(1 / ab - 1) * eps
    mean = c1 * x0_hat + c2 * xt
    frac = (v + 1) / 2
    lv = frac * np.log(d.betas[t])[:, None] + (1 - frac) * true_lv
    kl = 0.5 * (-1 + lv - true_lv + np.exp(true_lv - lv) + (true_mean - mean) ** 2 * np.exp(-lv))
    kl = kl.mean(1) / np.log(2)

    def phi(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))

    inv_s = np.exp(-0.5 * lv)
    delta = phi(inv_s * (x0 - mean + 1 / 255)) - phi(inv_s * (x0 - mean - 1 / 255))
    nll = -np.log(np.maximum(delta, 1e-12)).mean(1) / np.log(2)
    vb = np.where(t == 0, nll, kl)
    return mse + vb, mse, vb


def test_training_losses_match_float64_hand_computation():
    d = create_diffusion()
    rng = np.random.default_rng(1)
    M, C = 8, 3
    W = rng.normal(size=(C, 2 * C)) * 0.3
    bias = rng.normal(size=(2 * C,)) * 0.1

    def model_np(x, tt):
        return np.tanh(x @ W + bias + tt[:, None] / 1000.0)

    def model_jax(x, tt):
        return jnp.tanh(x @ jnp.asarray(W, jnp.float32) + jnp.asarray(bias, jnp.float32)
                        + tt[:, None] / 1000.0)

    x0 = rng.uniform(-0.9, 0.9, size=(M, C))  # inside (-1, 1): the t = 0 decoder bins
    noise = rng.normal(size=(M, C))
    t = np.array([0, 0, 1, 17, 250, 600, 998, 999])
    out = jax.jit(lambda a, b, c: d.training_losses(model_jax, a, b, c))(
        x0.astype(np.float32), t, noise.astype(np.float32))
    loss, mse, vb = _np_training_losses(d, model_np, x0, t, noise)
    np.testing.assert_allclose(np.asarray(out["mse"]), mse, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(out["vb"]), vb, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["loss"]), loss, rtol=2e-4, atol=1e-5)
    assert np.all(vb[2:] > 0) and np.all(vb[:2] > 0)
    # the t = 0 rows use the decoder NLL, which differs from the KL formula there
    assert out["vb"].shape == (M,)


def test_training_losses_stop_gradient_split():
    """vb trains only the variance channels; mse only the eps channels."""
    d = create_diffusion()
    rng = np.random.default_rng(2)
    M, C = 6, 4
    x0 = jnp.asarray(rng.normal(size=(M, C)) * 0.5, jnp.float32)
    noise = jnp.asarray(rng.normal(size=(M, C)), jnp.float32)
    t = jnp.array([0, 3, 100, 400, 800, 999])
    params = {"eps": jnp.asarray(rng.normal(size=(C, C)) * 0.3, jnp.float32),
              "var": jnp.asarray(rng.normal(size=(C, C)) * 0.3, jnp.float32)}

    def losses(p):
        def model(x, tt):
            return jnp.concatenate([x @ p["eps"], jnp.tanh(x @ p["var"])], axis=1)
        return d.training_losses(model, x0, t, noise)

    g_vb, g_mse = jax.jit(lambda p: (jax.grad(lambda q: losses(q)["vb"].sum())(p),
                                     jax.grad(lambda q: losses(q)["mse"].sum())(p)))(params)
    assert float(jnp.abs(g_vb["eps"]).max()) == 0.0
    assert float(jnp.abs(g_vb["var"]).max()) > 0.0
    assert float(jnp.abs(g_mse["var"]).max()) == 0.0
    assert float(jnp.abs(g_mse["eps"]).max()) > 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown beta schedule 'quad'"):
        get_named_beta_schedule("quad", 10)
    with pytest.raises(ValueError, match="betas must be"):
        GaussianDiffusion(np.array([0.1, 1.5]))
    d = create_diffusion()
    with pytest.raises(ValueError, match="noise shape"):
        d.training_losses(lambda x, t: jnp.zeros((2, 4)), jnp.zeros((2, 2)),
                          jnp.zeros(2, jnp.int32), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="already respaced"):
        create_diffusion("10").respaced("5")
