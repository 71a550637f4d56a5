"""KL-16 VAE: converter coverage on MAR's key layout and parity with diffusers' AutoencoderKL.

The source layout is MAR's ``models/vae.py`` (``kl16.ckpt["model"]``); it is enumerated here
from MAR's architecture, independently of the Flax module. Parity runs the same random
weights through diffusers' AutoencoderKL configured as KL-16 (down blocks 0-3 plain, block 4
with attention, mid-block attention in encoder and decoder, no attention in the up path),
reached through an LDM -> diffusers key map written in this file. A strict ``load_state_dict``
into diffusers proves the enumerated MAR key set is complete and correct.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
import pytest

from emigm_jax.convert.common import ConversionError, convert_state_dict
from emigm_jax.convert.vae import KL16_RULES, convert_kl_vae, variable_shapes
from emigm_jax.tokenizers.vae import KL16, AutoencoderKL, KLVAEConfig

# Reduced-width config with the exact KL-16 block structure (5 levels, attention at level 4).
SMALL = KLVAEConfig(ch=32)


def mar_state_dict_shapes(cfg: KLVAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of MAR's AutoencoderKL(embed_dim, ch_mult) state dict."""
    sd: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = (cout, cin, k, k)
        sd[f"{name}.bias"] = (cout,)

    def norm(name, c):
        sd[f"{name}.weight"] = (c,)
        sd[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    ch, mult, n, e = cfg.ch, cfg.ch_mult, len(cfg.ch_mult), cfg.embed_dim
    conv("encoder.conv_in", 3, ch, 3)
    res, block_in = cfg.resolution, ch
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            resblock(f"encoder.down.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if res in cfg.attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        resblock(f"{part}.mid.block_1", c, c)
        attn(f"{part}.mid.attn_1", c)
        resblock(f"{part}.mid.block_2", c, c)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * e, 3)
    block_in = ch * mult[-1]
    conv("decoder.conv_in", e, block_in, 3)
    for i in reversed(range(n)):
        for j in range(cfg.num_res_blocks + 1):
            resblock(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)
    conv("quant_conv", 2 * e, 2 * e, 1)
    conv("post_quant_conv", e, e, 1)
    return sd


def random_state_dict(cfg: KLVAEConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in mar_state_dict_shapes(cfg).items():
        if re.search(r"norm\w*\.weight$", k):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith(".weight"):
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) / np.sqrt(fan_in)
        else:
            a = 0.05 * rng.standard_normal(shape)
        out[k] = a.astype(np.float32)
    return out


def test_full_kl16_key_set_is_covered():
    """Real KL-16 config: all 312 MAR tensors (66,456,019 values) fill every Flax leaf."""
    shapes = mar_state_dict_shapes(KL16)
    assert len(shapes) == 312
    assert sum(int(np.prod(s)) for s in shapes.values()) == 66_456_019
    # Zero-stride views: full-size coverage check without allocating 266 MB.
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    variables = convert_state_dict(sd, KL16_RULES, variable_shapes(KL16))
    want = jax.tree_util.tree_map(lambda s: s.shape, variable_shapes(KL16))
    got = jax.tree_util.tree_map(lambda a: a.shape, variables)
    assert got == want
    attn_keys = sorted(variables["params"]["encoder"]["down_4"])
    assert attn_keys == ["attn_0", "attn_1", "block_0", "block_1"]
    assert "attn_0" not in variables["params"]["decoder"]["up_4"]


def test_training_only_loss_keys_are_ignored():
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in mar_state_dict_shapes(SMALL).items()}
    sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)
    convert_kl_vae(sd, SMALL)  # does not raise


def test_conversion_errors_list_every_problem():
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in mar_state_dict_shapes(SMALL).items()}
    del sd["encoder.down.4.attn.1.q.weight"]
    sd["encoder.down.2.block.0.conv1.weight"] = np.zeros((64, 32, 3, 1), np.float32)
    sd["encoder.down.9.block.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    sd["model_ema.decay"] = np.zeros((), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_kl_vae(sd, SMALL)
    msg = str(e.value)
    assert "params/encoder/down_4/attn_1/q/kernel (1, 1, 128, 128)" in msg   # missing
    assert "encoder.down.2.block.0.conv1.weight (64, 32, 3, 1)" in msg       # bad shape
    assert "encoder.down.9.block.0.conv1.weight" in msg                      # unknown target
    assert "model_ema.decay" in msg                                          # unexpected
    assert "missing" in msg and "unexpected" in msg and "shape mismatches" in msg


def _mar_to_diffusers(key: str, n_levels: int) -> str:
    """LDM/MAR VAE key -> diffusers AutoencoderKL key (test-side oracle map)."""
    k = key
    m = re.match(r"decoder\.up\.(\d+)\.(.*)", k)
    if m:  # diffusers orders decoder up blocks from the lowest resolution
        k = f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.{m.group(2)}"
    k = re.sub(r"encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", k)
    k = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", k)
    k = re.sub(r"\.attn\.(\d+)\.", r".attentions.\1.", k)
    k = k.replace(".downsample.conv", ".downsamplers.0.conv").replace(".upsample.conv", ".upsamplers.0.conv")
    k = k.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
    k = k.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    k = k.replace("nin_shortcut", "conv_shortcut").replace(".norm_out.", ".conv_norm_out.")
    if ".attentions." in k:
        k = re.sub(r"\.norm\.", ".group_norm.", k)
        k = re.sub(r"\.(q|k|v)\.", r".to_\1.", k)
        k = k.replace(".proj_out.", ".to_out.0.")
    return k


def _diffusers_kl(cfg: KLVAEConfig):
    diffusers = pytest.importorskip("diffusers", reason="parity needs diffusers (extra 'interop')")
    n = len(cfg.ch_mult)
    res, downs = cfg.resolution, []
    for i in range(n):  # attention exactly where MAR's encoder has it
        downs.append("AttnDownEncoderBlock2D" if res in cfg.attn_resolutions else "DownEncoderBlock2D")
        res //= 2 if i != n - 1 else 1
    assert cfg.decoder_attn_resolutions == ()
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=tuple(downs),
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks, act_fn="silu", latent_channels=cfg.embed_dim,
        norm_num_groups=cfg.num_groups, sample_size=cfg.resolution,
        mid_block_add_attention=True).eval()


@pytest.mark.parametrize("cfg", [
    SMALL,
    pytest.param(KL16, marks=pytest.mark.skipif(
        not os.environ.get("EMIGM_SLOW_TESTS"),
        reason="full-width KL-16 parity (66M params) is opt-in: EMIGM_SLOW_TESTS=1"))],
    ids=["ch32", "kl16"])
def test_parity_with_diffusers_autoencoder_kl(cfg):
    torch = pytest.importorskip("torch", reason="parity needs PyTorch (extra 'interop')")
    model_t = _diffusers_kl(cfg)
    sd = random_state_dict(cfg, seed=1)
    n = len(cfg.ch_mult)
    sd_t = {}
    for k, v in sd.items():
        dk = _mar_to_diffusers(k, n)
        if re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", dk):
            v = v[:, :, 0, 0]
        sd_t[dk] = torch.from_numpy(v)
    assert len(sd_t) == len(model_t.state_dict()) == len(sd)
    model_t.load_state_dict(sd_t, strict=True)

    variables = convert_kl_vae(sd, cfg)
    model = AutoencoderKL(cfg)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        post = model_t.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        z = np.random.default_rng(3).standard_normal(post.mean.shape).astype(np.float32)
        dec_t = model_t.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=AutoencoderKL.encode))(variables, x)
    dec = jax.jit(lambda v, z: model.apply(v, z, method=AutoencoderKL.decode))(
        variables, z.transpose(0, 2, 3, 1))
    assert mean.shape == (2, 4, 4, 16)
    np.testing.assert_allclose(np.asarray(mean), post.mean.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), post.logvar.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    assert dec.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(np.asarray(dec), dec_t, atol=1e-4, rtol=0)
    assert float(np.abs(dec_t).max()) > 0.05  # the comparison is not vacuous


def test_posterior_sampling_and_kl_closed_form():
    from emigm_jax.tokenizers.vae import kl_to_standard_normal, sample_posterior
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    logvar = rng.uniform(-2, 1, (1, 2, 2, 3)).astype(np.float32)
    kl = float(kl_to_standard_normal(mean, logvar)[0])
    m64, lv64 = mean.astype(np.float64), logvar.astype(np.float64)
    assert kl == pytest.approx(0.5 * np.sum(m64 ** 2 + np.exp(lv64) - 1 - lv64), rel=1e-6)
    zs = jax.vmap(lambda k: sample_posterior(mean[0], logvar[0], k))(
        jax.random.split(jax.random.PRNGKey(0), 20000))
    np.testing.assert_allclose(np.asarray(zs).mean(0), mean[0], atol=0.05)
    np.testing.assert_allclose(np.asarray(zs).std(0), np.exp(0.5 * logvar[0]), rtol=0.03)


def test_load_from_safetensors_and_msgpack(tmp_path):
    from flax import serialization
    from safetensors.numpy import save_file
    from emigm_jax.convert.vae import load_kl_vae
    sd = random_state_dict(SMALL, seed=4)
    save_file(sd, str(tmp_path / "kl.safetensors"))
    v1 = load_kl_vae(str(tmp_path / "kl.safetensors"), SMALL)
    (tmp_path / "kl.msgpack").write_bytes(serialization.msgpack_serialize(v1))
    v2 = load_kl_vae(str(tmp_path / "kl.msgpack"), SMALL)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v1, v2)
    np.testing.assert_array_equal(v1["params"]["encoder"]["down_4"]["attn_1"]["q"]["kernel"][0, 0],
                                  sd["encoder.down.4.attn.1.q.weight"][:, :, 0, 0].T)
    with pytest.raises(ConversionError):  # a checkpoint for another architecture
        load_kl_vae(str(tmp_path / "kl.msgpack"), KLVAEConfig(ch=64))
