import importlib
import os

import pytest

from emigm_jax.config_validation import ConfigError, validate_config
from tests.conftest import tiny_config

ALL = ["base", "emigm_xs_256", "emigm_s_256", "emigm_b_256", "emigm_l_256", "emigm_h_256",
       "emigm_xs_512", "emigm_s_512", "emigm_b_512", "emigm_l_512"]
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# every shipped config file (modules with get_config; shared-recipe modules have none)
SHIPPED = sorted(f[:-3] for f in os.listdir(_CONFIG_DIR)
                 if f.endswith(".py") and "def get_config" in open(os.path.join(_CONFIG_DIR, f)).read())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    validate_config(importlib.import_module(f"configs.{name}").get_config())


def test_every_config_is_checked():
    assert set(ALL) <= set(SHIPPED) and len(SHIPPED) >= 24
    assert {"digits_maskgit", "digits_mdm", "digits_di", "digits_maskgil", "digits_ar", "di_itm",
            "di_etm", "maskgil_b", "maskgit", "mdm", "mar"} <= set(SHIPPED)


def test_discrete_interpolants_imagenet_size():
    """DI's ImageNet model: 546M parameters (Table S7); the chosen stack is within 1%."""
    from emigm_jax.models import param_count, seq_len
    itm = importlib.import_module("configs.di_itm").get_config()
    etm = importlib.import_module("configs.di_etm").get_config()
    assert abs(param_count(itm) / 546e6 - 1) < 0.01 and abs(param_count(etm) / 546e6 - 1) < 0.01
    assert seq_len(itm) == 32 * 32 and itm.model.vocab_size == 16384
    assert (itm.model.time_cond, etm.model.time_cond) == ("none", "explicit")
    assert (itm.sample.num_iter, etm.sample.num_iter) == (20, 1000)
    assert itm.tokenizer.name == etm.tokenizer.name == "sdvq_f8"  # DI's SD-VQ-F8


@pytest.mark.parametrize("field,value,message", [
    ("mask.schedule", "cosin", r"config.mask.schedule='cosin' is invalid: expected one of"),
    ("mask.t_min", 1.0, r"config.mask.t_min=1.0 is invalid: expected a value in \[0, 1\)"),
    ("mask.t_min", -0.1, r"config.mask.t_min=-0.1"),
    ("model.num_heads", 5, r"config.model.num_heads=5 is invalid: expected a divisor of model.width=32"),
    ("model.arch", "unet", r"config.model.arch='unet'.*\('mae', 'single', 'ar'\)"),
    ("model.head", "gmm", r"config.model.head='gmm'"),
    ("mask.distribution", "poisson", r"config.mask.distribution='poisson'"),
    ("mask.weight", "elbo", r"config.mask.weight='elbo'"),
    ("model.cfg_mode", "none", r"config.model.cfg_mode='none'"),
    ("sample.cfg_schedule", "quadratic", r"config.sample.cfg_schedule='quadratic'"),
    ("sample.head_sampler", "euler", r"config.sample.head_sampler='euler'"),
    ("sample.solver_order", 4, r"config.sample.solver_order=4"),
    ("model.image_size", 18, r"config.model.image_size=18 is invalid: expected a multiple of"),
    ("model.label_drop_prob", 1.5, r"config.model.label_drop_prob=1.5"),
    ("train.grad_accum", 3, r"config.train.grad_accum=3 is invalid: expected a divisor"),
    ("model.dtype", "float16", r"config.model.dtype='float16'"),
    ("mask.min_masked", 0, r"config.mask.min_masked=0"),
    ("model.encoder_capacity", 5, r"config.model.encoder_capacity=5 is invalid"),
])
def test_bad_field_is_named(field, value, message):
    c = tiny_config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(c)


def test_categorical_needs_vocab():
    c = tiny_config(head="categorical")
    c.model.vocab_size = 0
    with pytest.raises(ConfigError, match="config.model.vocab_size=0"):
        validate_config(c)


def test_cfg_interval_order():
    c = tiny_config()
    c.sample.cfg_t_min, c.sample.cfg_t_max = 0.5, 0.2
    with pytest.raises(ConfigError, match="cfg_t_min/cfg_t_max"):
        validate_config(c)


def test_family_presets_select_their_table1_row():
    rows = {
        "maskgit": ("uniform_count", "one", "categorical"),
        "mar": ("uniform_count", "one", "diffusion"),
        "mdm": ("bernoulli", "mdm", "categorical"),
        "base": ("bernoulli", "one", "diffusion"),
    }
    for name, (dist, weight, head) in rows.items():
        c = importlib.import_module(f"configs.{name}").get_config()
        validate_config(c)
        assert (c.mask.distribution, c.mask.weight, c.model.head) == (dist, weight, head), name
    e = importlib.import_module("configs.base").get_config()
    assert (e.mask.schedule, e.mask.t_min) == ("exp", 0.2)
