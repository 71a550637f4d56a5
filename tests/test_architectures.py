"""Architecture switches: llama block, 2-D RoPE, QK-norm, post-norm, prefix tokens."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.models import build_model, init_params, param_count
from emigm_jax.models.transformer import ViTBlock, apply_rope, rope2d_angles, swiglu_hidden
from tests.conftest import tiny_config


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("qk_norm,post_norm", [(False, False), (True, True)])
def test_llama_block_param_count_closed_form(qk_norm, post_norm):
    d, heads = 64, 4
    blk = ViTBlock(heads, kind="llama", qk_norm=qk_norm, post_norm=post_norm)
    params = blk.init(jax.random.key(0), jnp.zeros((1, 3, d)))["params"]
    h = swiglu_hidden(d)
    expected = 4 * d * d + 3 * d * h + 2 * d  # qkv+proj, SwiGLU, two RMSNorm scales
    expected += (2 * (d // heads) if qk_norm else 0) + (2 * d if post_norm else 0)
    assert _count(params) == expected
    assert h == 256  # 8*64/3 = 170.7 -> rounded up to 256
    assert swiglu_hidden(768) == 2048 and swiglu_hidden(1024) == 2816
    assert not any("bias" in jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0])


EXPECTED_MGIL = {"b": 110.9, "l": 342.9, "xl": 774.7, "xxl": 1411.0}


@pytest.mark.parametrize("size", sorted(EXPECTED_MGIL))
def test_maskgil_counts_within_one_percent(size):
    c = importlib.import_module(f"configs.maskgil_{size}").get_config()
    n = param_count(c) / 1e6
    assert abs(n - EXPECTED_MGIL[size]) / EXPECTED_MGIL[size] < 0.01


def test_rope2d_logits_depend_only_on_relative_offset():
    hd, heads = 16, 2
    attn_q = jax.random.normal(jax.random.key(0), (1, 5, heads, hd))
    attn_k = jax.random.normal(jax.random.key(1), (1, 5, heads, hd))
    rows = jnp.array([0, 1, 2, 3, 1])
    cols = jnp.array([0, 2, 1, 3, 3])

    def logits(dr, dc):
        ang = rope2d_angles(rows + dr, cols + dc, hd)[None]
        q, k = apply_rope(attn_q, ang), apply_rope(attn_k, ang)
        return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", q, k))

    base = logits(0, 0)
    np.testing.assert_allclose(logits(3, 5), base, atol=1e-4)
    np.testing.assert_allclose(logits(2, 7), base, atol=1e-4)  # (negative = prefix, unrotated)
    # but not invariant to moving one token: relative positions changed
    ang = rope2d_angles(rows.at[0].add(1), cols, hd)[None]
    moved = np.asarray(jnp.einsum("bqhd,bkhd->bhqk", apply_rope(attn_q, ang), apply_rope(attn_k, ang)))
    assert np.abs(moved - base).max() > 1e-2


def test_rope_is_a_rotation_and_prefix_unrotated():
    x = jax.random.normal(jax.random.key(2), (1, 3, 1, 8))
    ang = rope2d_angles(jnp.array([-1, 2, 5]), jnp.array([-1, 3, 0]), 8)[None]
    y = apply_rope(x, ang)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1),
                               np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(y[:, 0]), np.asarray(x[:, 0]))  # prefix token
    # closed form for one pair: channel 0 pairs with channel 2 (rotate-half within the row half)
    a, b = float(x[0, 1, 0, 0]), float(x[0, 1, 0, 2])
    th = 2.0  # row 2, inv freq 1 for j = 0
    assert float(y[0, 1, 0, 0]) == pytest.approx(a * np.cos(th) - b * np.sin(th), abs=1e-5)
    assert float(y[0, 1, 0, 2]) == pytest.approx(b * np.cos(th) + a * np.sin(th), abs=1e-5)


def _tiny_llama(arch="single"):
    c = tiny_config(head="categorical", arch=arch)
    m = c.model
    m.block, m.pos_emb, m.qk_norm, m.post_norm, m.head_mlp = "llama", "rope2d", True, True, False
    m.buffer_size = 1
    if arch == "single":
        m.dec_depth = 0
    return c


@pytest.mark.parametrize("arch", ["single", "mae"])
def test_llama_rope_model_runs_and_mae_still_ignores_masked(arch):
    c = _tiny_llama(arch)
    params = init_params(c, jax.random.key(0))
    assert "encoder_pos_embed_learned" not in params["backbone"]
    model = build_model(c)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 7)
    mask = jnp.zeros((2, 16), bool).at[:, ::3].set(True)
    z = model.apply({"params": params}, tokens, mask, jnp.array([1, -1]), method="transformer")
    tokens2 = jnp.where(mask, (tokens + 3) % 7, tokens)
    z2 = model.apply({"params": params}, tokens2, mask, jnp.array([1, -1]), method="transformer")
    np.testing.assert_allclose(np.asarray(z), np.asarray(z2), atol=1e-5)
    assert np.all(np.isfinite(np.asarray(z)))


def test_post_norm_bounds_output_norm():
    """With post-norm each residual branch adds a unit-RMS update, whatever the weights' scale."""
    d = 32
    x = jax.random.normal(jax.random.key(0), (1, 6, d))
    for post in (False, True):
        blk = ViTBlock(4, kind="llama", post_norm=post)
        p = blk.init(jax.random.key(1), x)["params"]
        p = jax.tree_util.tree_map(lambda a: a * 30.0 if a.ndim == 2 else a, p)  # huge weights
        delta = np.asarray(blk.apply({"params": p}, x) - x)
        rms = np.sqrt((delta ** 2).mean(-1)).max()
        if post:
            assert rms <= 2.0 + 1e-3  # two unit-RMS branches
        else:
            assert rms > 10.0


def test_explicit_time_conditioning():
    c = tiny_config()
    c.model.time_cond = "explicit"
    params = init_params(c, jax.random.key(0))
    model = build_model(c)
    tokens = jax.random.normal(jax.random.key(1), (2, 16, 3))
    mask = jnp.zeros((2, 16), bool).at[:, :8].set(True)
    f = lambda t: np.asarray(model.apply({"params": params}, tokens, mask, jnp.array([1, 2]),
                                         t=jnp.array([t, t]), method="transformer"))
    assert np.abs(f(0.3) - f(0.9)).max() > 1e-4  # the ETM sees t
    with pytest.raises(ValueError, match="needs the time"):
        model.apply({"params": params}, tokens, mask, jnp.array([1, 2]), method="transformer")
    # the default (implicit-time) model has no time parameters at all
    assert "time_embed" not in init_params(tiny_config(), jax.random.key(0))


def test_sampler_feeds_the_state_time_to_an_etm():
    """DI's ETM: each forward pass gets the time of the state it sees (t_0 = 1 all masked)."""
    from emigm_jax import sampling
    c = tiny_config("categorical", "single")
    c.model.time_cond = "explicit"
    c.sample.num_iter, c.sample.order, c.sample.top_k, c.sample.cfg_scale = 1, "random", 1, 1.0
    params = init_params(c, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda a: a * 8.0, params)  # make t matter visibly
    model = build_model(c)
    labels = jnp.array([1, 2, 3])
    tokens, info = sampling.sample(params, labels, jax.random.key(1), c)
    assert int(info["nfe"]) == 1

    def argmax_at(t):  # top_k = 1 draws the argmax token at every masked position
        ids = jnp.zeros((3, 16), jnp.int32)
        z = model.apply({"params": params}, ids, jnp.ones((3, 16), bool), labels,
                        t=jnp.full((3,), t), method="transformer")
        return np.asarray(jnp.argmax(model.apply({"params": params}, z, method="logits"), -1))

    np.testing.assert_array_equal(np.asarray(tokens), argmax_at(1.0))
    assert (argmax_at(1.0) != argmax_at(0.3)).any()  # so the check above can fail
    # guided and Z-sampling passes (batch-doubled and scoring calls) also run on an ETM
    c.sample.num_iter, c.sample.cfg_scale, c.sample.z_sampling = 3, 2.0, "masked"
    c.sample.order = "confidence"
    _, info = sampling.sample(params, labels, jax.random.key(1), c)
    assert int(info["nfe"]) == sampling.expected_nfe(c.sample)
