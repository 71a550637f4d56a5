import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.models import build_model, init_params, param_count, weight_decay_mask
from tests.conftest import tiny_config

EXPECTED_M = {
    "xs_256": 69.0, "s_256": 96.6, "b_256": 207.9, "l_256": 478.3, "h_256": 942.4,
    "xs_512": 104.5, "s_512": 132.1, "b_512": 244.2, "l_512": 478.4,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_M))
def test_param_counts_match_spec(name):
    config = importlib.import_module(f"configs.emigm_{name}").get_config()
    assert round(param_count(config) / 1e6, 1) == EXPECTED_M[name]


def test_xs_exact_unique_count_and_fake_class_adds_one_vector():
    config = importlib.import_module("configs.emigm_xs_256").get_config()
    assert param_count(config) == 69_018_848  # official unique-parameter count
    config.model.cfg_mode = "fake_class"
    assert param_count(config) == 69_018_848 + 448


def _inputs(config, seed=0, b=3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.normal(k1, (b, 16, 3))
    mask = jax.random.uniform(k2, (b, 16)) < 0.6
    return tokens, mask, jnp.array([1, 2, -1])[:b]


def _z(config, params, tokens, mask, labels):
    model = build_model(config)
    return model.apply({"params": params}, tokens, mask, labels, method="transformer")


def test_mae_encoder_ignores_masked_token_values():
    c = tiny_config()
    params = init_params(c, jax.random.key(0))
    tokens, mask, labels = _inputs(c)
    z1 = _z(c, params, tokens, mask, labels)
    tokens2 = jnp.where(mask[..., None], 100.0 * jax.random.normal(jax.random.key(9), tokens.shape),
                        tokens)
    z2 = _z(c, params, tokens2, mask, labels)
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(z2))
    # an unmasked token's value does change the output
    tokens3 = tokens.at[:, :].add(jnp.where(mask[..., None], 0.0, 1.0))
    assert not np.allclose(np.asarray(_z(c, params, tokens3, mask, labels)), np.asarray(z1))


def test_mae_dropping_equals_running_on_kept_tokens_only():
    """Static-shape dropping == a transformer that never saw the dropped tokens (reference)."""
    c = tiny_config()
    params = init_params(c, jax.random.key(1))
    tokens, _, labels = _inputs(c, b=1)
    mask = jnp.zeros((1, 16), bool).at[0, jnp.array([1, 4, 5, 11, 15])].set(True)
    z = _z(c, params, tokens, mask, labels[:1])
    # reference computation by hand: gather kept tokens, run the encoder without any mask
    model = build_model(c)
    bb = params["backbone"]
    x = tokens @ bb["z_proj"]["kernel"] + bb["z_proj"]["bias"]
    cond = params["class_emb"]["embedding"][labels[0]][None, None]
    x = jnp.concatenate([jnp.broadcast_to(cond, (1, 4, 32)), x], axis=1)
    x = x + bb["encoder_pos_embed_learned"]
    ln = lambda p, v: (v - v.mean(-1, keepdims=True)) / jnp.sqrt(v.var(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]
    x = ln(bb["z_proj_ln"], x)
    keep_idx = np.array([i for i in range(20) if i - 4 not in [1, 4, 5, 11, 15]])
    from emigm_jax.models.transformer import BlockStack
    enc = BlockStack(depth=1, num_heads=4, prefix="block")
    xk = enc.apply({"params": bb["encoder_blocks"]}, x[:, keep_idx])
    xk = ln(bb["encoder_norm"], xk)
    xk = xk @ bb["decoder_embed"]["kernel"] + bb["decoder_embed"]["bias"]
    full = jnp.broadcast_to(params["mask_token"][None], (1, 20, 32))
    full = full.at[:, keep_idx].set(xk)
    full = full + bb["decoder_pos_embed_learned"]
    full = enc.apply({"params": bb["decoder_blocks"]}, full)
    full = ln(bb["decoder_norm"], full)[:, 4:] + bb["diffusion_pos_embed_learned"]
    np.testing.assert_allclose(np.asarray(z), np.asarray(full), atol=2e-5)


def test_encoder_capacity_matches_full_when_enough_tokens_dropped():
    c = tiny_config()
    params = init_params(c, jax.random.key(2))
    tokens, _, labels = _inputs(c)
    mask = jnp.zeros((3, 16), bool).at[:, :10].set(True)  # 10 dropped -> 10 kept slots needed
    z_full = _z(c, params, tokens, mask, labels)
    c.model.encoder_capacity = 4 + 6
    np.testing.assert_allclose(np.asarray(_z(c, params, tokens, mask, labels)),
                               np.asarray(z_full), atol=1e-5)


def test_single_arch_sees_all_positions_and_masked_carry_position():
    c = tiny_config(arch="single")
    params = init_params(c, jax.random.key(3))
    tokens, mask, labels = _inputs(c)
    z1 = _z(c, params, tokens, mask, labels)
    tokens2 = jnp.where(mask[..., None], -tokens, tokens)
    np.testing.assert_array_equal(np.asarray(z1), np.asarray(_z(c, params, tokens2, mask, labels)))
    # same parameter tree as MAE (checkpoints interchange)
    p_mae = init_params(tiny_config(), jax.random.key(3))
    assert jax.tree_util.tree_structure(p_mae) == jax.tree_util.tree_structure(params)


def test_no_time_input_and_unconditional_uses_mask_token():
    c = tiny_config()
    params = init_params(c, jax.random.key(4))
    model = build_model(c)
    cond = model.apply({"params": params}, jnp.array([3, -1]), method="class_condition")
    np.testing.assert_array_equal(np.asarray(cond[1]), np.asarray(params["mask_token"][0]))
    np.testing.assert_array_equal(np.asarray(cond[0]), np.asarray(params["class_emb"]["embedding"][3]))
    c.model.cfg_mode = "fake_class"
    params = init_params(c, jax.random.key(4))
    cond = build_model(c).apply({"params": params}, jnp.array([-1]), method="class_condition")
    np.testing.assert_array_equal(np.asarray(cond[0]), np.asarray(params["fake_latent"][0]))
    assert params["class_emb"]["embedding"].shape == (10, 32)


def test_head_zero_init_and_output_shape():
    c = tiny_config()
    params = init_params(c, jax.random.key(5))
    net = params["diffloss"]["net"]
    for name in ["res_blocks_0", "res_blocks_1"]:
        assert np.all(np.asarray(net[name]["adaLN_modulation_1"]["kernel"]) == 0)
    assert np.all(np.asarray(net["final_layer"]["linear"]["kernel"]) == 0)
    out = build_model(c).apply({"params": params}, jnp.ones((5, 3)), jnp.arange(5.0),
                               jnp.ones((5, 32)), method="head")
    assert out.shape == (5, 6) and np.all(np.asarray(out) == 0)


def test_timestep_embedding_layout_cos_then_sin():
    from emigm_jax.models.diffusion_head import timestep_embedding

    t = jnp.array([0.0, 3.0, 500.0])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    args = np.array([0.0, 3.0, 500.0])[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), rtol=1e-5, atol=1e-5)


def test_weight_decay_mask_rule():
    c = tiny_config()
    params = init_params(c, jax.random.key(0))
    wd = weight_decay_mask(params)
    assert wd["class_emb"]["embedding"] and wd["mask_token"]
    assert wd["backbone"]["encoder_blocks"]["block_0"]["attn"]["qkv"]["kernel"]
    assert not wd["backbone"]["encoder_blocks"]["block_0"]["attn"]["qkv"]["bias"]
    assert not wd["backbone"]["encoder_norm"]["scale"]
    assert not any(jax.tree_util.tree_leaves(wd["diffloss"]))


def test_bfloat16_compute_keeps_fp32_params():
    c = tiny_config()
    c.model.dtype = "bfloat16"
    params = init_params(c, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    tokens, mask, labels = _inputs(c)
    z = _z(c, params, tokens, mask, labels)
    c32 = tiny_config()
    z32 = _z(c32, params, tokens, mask, labels)
    assert z.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(z, np.float32), np.asarray(z32), atol=0.1)
