"""Golden values: the sampler's tokens and the loss / gradients of fixed inputs.

Why: refactoring the sampler and the training code must not change the numbers. The values in
tests/golden/golden.json were recorded by running this file with ``EMIGM_WRITE_GOLDEN=1``;
every later run must reproduce them. Integer outputs (token ids, reveal counts, NFE) must be
identical. Float32 outputs must agree to 1e-4 relative, not bit for bit: XLA:CPU picks its
kernels by the host's vector ISA, so an AVX2 and an AVX-512 machine sum in different orders.
Between the recording made on the earlier development host and a run on its AVX-512
successor (Sapphire Rapids, with attention's rounding also changed by the head-major CPU
form), the continuous samples' sums differed by at most 1.3e-6 relative and the gradients' by
3.9e-6, and every discrete output was identical; a refactor that changes the math moves them
by far more. Each float array is kept as its float64 sum, its absolute sum and 64 evenly spaced
values. Inputs are tiny (batch 2, random weights) so the whole file compiles in CI on two CPU
cores.
"""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax import sampling
from emigm_jax.losses import loss_fn
from emigm_jax.models import random_params, seq_len, token_dim

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "golden.json")
WRITE = os.environ.get("EMIGM_WRITE_GOLDEN") == "1"

# name -> (config module, sample overrides): every discrete config with companion switches on
SAMPLER_CASES = {
    "digits": ("configs.digits", {}),
    "digits_ddpm": ("configs.digits", dict(head_sampler="ddpm", ddpm_steps=5, temperature=0.9,
                                           cfg_schedule="linear")),
    "maskgit_noise_diff": ("configs.digits_maskgit", dict(noise_reg="abs_cos", diff_frac=0.5,
                                                          cfg_scale=2.0, top_k=8)),
    "mdm_z_masked": ("configs.digits_mdm", dict(num_iter=6, z_sampling="masked", z_steps=3,
                                                cfg_scale=1.5)),
    "di_probs_argmax": ("configs.digits_di", dict(num_iter=6, cfg_scale=2.0)),
    "maskgil_z_random": ("configs.digits_maskgil", dict(z_sampling="random",
                                                        gumbel_anneal="none", argmax_from=6)),
    "maskgil_z_recover": ("configs.digits_maskgil", dict(num_iter=4, z_sampling="recover",
                                                         noise_reg="half_abs_cos",
                                                         noise_reg_scale=0.5)),
    # the XS network at its real size on random weights; 4 steps so one of them is guided
    "xs_256": ("configs.emigm_xs_256", dict(num_iter=4)),
}
LOSS_CASES = ("configs.digits", "configs.digits_maskgit")


# Fields of the configs as they were when the values were recorded (their defaults changed
# since; the golden values test the code, not the recipe).
RECORDED_WITH = {"configs.digits": {
    "model.diffusion_batch_mul": 4, "model.encoder_buckets": (1 / 16, 1 / 8, 1 / 4, 3 / 8, 5 / 8),
    "model.loss_buckets": (3 / 4, 7 / 8), "sample.num_iter": 8, "sample.cfg_scale": 3.0},
    # Recorded with the scanned layers (the default; compiles in about half the time of the
    # unrolled stack); tests/test_scan_layers.py checks the two layouts agree on the same
    # weights.
    "configs.emigm_xs_256": {"model.encoder_buckets": (1 / 16, 1 / 8, 1 / 4, 3 / 8, 5 / 8)}}


def load_config(module: str, overrides: dict):
    config = importlib.import_module(module).get_config()
    for field, value in RECORDED_WITH.get(module, {}).items():
        section, name = field.split(".")
        config[section][name] = value
    for name, value in overrides.items():
        config.sample[name] = value
    return config


SAMPLES = 64   # evenly spaced values kept per array
RTOL = 1e-4     # float32 agreement across CPU generations (module docstring)


def fingerprint(x) -> dict:
    """The array's shape, dtype, float64 sum and absolute sum, and 64 evenly spaced values."""
    a = np.asarray(x)
    flat = a.ravel()
    picks = flat[np.linspace(0, flat.size - 1, min(SAMPLES, flat.size)).astype(np.int64)]
    return {"shape": list(a.shape), "dtype": str(a.dtype),
            "sum": float(np.sum(a, dtype=np.float64)),
            "abs_sum": float(np.sum(np.abs(a), dtype=np.float64)),
            "values": picks.tolist()}


def assert_matches(key: str, got, want) -> None:
    """Integers and structure exactly; float arrays (fingerprints) to RTOL of their scale."""
    if isinstance(want, dict) and "values" in want:
        assert (got["shape"], got["dtype"]) == (want["shape"], want["dtype"]), key
        if not np.issubdtype(np.dtype(want["dtype"]), np.floating):
            assert got == want, f"{key}: integer output changed"
            return
        scale = want["abs_sum"] / max(1, int(np.prod(want["shape"])))  # mean |x|
        np.testing.assert_allclose(got["values"], want["values"], rtol=RTOL,
                                   atol=RTOL * scale, err_msg=f"{key}: values changed")
        for stat in ("sum", "abs_sum"):
            assert abs(got[stat] - want[stat]) <= RTOL * want["abs_sum"], \
                f"{key}: {stat} {got[stat]!r} != recorded {want[stat]!r}"
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), f"{key}: fields changed"
        for k in want:
            assert_matches(f"{key}.{k}", got[k], want[k])
    else:
        assert got == want, f"{key}: {got!r} != recorded {want!r}"


def sampler_values(name: str) -> dict:
    module, overrides = SAMPLER_CASES[name]
    config = load_config(module, overrides)
    batch = 1 if name == "xs_256" else 2
    params = random_params(config, seed=1)
    labels = jnp.arange(batch, dtype=jnp.int32) % config.model.num_classes
    tokens, info = sampling.sample(params, labels, jax.random.key(7), config)
    return {"tokens": fingerprint(tokens), "nfe": int(info["nfe"]),
            "reveal_counts": np.asarray(info["reveal_counts"]).tolist()}


def loss_values(module: str) -> dict:
    config = load_config(module, {})
    n, rs = seq_len(config), np.random.RandomState(3)
    if config.model.head == "categorical":
        tokens = jnp.asarray(rs.randint(0, config.model.vocab_size, (2, n)), jnp.int32)
    else:
        tokens = jnp.asarray(rs.normal(size=(2, n, token_dim(config))), jnp.float32)
    batch = {"tokens": tokens, "label": jnp.asarray([3, 5], jnp.int32)}
    params = random_params(config, seed=2)
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(11), config),
                                         has_aux=True))
    (loss, _), grads = grad_fn(params)
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    flat = np.concatenate([g.ravel() for g in leaves])
    return {"loss": fingerprint(loss), "grads": fingerprint(flat), "num_leaves": len(leaves)}


def recorded() -> dict:
    if not os.path.exists(GOLDEN):
        return {}
    with open(GOLDEN) as f:
        return json.load(f)


def check(key: str, values: dict):
    if WRITE:
        table = recorded()
        table[key] = values
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        return
    assert_matches(key, json.loads(json.dumps(values)), recorded()[key])


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_sampler_tokens_match_golden(name):
    check(f"sample/{name}", sampler_values(name))


@pytest.mark.parametrize("module", LOSS_CASES)
def test_loss_and_gradients_match_golden(module):
    check(f"loss/{module}", loss_values(module))
