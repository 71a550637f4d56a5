import math

import numpy as np
import pytest
import scipy.integrate

from emigm_jax.schedules import SCHEDULE_NAMES, get_schedule

T = np.linspace(0.01, 0.99, 97)

CLOSED = {
    "linear": lambda t: t,
    "cosine": lambda t: np.cos(np.pi / 2 * (1 - t)),
    "exp": lambda t: 1 - np.exp(-5 * t),
    "log_exp": lambda t: np.log(1 + (np.e ** 5 - 1) * t) / 5,
    "sqrt": lambda t: np.sqrt(t),
    "pow": lambda t: 1 - (1 - t) ** 0.5,
    "poly": lambda t: t ** 0.5,
    "arccos": lambda t: 2 / np.pi * np.arccos(1 - t),
}


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_gamma_closed_form_and_derivative(name):
    s = get_schedule(name)
    np.testing.assert_allclose(s.gamma(T, np), CLOSED[name](T), rtol=1e-12, atol=1e-14)
    h = 1e-6
    fd = (s.gamma(T + h, np) - s.gamma(T - h, np)) / (2 * h)
    np.testing.assert_allclose(s.dgamma(T, np), fd, rtol=1e-6)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_boundaries(name):
    s = get_schedule(name)
    assert abs(float(s.gamma(np.float64(0.0), np))) < 1e-12
    # exp reaches 1 - e^-5 ~ 0.9933 at t=1 (gamma(1) ~ 1), every other schedule 1 exactly
    expected_end = 1 - math.exp(-5.0) if name == "exp" else 1.0
    assert abs(float(s.gamma(np.float64(1.0), np)) - expected_end) < 1e-12
    assert np.all(np.diff(s.gamma(T, np)) > 0)  # monotone increasing


def test_parameters_and_aliases():
    assert get_schedule("exp", exp_rate=3.0).gamma(np.float64(0.5), np) == pytest.approx(
        1 - math.exp(-1.5), rel=1e-12)
    assert get_schedule("pow", pow_rho=2.0).gamma(np.float64(0.25), np) == pytest.approx(
        1 - 0.75 ** 2, rel=1e-12)
    assert get_schedule("poly", poly_p=3.0).gamma(np.float64(0.5), np) == pytest.approx(0.125)
    assert get_schedule("log").name == "log_exp"
    assert get_schedule("root").pow_rho == 0.5 and get_schedule("square").pow_rho == 2.0
    assert get_schedule("poly-0.5").poly_p == 0.5
    with pytest.raises(ValueError, match="unknown mask schedule 'cosin'"):
        get_schedule("cosin")
    with pytest.raises(ValueError, match="exp_rate"):
        get_schedule("exp", exp_rate=0.0)


@pytest.mark.parametrize("name", ["linear", "cosine", "exp", "log_exp"])
def test_mdm_weight_integrates_to_log_ratio(name):
    # int_a^b gamma'/gamma dt = log gamma(b) - log gamma(a)
    s = get_schedule(name)
    a, b = 0.2, 0.9
    val, _ = scipy.integrate.quad(lambda t: s.weight(np.float64(t), "mdm", np), a, b)
    assert val == pytest.approx(math.log(s.gamma(np.float64(b), np) / s.gamma(np.float64(a), np)),
                                rel=1e-9)
    assert np.all(s.weight(T, "one", np) == 1.0)


def test_jax_matches_numpy():
    import jax.numpy as jnp

    for name in SCHEDULE_NAMES:
        s = get_schedule(name)
        np.testing.assert_allclose(np.asarray(s.gamma(jnp.asarray(T, jnp.float32))),
                                   s.gamma(T, np), rtol=2e-5, atol=2e-6)
