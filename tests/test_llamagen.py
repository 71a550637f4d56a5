"""LlamaGen GPT options, configs and converter (emigm_jax.convert.llamagen).

The state dicts here are random tensors in the released layout, named and shaped from
LlamaGen's ``autoregressive/models/gpt.py`` (c2i, ``cls_token_num=1``, bias-free Linears,
class table of num_classes + 1 rows). Parity is checked against a plain-torch functional
forward written from that file's semantics (RMSNorm eps 1e-5, interleaved 2-D RoPE whose
class position has cos = sin = 0, SwiGLU, causal SDPA); with ``LLAMAGEN_SRC`` pointing at a
LlamaGen checkout the released ``Transformer`` module itself is run too.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from configs import llamagen_l_256, llamagen_sizes
from emigm_jax.checkpoint import Checkpointer
from emigm_jax.convert import llamagen
from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.convert.common import ConversionError
from emigm_jax.convert.emigm import target_shapes
from emigm_jax.convert.llamagen import convert_llamagen, pick_state_dict
from emigm_jax.models import build_model, param_count
from emigm_jax.models.ar import init_cache
from emigm_jax.models.transformer import apply_rope
from emigm_jax.sampling import ar as ar_sampling

D, DEPTH, HEADS, VOCAB, CLASSES, SIDE = 64, 2, 4, 32, 10, 4
HIDDEN = 256  # LlamaGen: find_multiple(int(2 * 4 * 64 / 3) = 170, 256)


def tiny_config():
    c = llamagen_sizes.llamagen_config("b", 256)
    m = c.model
    m.width, m.enc_depth, m.num_heads = D, DEPTH, HEADS
    m.vocab_size, m.num_classes = VOCAB, CLASSES
    m.image_size = c.data.image_size = SIDE * m.latent_stride
    c.sample.num_images = c.sample.batch_size = 2
    return c


def released_state_dict(seed=0, scale=0.3):
    """Random tensors under LlamaGen's c2i GPT names and shapes (tiny size)."""
    rs = np.random.RandomState(seed)
    def w(*shape):
        return rs.normal(0.0, scale, shape).astype(np.float32)
    sd = {"cls_embedding.embedding_table.weight": w(CLASSES + 1, D),
          "tok_embeddings.weight": w(VOCAB, D), "norm.weight": 1 + w(D),
          "output.weight": w(VOCAB, D)}
    for i in range(DEPTH):
        p = f"layers.{i}."
        sd.update({p + "attention.wqkv.weight": w(3 * D, D), p + "attention.wo.weight": w(D, D),
                   p + "feed_forward.w1.weight": w(HIDDEN, D),
                   p + "feed_forward.w3.weight": w(HIDDEN, D),
                   p + "feed_forward.w2.weight": w(D, HIDDEN),
                   p + "attention_norm.weight": 1 + w(D), p + "ffn_norm.weight": 1 + w(D)})
    return sd


# ------------------------------------------------------------------------ torch references

def torch_forward(torch, sd, tokens, labels):
    """LlamaGen's c2i eval forward, functionally: logits [B, N, V] for input tokens [B, N-1]."""
    F = torch.nn.functional
    t = {k: torch.from_numpy(v).double() for k, v in sd.items()}
    hd = D // HEADS
    def rms(x, wt):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * wt
    freqs = 1.0 / 10000 ** (torch.arange(0, hd // 2, 2).double() / (hd // 2))  # [hd/4]
    r, c = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    ang = torch.cat([r.reshape(-1, 1) * freqs, c.reshape(-1, 1) * freqs], -1)  # [N, hd/2]
    cos = torch.cat([torch.zeros(1, hd // 2), ang.cos()])  # class position: cos = sin = 0
    sin = torch.cat([torch.zeros(1, hd // 2), ang.sin()])
    def rope(x):  # [B, L, H, hd], pairs (2p, 2p + 1)
        a, b = x[..., 0::2], x[..., 1::2]
        cs, sn = cos[None, :x.shape[1], None], sin[None, :x.shape[1], None]
        return torch.stack([a * cs - b * sn, b * cs + a * sn], -1).flatten(3)
    x = torch.cat([t["cls_embedding.embedding_table.weight"][labels][:, None],
                   t["tok_embeddings.weight"][tokens]], 1)
    bsz, length, _ = x.shape
    for i in range(DEPTH):
        p = f"layers.{i}."
        h = rms(x, t[p + "attention_norm.weight"])
        q, k, v = (h @ t[p + "attention.wqkv.weight"].T).split(D, -1)
        q, k, v = (z.reshape(bsz, length, HEADS, hd) for z in (q, k, v))
        q, k = rope(q), rope(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + o.transpose(1, 2).reshape(bsz, length, D) @ t[p + "attention.wo.weight"].T
        h = rms(x, t[p + "ffn_norm.weight"])
        h = F.silu(h @ t[p + "feed_forward.w1.weight"].T) * (h @ t[p + "feed_forward.w3.weight"].T)
        x = x + h @ t[p + "feed_forward.w2.weight"].T
    return (rms(x, t["norm.weight"]) @ t["output.weight"].T).numpy()


def reference_module_forward(torch, src, sd, tokens, labels):
    """The released ``Transformer`` (LLAMAGEN_SRC checkout) in eval mode, float32."""
    sys.path.insert(0, src)
    try:
        from autoregressive.models.gpt import ModelArgs, Transformer
    finally:
        sys.path.remove(src)
    args = ModelArgs(dim=D, n_layer=DEPTH, n_head=HEADS, vocab_size=VOCAB, num_classes=CLASSES,
                     block_size=SIDE * SIDE, cls_token_num=1, token_dropout_p=0.0,
                     resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model = Transformer(args).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(tokens), torch.from_numpy(labels),
                          input_pos=torch.arange(SIDE * SIDE))
    return logits.numpy()


# ------------------------------------------------------------------------ tests

def test_rope_interleaved_pairs_rotate_by_their_angle():
    rs = np.random.RandomState(0)
    x, ang = rs.normal(size=(1, 3, 2, 8)), rs.normal(size=(1, 3, 4))
    got = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(ang, jnp.float32),
                                "interleaved"))
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    want = np.empty_like(x)
    want[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    want[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_configs_match_the_released_sizes_and_validate():
    c = llamagen_l_256.get_config()
    validate_config(c)
    m, s = c.model, c.sample
    assert (m.width, m.enc_depth, m.num_heads, m.vocab_size) == (1024, 24, 16, 16384)
    assert (m.image_size // m.latent_stride) ** 2 == 256
    assert (s.cfg_scale, s.top_k, s.top_p, s.temperature) == (2.0, 0, 1.0, 1.0)
    # LlamaGen-L: 343M parameters (the class table has num_classes + 1 rows, as ours with
    # the CFG vector): 1001*1024 + 16384*1024*2 + 24 * (4*1024^2 + 3*1024*2816 + 2*1024) + 1024
    assert param_count(c) == 342_910_976
    with pytest.raises(ValueError, match="size='m'"):
        llamagen_sizes.llamagen_config("m")


@pytest.mark.parametrize("field, value, match", [
    ("rope_pairing", "pairs", "model.rope_pairing='pairs'"),
    ("rope_prefix", "skip", "model.rope_prefix='skip'"),
    ("norm_eps", 0.0, "model.norm_eps=0.0"),
])
def test_validation_names_bad_llamagen_options(field, value, match):
    c = tiny_config()
    c.model[field] = value
    with pytest.raises(ConfigError, match=match):
        validate_config(c)


def test_validation_refuses_ar_options_on_masked_models():
    c = llamagen_sizes.base.get_config()
    c.model.rope_pairing = "interleaved"
    with pytest.raises(ConfigError, match="model.rope_pairing='interleaved'.*model.arch='mae'"):
        validate_config(c)


def test_conversion_fills_every_leaf_and_matches_torch_forward():
    torch = pytest.importorskip("torch", reason="parity needs PyTorch (extra 'interop')")
    c = tiny_config()
    validate_config(c)
    sd = released_state_dict()
    params = convert_llamagen(pick_state_dict({"model": sd, "steps": 3}), c)
    table = sd["cls_embedding.embedding_table.weight"]
    np.testing.assert_array_equal(params["class_emb"]["embedding"], table[:CLASSES])
    np.testing.assert_array_equal(params["fake_latent"], table[CLASSES:])
    np.testing.assert_array_equal(params["blocks"]["block_1"]["attn"]["qkv"]["kernel"],
                                  sd["layers.1.attention.wqkv.weight"].T)
    rs = np.random.RandomState(1)
    tokens = rs.randint(0, VOCAB, (3, SIDE * SIDE))
    labels = np.array([3, 9, CLASSES])  # the last row: unconditional (CFG class)
    want = torch_forward(torch, sd, torch.from_numpy(tokens[:, :-1]), torch.from_numpy(labels))
    model = build_model(c)
    ours_labels = jnp.asarray(np.where(labels == CLASSES, -1, labels))
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens), ours_labels))
    assert np.abs(want).max() > 1.0  # the logits are not trivially small
    # 2e-5: float32 rounding of two libraries; on an AVX-512 host (Sapphire Rapids) the
    # largest difference is 1.1-1.2e-5 (the logits exceed 1 in magnitude).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    src = os.environ.get("LLAMAGEN_SRC")
    if src:
        ref = reference_module_forward(torch, src, sd, tokens[:, :-1], labels)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The KV-cached decode path gives the same logits step by step.
    decode = jax.jit(lambda prev, i, caches: model.apply(
        {"params": params}, prev, ours_labels, i, caches, method=model.decode))
    caches, prev = init_cache(model, 3), jnp.zeros((3,), jnp.int32)
    for i in range(4):
        step, caches = decode(prev, jnp.asarray(i), caches)
        np.testing.assert_allclose(np.asarray(step), want[:, i], rtol=1e-5, atol=1e-5)
        prev = jnp.asarray(tokens[:, i])


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("layers.1.ffn_norm.weight"), r"blocks/block_1/norm2/scale"),
    (lambda sd: sd.__setitem__("layers.0.attention.wqkv.bias", np.zeros(3 * D, np.float32)),
     r"layers\.0\.attention\.wqkv\.bias"),
    (lambda sd: sd.__setitem__("layers.2.ffn_norm.weight", np.ones(D, np.float32)),
     r"layers\.2\.ffn_norm\.weight .* -> params/blocks/block_2/norm2/scale"),
])
def test_missing_or_extra_tensor_is_named(edit, match):
    sd = released_state_dict()
    edit(sd)
    with pytest.raises(ConversionError, match=match):
        convert_llamagen(sd, tiny_config())


def test_wrong_class_table_and_wrong_config_are_named():
    sd = released_state_dict()
    table = sd["cls_embedding.embedding_table.weight"]
    sd["cls_embedding.embedding_table.weight"] = table[:CLASSES]
    with pytest.raises(ConversionError, match=r"\(10, 64\); expected \[num_classes \+ 1 = 11"):
        convert_llamagen(sd, tiny_config())
    c = tiny_config()
    c.model.rope_pairing = "half"
    with pytest.raises(ValueError, match="model.rope_pairing='half'.*'interleaved'"):
        convert_llamagen(released_state_dict(), c)
    with pytest.raises(ValueError, match="has none of"):
        pick_state_dict({"model_ema": {}, "args": "x"})


def test_cli_writes_a_run_directory_that_restores(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="reading .pt needs PyTorch (extra 'interop')")
    sd = released_state_dict()
    src, cfg = tmp_path / "c2i_tiny.pt", tmp_path / "tiny.py"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src)  # FSDP-style bare dict
    cfg.write_text("from tests.test_llamagen import tiny_config as get_config\n")
    llamagen.main(["--src", str(src), "--config", str(cfg), "--workdir", str(tmp_path / "run")])
    assert "mode=sample" in capsys.readouterr().out
    ckpt = Checkpointer(epath.Path(tmp_path / "run" / "checkpoints"), keep=1, async_save=False)
    step, params = ckpt.restore_params(target_shapes(tiny_config())["params"])
    ckpt.close()
    assert step == 0
    np.testing.assert_array_equal(np.asarray(params["out"]["kernel"]), sd["output.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["fake_latent"]),
                                  sd["cls_embedding.embedding_table.weight"][CLASSES:])


def test_guided_sampler_cached_equals_recomputed_on_converted_weights():
    c = tiny_config()
    assert c.sample.cfg_scale == 2.0  # LlamaGen-B's guidance scale, kept by tiny_config
    params = convert_llamagen(released_state_dict(), c)
    labels, key = jnp.array([1, 7]), jax.random.key(3)
    cached, info = ar_sampling.sample(params, labels, key, c)
    full, _ = ar_sampling.sample(params, labels, key, c, cached=False)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
    assert int(info["nfe"]) == 2 * SIDE * SIDE
    assert len(np.unique(np.asarray(cached))) > 2
