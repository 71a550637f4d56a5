"""The shared converter helper (`convert.common`) and the tokenizer interface (`Tokenizer`)."""
from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.convert.common import (ConversionError, Rule, convert_state_dict, dotted_to_path,
                                      load_state_dict)
from emigm_jax.convert.tokenizers import tokenizer_from_config
from emigm_jax.tokenizers import build_tokenizer, moments_to_tokens_np

TINY_KL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
               embed_dim=4)
TINY_DC = dict(latent_channels=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
               decoder_block_types=("ResBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(16, 32), decoder_block_out_channels=(16, 32),
               encoder_layers_per_block=(0, 1), decoder_layers_per_block=(0, 1),
               encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
               decoder_norm_types=("batch_norm", "rms_norm"), decoder_act_fns=("relu", "silu"))


def _target():
    return {"params": {"lin": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))},
                       "conv_0": {"kernel": jnp.zeros((3, 3, 4, 5))}},
            "batch_stats": {"bn": {"mean": jnp.zeros((5,))}}}


RULES = (Rule(r"skip\..*", None),
         Rule(r"(?P<m>lin)\.weight", r"params.\g<m>.kernel", "linear"),
         Rule(r"(?P<m>.+)\.bias", r"params.\g<m>.bias"),
         Rule(r"(?P<m>conv\.\d+)\.weight", r"params.\g<m>.kernel", "conv2d"),
         Rule(r"(?P<m>bn)\.running_mean", r"batch_stats.\g<m>.mean"))


def _source():
    rng = np.random.default_rng(0)
    return {"lin.weight": rng.standard_normal((2, 3)).astype(np.float16),
            "lin.bias": rng.standard_normal(2), "conv.0.weight": rng.standard_normal((5, 4, 3, 3)),
            "bn.running_mean": rng.standard_normal(5), "skip.me": np.zeros(1)}


def test_convert_maps_transposes_and_casts():
    sd = _source()
    out, report = convert_state_dict(sd, RULES, _target(), return_report=True)
    np.testing.assert_array_equal(out["params"]["lin"]["kernel"], sd["lin.weight"].T.astype(np.float32))
    assert out["params"]["lin"]["kernel"].dtype == np.float32
    assert out["params"]["conv_0"]["kernel"][1, 2, 3, 4] == np.float32(sd["conv.0.weight"][4, 3, 1, 2])
    assert report.converted == 4 and report.ignored == ["skip.me"]
    assert dotted_to_path("params.a.0.b.12.c") == ("params", "a_0", "b_12", "c")


def test_convert_reports_all_problem_kinds():
    sd = _source()
    sd["lin.weight"] = np.zeros((2, 4))                 # wrong shape after transpose
    sd["conv.0.weight"] = np.zeros((5, 4))              # wrong ndim for conv2d
    sd["mystery"] = np.zeros(3)                         # no rule
    sd["other.bias"] = np.zeros(2)                      # rule, but no such target
    del sd["bn.running_mean"]                           # missing
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, RULES, _target(), what="toy")
    msg = str(e.value)
    for s in ("toy does not match", "mystery (3,)", "other.bias (2,) -> params/other/bias",
              "lin.weight (2, 4) --linear--> (4, 2) != params/lin/kernel (3, 2)",
              "conv.0.weight: transform 'conv2d' expects a 4-D tensor",
              "batch_stats/bn/mean (5,)"):
        assert s in msg, s
    dup = (Rule(r"lin\.(weight|bias)", r"params.lin.bias"),)
    with pytest.raises(ConversionError, match="several source keys for one target"):
        convert_state_dict({"lin.weight": np.zeros(2), "lin.bias": np.zeros(2)}, dup,
                           {"params": {"lin": {"bias": jnp.zeros(2)}}})


def test_load_state_dict_formats(tmp_path):
    torch = pytest.importorskip("torch", reason="torch checkpoint reading needs PyTorch")
    from safetensors.numpy import save_file
    sd = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(load_state_dict(tmp_path / "w.safetensors")["a.weight"], sd["a.weight"])
    torch.save({"model": {"a.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, "epoch": 3},
               tmp_path / "w.ckpt")
    out = load_state_dict(tmp_path / "w.ckpt", key="model")
    assert out["a.weight"].dtype == np.float32 and out["a.weight"].sum() == 6
    with pytest.raises(ValueError, match="not a tensor"):
        load_state_dict(tmp_path / "w.ckpt")
    with pytest.raises(KeyError, match="no entry 'ema'"):
        load_state_dict(tmp_path / "w.ckpt", key="ema")
    # a pickled object outside the allow-list (argparse.Namespace is allowed: official args)
    torch.save({"model": {"a.weight": torch.ones(1)}, "extra": fractions.Fraction(1, 3)},
               tmp_path / "p.pth")
    with pytest.raises(ValueError, match="trusted_pickle"):
        load_state_dict(tmp_path / "p.pth", key="model")
    assert load_state_dict(tmp_path / "p.pth", key="model", trusted_pickle=True)["a.weight"].shape == (1,)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("name,arch,k", [("kl16", TINY_KL, 2), ("dcae_f32c32", TINY_DC, 1)])
def test_tokenizer_interface(name, arch, k):
    tok = build_tokenizer(name, arch=arch)
    assert tok.num_moments == k and tok.scale == {"kl16": 0.2325, "dcae_f32c32": 0.3189}[name]
    v = tok.random_variables(0)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    m = jax.jit(tok.encode_moments)(v, x)
    h = 16 // tok.stride
    assert m.shape == (2, k, h, h, tok.channels)
    rng = jax.random.PRNGKey(1)
    t = tok.moments_to_tokens(m, rng)
    assert t.shape == (2, h * h, tok.channels)
    noise = np.asarray(jax.random.normal(rng, m[:, 0].shape)) if k == 2 else [None, None]
    for b in range(2):
        np.testing.assert_allclose(np.asarray(t[b]), moments_to_tokens_np(
            np.asarray(m[b]), tok.scale, noise[b]), rtol=1e-5, atol=1e-6)
    imgs = jax.jit(tok.decode_tokens)(v, t)
    assert imgs.shape == (2, 16, 16, 3) and bool(jnp.isfinite(imgs).all())
    u8 = ((np.asarray(x) + 1) * 127.5).round().astype(np.uint8)
    t2 = jax.jit(tok.images_to_tokens)(v, jnp.asarray(u8), rng)
    assert t2.shape == t.shape


def test_tokenizer_config_errors():
    import ml_collections
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("vqgan")
    with pytest.raises(ValueError, match="do not exist for kl16"):
        build_tokenizer("kl16", arch={"channels": 3})
    cfg = ml_collections.ConfigDict(dict(tokenizer=dict(name="kl16", path="", scale=0.2325)))
    with pytest.raises(ValueError, match="config.tokenizer.path is empty"):
        tokenizer_from_config(cfg)
    with pytest.raises(ValueError, match="not a multiple"):
        build_tokenizer("kl16").latent_shape(250)
    assert build_tokenizer("kl16").latent_shape(256) == (16, 16, 16)
    assert build_tokenizer("dcae_f32c32").latent_shape(512) == (16, 16, 32)
