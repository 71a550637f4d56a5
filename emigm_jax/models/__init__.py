"""Model construction from a config: build, initialise, count, weight-decay mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax.buckets import count_ladder
from emigm_jax.models.ar import ARGenerator
from emigm_jax.models.generator import MaskedGenerator
from emigm_jax.models.layout import layer_ndim

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def seq_len(config) -> int:
    """Number of tokens per image: (image_size / latent_stride / patch_size)^2."""
    m = config.model
    side = m.image_size // m.latent_stride // m.patch_size
    return side * side


def token_dim(config) -> int:
    """Channels of one continuous token: latent_channels * patch_size^2."""
    m = config.model
    return m.latent_channels * m.patch_size ** 2


def encoder_ladder(config) -> tuple[int, ...]:
    """Encoder capacity rungs (buffer + ceil(f * N) for f in ``model.encoder_buckets``, then
    the full capacity); one rung when the ladder is off or the arch has no token dropping."""
    m = config.model
    top = m.encoder_capacity or m.buffer_size + seq_len(config)
    if m.arch != "mae":
        return (top,)
    return count_ladder(seq_len(config), m.encoder_buckets, m.buffer_size, top)


def loss_ladder(config) -> tuple[int, ...]:
    """Training head-loss row rungs per sample (ceil(f * N) for f in ``model.loss_buckets``,
    then ``model.loss_capacity`` or N); the last rung serves any masked count."""
    n = seq_len(config)
    return count_ladder(n, config.model.loss_buckets, top=config.model.get("loss_capacity", 0) or n)


def at_rung(config, encoder_capacity: int = 0, loss_rows: int = 0):
    """A copy of ``config`` whose train step is one plain program (no ``lax.switch``): the
    encoder at ``encoder_capacity`` slots and the head loss on ``loss_rows`` rows per sample
    (0: the config's top rung, the full capacity by default).

    Why: under ``jax.grad`` a switch over rungs keeps every branch's residuals, so the train
    step runs one rung per compiled program, chosen on the host (``step_dispatch.StepDispatch``).
    """
    config = config.copy_and_resolve_references()
    m = config.model
    m.encoder_buckets = m.loss_buckets = ()
    if encoder_capacity:
        m.encoder_capacity = int(encoder_capacity)
    if loss_rows:
        m.loss_capacity = int(loss_rows)
    return config


def build_model(config) -> MaskedGenerator | ARGenerator:
    m = config.model
    if m.arch == "ar":
        return build_ar_model(config)
    return MaskedGenerator(
        seq_len=seq_len(config), token_dim=token_dim(config), width=m.width,
        enc_depth=m.enc_depth, dec_depth=m.dec_depth, num_heads=m.num_heads,
        num_classes=m.num_classes, mlp_ratio=m.mlp_ratio, buffer_size=m.buffer_size,
        attn_dropout=m.attn_dropout, proj_dropout=m.proj_dropout, arch=m.arch, head_type=m.head,
        cfg_mode=m.cfg_mode, head_depth=m.head_depth, head_width=m.head_width,
        vocab_size=m.vocab_size, encoder_capacity=m.encoder_capacity,
        encoder_ladder=encoder_ladder(config),
        single_reference_semantics=m.single_reference_semantics,
        block=m.block, qk_norm=m.qk_norm, post_norm=m.post_norm, pos_emb=m.pos_emb,
        head_mlp=m.head_mlp, time_cond=m.time_cond, remat=m.remat,
        scan_layers=m.scan_layers, dtype=DTYPES[m.dtype])


def build_ar_model(config) -> ARGenerator:
    """The causal model of ``model.arch='ar'``: ``enc_depth`` blocks, categorical output."""
    m = config.model
    return ARGenerator(
        seq_len=seq_len(config), width=m.width, depth=m.enc_depth, num_heads=m.num_heads,
        num_classes=m.num_classes, vocab_size=m.vocab_size, mlp_ratio=m.mlp_ratio,
        attn_dropout=m.attn_dropout, proj_dropout=m.proj_dropout,
        block=m.block, qk_norm=m.qk_norm, post_norm=m.post_norm, pos_emb=m.pos_emb,
        norm_eps=m.norm_eps, rope_pairing=m.rope_pairing, rope_prefix=m.rope_prefix,
        remat=m.remat, dtype=DTYPES[m.dtype])


def dummy_inputs(config, batch: int = 1):
    """Example (tokens, mask, labels) with the config's shapes."""
    n = seq_len(config)
    if config.model.head == "categorical":
        tokens = jnp.zeros((batch, n), jnp.int32)
    else:
        tokens = jnp.zeros((batch, n, token_dim(config)), jnp.float32)
    mask = jnp.zeros((batch, n), bool).at[:, : n // 2].set(True)
    labels = jnp.zeros((batch,), jnp.int32)
    return tokens, mask, labels


def init_params(config, rng: jax.Array):
    """fp32 parameter pytree {'class_emb': ..., 'mask_token': ..., 'backbone': ..., 'diffloss'|'cat_head': ...}."""
    model = build_model(config)
    tokens, mask, labels = dummy_inputs(config)
    if config.model.arch == "ar":
        return model.init(rng, tokens, labels, deterministic=True)["params"]
    return model.init(rng, tokens, mask, labels, deterministic=True)["params"]


def param_shapes(config):
    """Parameter ShapeDtypeStructs, computed without allocating (jax.eval_shape)."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def random_params(config, seed: int = 0):
    """Parameters of the right shapes and dtypes without compiling the model's init.

    Why: tests and benchmarks of the sampler need plausible weights for large configs, and
    compiling ``init`` costs more than the run itself. Norm scales 1, biases 0, every other
    leaf N(0, 0.02^2) from numpy's RandomState(seed) in tree order.
    """
    rs = np.random.RandomState(seed)

    def fill(path, s):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        if name == "bias":
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rs.normal(0.0, 0.02, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(config))


def param_count(config) -> int:
    """Number of parameters; the shared mask/fake-class vector counts once."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(param_shapes(config))))


def weight_decay_mask(params):
    """True where AdamW decays: >= 2-D parameters outside the diffusion head (eMIGM paper, App. D).

    Mirrors the reference's rule (no decay on 1-D params, biases, norms, or anything under
    ``diffloss``); embeddings, position embeddings and the mask token are >= 2-D and decay.
    The rank is per layer, so a scanned stack's norm scales ([depth, D]) do not decay either.
    """
    def rule(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        return bool(layer_ndim(names, leaf) >= 2 and "diffloss" not in names
                    and names[-1] != "bias")

    return jax.tree_util.tree_map_with_path(rule, params)
