"""Attention as a function of queries, keys, values and a mask: no parameters.

Why a module of its own: which computation runs depends on the backend (cuDNN's fused kernel
for 16-bit on GPU, a head-major layout on CPU, XLA's otherwise), and the blocks in
``emigm_jax.models.transformer`` should not care.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp


def attention_probs(q: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) in float32, masked keys at float32's lowest value: [B, H, Lq, Lk].

    For training with attention-probability dropout (which the fused kernels lack) where the
    head-major form does not apply (16-bit, or not on CPU).
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                    drop: Optional[Callable[[jax.Array], jax.Array]] = None,
                    inference: bool = False) -> jax.Array:
    """cuDNN's flash kernel for bf16/fp16 on GPU, ``head_major_attention`` for float32 on CPU,
    ``jax.nn.dot_product_attention``'s XLA form elsewhere.

    q, k, v: [B, L, H, hd]; mask: [B, 1, 1, L] bool (True = key may be attended to) or None.
    Falls back to XLA when cuDNN rejects the shapes (checked at trace time). ``drop``:
    attention-probability dropout on [B, H, Lq, Lk] (training); the fused kernels lack it, so
    off the head-major form the probabilities are materialised (``attention_probs``).
    ``inference``: no gradient will be taken (the sampler's passes), so where it pays
    (``per_sample_pays``) the head-major form runs one sample at a time
    (``per_sample_attention``). A gradient taken anyway is still exact, only slower.
    """
    if head_major_applies(q):
        if inference and drop is None and per_sample_pays(q, k):
            return per_sample_attention(q, k, v, mask)
        return head_major_attention(q, k, v, mask, drop)
    if drop is not None:
        probs = drop(attention_probs(q, k, mask).astype(v.dtype))
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


CPU_LANES = 16  # float32 lanes of an AVX-512 register


def head_major_applies(q: jax.Array) -> bool:
    """Whether ``head_major_attention`` is the attention to run: float32 on CPU."""
    return jax.default_backend() == "cpu" and q.dtype == jnp.float32


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array],
                         drop: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v with the layout XLA:CPU's batched dots run fastest.

    q, k, v: [B, L, H, hd]; mask: [B or 1, 1, Lq, Lk] bool or None. Returns [B, Lq, H, hd].
    Why not ``jax.nn.dot_product_attention``: on CPU its dots batch over (B, H) with the head
    axis in the middle of the operands, and its probabilities are normalised before the value
    product. Here the operands are head-major [B, H, L, hd] (one transpose each), the value
    head dimension is padded to a multiple of 16 lanes (eMIGM's hd = 56 -> 64: the dot runs
    1.6x faster for 14% more FLOPs), and the softmax denominator divides the [.., hd] output
    rather than the [.., Lk] probabilities. Same result to float32 rounding (tested against a
    float64 softmax); eMIGM-XS's decoder attention at batch 16 on 2 AVX-512 cores: 77 -> 55 ms
    forward, 209 -> 142 ms forward + backward (benchmarks/attention.py, RESULTS.md).
    Masked keys get float32's lowest value, not -inf, so a query with no allowed key averages
    all values, as XLA's does. ``drop``: attention-probability dropout, an elementwise
    mask-and-scale on [B, H, Lq, Lk]; it commutes with the row normalisation, so applying it to
    the unnormalised weights gives dropout(softmax) v, timm's order.
    """
    hd = q.shape[-1]
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, L, H, hd] <-> [B, H, L, hd]
    q, k, v = heads_first(q * (hd ** -0.5)), heads_first(k), heads_first(v)
    pad = -hd % CPU_LANES
    if pad:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad)))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)  # [B, H, Lq, Lk]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    logits = logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    weights = jnp.exp(logits)
    denominator = weights.sum(axis=-1, keepdims=True)  # [B, H, Lq, 1]
    if drop is not None:
        weights = drop(weights)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v) / denominator
    return heads_first(out[..., :hd])


PER_SAMPLE_MIN_BYTES = 8 << 20  # the batch's weights from which per-sample pays


def per_sample_pays(q: jax.Array, k: jax.Array) -> bool:
    """Whether ``per_sample_attention`` is the faster form: one device, and the batch's
    [B, H, Lq, Lk] weights too large to stay in cache (eMIGM-XS's decoder at batch 8: 26 MB;
    a KV-cached decode step's are KBs, where the loop's overhead would dominate)."""
    b, lq, h, _ = q.shape
    weight_bytes = q.dtype.itemsize * b * h * lq * k.shape[1]
    return b > 1 and jax.device_count() == 1 and weight_bytes >= PER_SAMPLE_MIN_BYTES


def per_sample_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         mask: Optional[jax.Array]) -> jax.Array:
    """``head_major_attention`` over one sample at a time (``lax.map``); same shapes and values.

    Why: a sample's [H, Lq, Lk] weights (eMIGM-XS's decoder: 3.3 MB) stay in cache between the
    logits, the exponential and the value product, where the whole batch's (52 MB at the
    sampler's batch of 16) streams through memory three times: forward 59.5 -> 42.0 ms at that
    shape on 2 AVX-512 cores (benchmarks/attention.py, RESULTS.md). Not for training: its
    backward is slower than the batched one's, and a loop over the batch axis works against
    data-parallel sharding of that axis, hence one device only (``per_sample_pays``).
    """
    one = lambda x: x[None]  # a sample as a batch of one
    if mask is None or mask.shape[0] == 1:
        step = lambda qkv: head_major_attention(*map(one, qkv), mask)[0]
        return jax.lax.map(step, (q, k, v))
    step = lambda qkvm: head_major_attention(*map(one, qkvm))[0]
    return jax.lax.map(step, (q, k, v, mask))


def allowed_keys(key_mask: Optional[jax.Array], causal: bool, num_queries: int,
                 num_keys: int, offset=0) -> Optional[jax.Array]:
    """Bool [B or 1, Lq, Lk] (True = may attend) or None when every key is allowed.

    Query j sits at position offset + j; with ``causal`` it sees keys at positions <= its own.
    """
    allowed = None if key_mask is None else key_mask[:, None, :]
    if causal:
        q_pos = offset + jnp.arange(num_queries)[:, None]
        tri = (jnp.arange(num_keys)[None, :] <= q_pos)[None]  # [1, Lq, Lk]
        allowed = tri if allowed is None else allowed & tri
    return allowed
