"""model.scan_layers: same loss and gradients as the unrolled stack, layout conversion, a
program whose size does not grow with depth, the stacked sharding rule, and the fused
attention against a float64 reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from emigm_jax import losses, sharding
from emigm_jax.models import init_params, weight_decay_mask
from emigm_jax.models.layout import is_scanned, stack_layers, to_layout, unstack_layers
from emigm_jax.models.attention_ops import (PER_SAMPLE_MIN_BYTES, fused_attention,
                                             head_major_attention, per_sample_attention,
                                             per_sample_pays)
from tests.conftest import tiny_config


def _config(scan: bool, depth: int = 2):
    c = tiny_config()
    c.model.enc_depth = c.model.dec_depth = depth
    c.model.scan_layers = scan
    return c


def _batch(c, seed=0):
    rs = np.random.RandomState(seed)
    return {"tokens": jnp.asarray(rs.randn(4, 16, 3), jnp.float32),
            "label": jnp.asarray([1, 2, -1, 5], jnp.int32)}


def test_scan_loss_and_grads_equal_unrolled():
    unrolled, scanned = _config(False), _config(True)
    params = init_params(unrolled, jax.random.key(0))
    stacked = stack_layers(params)
    assert jax.tree.structure(stacked) == jax.tree.structure(
        init_params(scanned, jax.random.key(0)))
    batch, rng = _batch(unrolled), jax.random.key(7)

    def grad(c, p):  # jitted, as training runs it: op by op took ~3x as long (compiles)
        return jax.jit(jax.value_and_grad(
            lambda q: losses.loss_fn(q, batch, rng, c, train=True)[0]))(p)

    loss_u, g_u = grad(unrolled, params)
    loss_s, g_s = grad(scanned, stacked)
    assert abs(float(loss_u) - float(loss_s)) <= 1e-6 * max(1.0, abs(float(loss_u)))
    g_s = unstack_layers(g_s)
    flat_u, flat_s = jax.tree.leaves(g_u), jax.tree.leaves(g_s)
    assert len(flat_u) == len(flat_s)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_u, flat_s))
    assert worst <= 1e-6, worst
    assert max(float(jnp.max(jnp.abs(a))) for a in flat_u) > 1e-4  # gradients are not all 0


def test_layout_round_trip_of_params_and_adam_state():
    params = init_params(_config(False), jax.random.key(1))
    opt = optax.adamw(1e-3).init(params)
    stacked = to_layout({"params": params, "opt": opt}, True)
    assert is_scanned(stacked) and not is_scanned(params)
    kernel = stacked["params"]["backbone"]["encoder_blocks"]["block"]["attn"]["qkv"]["kernel"]
    assert kernel.shape == (2, 32, 96)
    np.testing.assert_array_equal(
        kernel[1], params["backbone"]["encoder_blocks"]["block_1"]["attn"]["qkv"]["kernel"])
    mu = stacked["opt"][0].mu["backbone"]["decoder_blocks"]["block"]["mlp"]["fc1"]["bias"]
    assert mu.shape == (2, 128)
    back = to_layout(stacked, False)
    assert jax.tree.structure(back["params"]) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"params": params, "opt": opt})):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_mask_is_the_same_in_both_layouts():
    params = init_params(_config(False), jax.random.key(1))
    unrolled = stack_layers(jax.tree.map(np.asarray, weight_decay_mask(params)))  # [2] bools
    scanned = weight_decay_mask(stack_layers(params))
    assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
    for want, got in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
        assert np.all(want == got)
    blocks = scanned["backbone"]["encoder_blocks"]["block"]
    assert blocks["attn"]["qkv"]["kernel"] and not blocks["norm1"]["scale"]  # [2, D]: no decay


def _program_size(scan: bool, depth: int) -> int:
    c = _config(scan, depth)
    params = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    batch = _batch(c)
    fn = jax.jit(jax.grad(lambda p: losses.loss_fn(p, batch, jax.random.key(0), c)[0]))
    return len(fn.lower(params).as_text())


def test_scanned_program_does_not_grow_with_depth():
    grow_scan = _program_size(True, 4) - _program_size(True, 2)
    grow_unrolled = _program_size(False, 4) - _program_size(False, 2)
    assert grow_unrolled > 50_000  # four more blocks of text unrolled
    assert grow_scan < 0.02 * grow_unrolled, (grow_scan, grow_unrolled)


def test_stacked_parameters_keep_the_layer_axis_whole():
    mesh = AbstractMesh((1, 4), ("data", "fsdp"))
    tree = {"backbone": {"encoder_blocks": {"block": {"mlp": {"fc1": {
        "kernel": jax.ShapeDtypeStruct((8, 32, 128), jnp.float32)}}}}},
        "unrolled": {"kernel": jax.ShapeDtypeStruct((32, 128), jnp.float32)}}
    specs = sharding.partition_specs(tree, mesh)
    assert specs["backbone"]["encoder_blocks"]["block"]["mlp"]["fc1"]["kernel"] == \
        P(None, None, "fsdp")
    assert specs["unrolled"]["kernel"] == P(None, "fsdp")


def float64_probs(q: np.ndarray, k: np.ndarray, mask) -> np.ndarray:
    """softmax(q k^T / sqrt(hd)) in float64, masked keys excluded: [B, H, Lq, Lk]."""
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64))
    logits /= np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_equals_float64_softmax(masked):
    rs = np.random.RandomState(0)
    q, k, v = (rs.randn(2, 7, 3, 8).astype(np.float32) for _ in range(3))
    keep = rs.rand(2, 7) > 0.4
    keep[:, 0] = True
    mask = keep[:, None, None, :] if masked else None
    out = np.asarray(fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     None if mask is None else jnp.asarray(mask)))
    ref = np.einsum("bhqk,bkhd->bqhd", float64_probs(q, k, mask), v.astype(np.float64))
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mask_kind", ["keys", "causal", "none"])
def test_per_sample_attention_equals_float64_softmax(mask_kind):
    # The sampler's one-sample-at-a-time loop: a per-sample key mask is sliced with its
    # sample, a [1, 1, Lq, Lk] mask is shared by all, and no mask at all.
    rs = np.random.RandomState(3)
    q, k, v = (rs.randn(3, 6, 2, 12).astype(np.float32) for _ in range(3))
    keep = rs.rand(3, 1, 1, 6) > 0.4
    keep[..., 0] = True
    mask = {"keys": keep, "causal": np.tril(np.ones((6, 6), bool))[None, None],
            "none": None}[mask_kind]
    out = jax.jit(per_sample_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                        None if mask is None else jnp.asarray(mask))
    ref = np.einsum("bhqk,bkhd->bqhd", float64_probs(q, k, mask), v.astype(np.float64))
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)


def test_per_sample_attention_only_where_it_pays():
    # Batch weights of at least PER_SAMPLE_MIN_BYTES, more than one sample, one device.
    shape = lambda b, lq, lk: (jax.ShapeDtypeStruct((b, lq, 8, 56), jnp.float32),
                               jax.ShapeDtypeStruct((b, lk, 8, 56), jnp.float32))
    lk = PER_SAMPLE_MIN_BYTES // (4 * 2 * 8 * 64)  # batch 2, 8 heads, 64 queries: the bound
    assert per_sample_pays(*shape(2, 64, lk)) == (jax.device_count() == 1)
    assert not per_sample_pays(*shape(2, 64, lk - 1))
    assert not per_sample_pays(*shape(1, 4096, 4096))
    assert not per_sample_pays(*shape(16, 1, 320))  # a KV-cached decode step


def test_head_major_attention_matches_xla_values_and_gradients():
    # hd = 12 pads the values to 16 lanes; one query row of batch 1 has no allowed key
    # (both implementations then average all values); a [1, 1, Lq, Lk] causal mask broadcasts.
    rs = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rs.randn(2, 6, 2, 12).astype(np.float32)) for _ in range(3))
    keep = rs.rand(2, 1, 6, 6) > 0.3
    keep[1, 0, 2] = False
    causal = np.tril(np.ones((6, 6), bool))[None, None]
    for mask in (jnp.asarray(keep), jnp.asarray(causal)):
        def loss(fn, q, k, v):
            return jnp.sum(jnp.sin(fn(q, k, v, mask)) * jnp.arange(12.0))
        xla = functools.partial(jax.nn.dot_product_attention, implementation="xla")
        ours_fn = lambda q, k, v, m: head_major_attention(q, k, v, m)
        xla_fn = lambda q, k, v, m: xla(q, k, v, mask=m)
        np.testing.assert_allclose(ours_fn(q, k, v, mask), xla_fn(q, k, v, mask),
                                   atol=2e-6, rtol=1e-5)
        g_ours = jax.grad(functools.partial(loss, ours_fn), argnums=(0, 1, 2))(q, k, v)
        g_xla = jax.grad(functools.partial(loss, xla_fn), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g_ours, g_xla):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
            assert float(jnp.abs(b).max()) > 0.1


def test_attention_dropout_is_dropout_of_the_softmax():
    # The training path's dropout (on CPU: on the head-major form's unnormalised weights) must
    # give timm's dropout(softmax(q k^T)) v with the same keep mask (float64 reference).
    rs = np.random.RandomState(2)
    q, k, v = (rs.randn(2, 5, 2, 12).astype(np.float32) for _ in range(3))
    keep = (rs.rand(2, 2, 5, 5) > 0.25).astype(np.float32) / 0.75  # [B, H, Lq, Lk]
    mask = rs.rand(2, 1, 1, 5) > 0.2
    mask[..., 0] = True
    out = fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                          drop=lambda w: w * keep)
    probs = float64_probs(q, k, mask)
    want = np.einsum("bhqk,bkhd->bqhd", probs * keep, v.astype(np.float64))
    np.testing.assert_allclose(out, want, atol=1e-6, rtol=1e-5)
    assert np.abs(want - np.einsum("bhqk,bkhd->bqhd", probs, v)).max() > 0.1  # dropout mattered
