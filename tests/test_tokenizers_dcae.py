"""DC-AE f32c32: converter coverage on diffusers' AutoencoderDC layout and numerical parity.

Source format: diffusers ``AutoencoderDC`` state dict (the ``-diffusers`` release). Parity
runs random weights (incl. BatchNorm running statistics) through diffusers' AutoencoderDC and
the Flax port. The reduced configs keep the f32c32 block structure (6 stages, depth-0 stem,
ResBlocks in 0-2, EfficientViT blocks in 3-5, BatchNorm/ReLU decoder stages) with fewer
channels and layers; a SANA-style config covers multi-scale qkv, conv downsampling and
interpolation upsampling. The full-width parity run is opt-in (EMIGM_SLOW_TESTS=1).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from emigm_jax.convert.common import ConversionError
from emigm_jax.convert.dcae import convert_dcae, load_dcae, variable_shapes
from emigm_jax.tokenizers.dcae import (DC_AE_F32C32_IN, AutoencoderDC, DCAEConfig,
                                       pixel_shuffle, pixel_unshuffle)

torch = pytest.importorskip("torch", reason="DC-AE tests compare with PyTorch (extra 'interop')")
diffusers = pytest.importorskip("diffusers", reason="DC-AE tests need diffusers (extra 'interop')")

SMALL = DCAEConfig(encoder_block_out_channels=(16, 32, 64, 64, 128, 128),
                   decoder_block_out_channels=(16, 32, 64, 64, 128, 128),
                   encoder_layers_per_block=(0, 1, 2, 1, 1, 1),
                   decoder_layers_per_block=(0, 1, 2, 1, 1, 1))
SANA_LIKE = DCAEConfig(encoder_block_out_channels=(16, 32, 64, 64, 128, 128),
                       decoder_block_out_channels=(16, 32, 64, 64, 128, 128),
                       encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
                       decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
                       encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                       decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
                       downsample_block_type="conv", upsample_block_type="interpolate",
                       decoder_norm_types=("rms_norm",) * 6, decoder_act_fns=("silu",) * 6)


def _torch_model(cfg: DCAEConfig, device=None):
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if device is not None:
        with torch.device(device):
            return diffusers.AutoencoderDC(**kwargs).eval()
    return diffusers.AutoencoderDC(**kwargs).eval()


def _randomize(model, seed: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if not v.dtype.is_floating_point:
                continue
            if k.endswith("running_var"):
                v.copy_(0.5 + torch.rand(v.shape, generator=g))
            elif k.endswith(("norm.weight", "norm_out.weight")):
                v.copy_(1 + 0.1 * torch.randn(v.shape, generator=g))
            elif v.ndim > 1:
                v.copy_(torch.randn(v.shape, generator=g) / np.sqrt(np.prod(v.shape[1:])))
            else:
                v.copy_(0.05 * torch.randn(v.shape, generator=g))
    return {k: v.numpy() for k, v in sd.items()}


def _parity(cfg: DCAEConfig, size: int = 64, seed: int = 0):
    model_t = _torch_model(cfg)
    sd = _randomize(model_t, seed)
    variables = convert_dcae(sd, cfg)
    model = AutoencoderDC(cfg)
    x = np.random.default_rng(seed + 1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        z_t = model_t.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent.numpy().transpose(0, 2, 3, 1)
        z = np.random.default_rng(seed + 2).standard_normal(z_t.shape).astype(np.float32)
        y_t = model_t.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    z_j = jax.jit(lambda v, x: model.apply(v, x, method=AutoencoderDC.encode))(variables, x)
    y_j = jax.jit(lambda v, z: model.apply(v, z, method=AutoencoderDC.decode))(variables, z)
    assert z_j.shape == (2, size // 32, size // 32, cfg.latent_channels)
    assert y_j.shape == x.shape
    np.testing.assert_allclose(np.asarray(z_j), z_t, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(y_j), y_t, atol=1e-4, rtol=0)
    assert float(np.abs(y_t).max()) > 0.1
    return z_t


def test_full_f32c32_key_set_is_covered():
    """All 362 tensors of the f32c32-in-1.0 AutoencoderDC fill every Flax leaf."""
    model_t = _torch_model(DC_AE_F32C32_IN, device="meta")  # shapes only, no memory
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in model_t.state_dict().items()}
    assert len(shapes) == 362
    assert sum(int(np.prod(s)) for s, _ in shapes.values()) == 323_369_275
    sd = {k: np.broadcast_to(np.zeros((), np.float32 if dt.is_floating_point else np.int64), s)
          for k, (s, dt) in shapes.items()}
    variables = convert_dcae(sd)
    want = jax.tree_util.tree_map(lambda s: s.shape, variable_shapes())
    assert jax.tree_util.tree_map(lambda a: a.shape, variables) == want
    p = variables["params"]
    assert sorted(k for k in p["encoder"] if k.startswith("down_blocks_1_")) == [
        f"down_blocks_1_{j}" for j in range(5)]      # 4 ResBlocks + downsample
    assert sorted(p["decoder"]["up_blocks_5_0"]) == ["attn", "conv_out"]
    assert "up_blocks_2_10" in p["decoder"] and "up_blocks_2_11" not in p["decoder"]
    assert set(variables["batch_stats"]["decoder"]) == (
        {f"up_blocks_1_{j}" for j in range(1, 6)} | {f"up_blocks_2_{j}" for j in range(1, 11)})


def test_conversion_errors():
    model_t = _torch_model(SMALL, device="meta")
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model_t.state_dict().items()}
    sd.pop("decoder.up_blocks.2.1.norm.running_var")
    sd["encoder.down_blocks.3.0.attn.to_q.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_dcae(sd, SMALL)
    msg = str(e.value)
    assert "batch_stats/decoder/up_blocks_2_1/norm/var (64,)" in msg
    assert "encoder.down_blocks.3.0.attn.to_q.weight (64, 32) --linear--> (32, 64)" in msg
    with pytest.raises(ValueError, match="original efficientvit DC-AE format"):
        convert_dcae({"encoder.stages.1.op_list.0.main.conv1.conv.weight": np.zeros((1,))}, SMALL)


def test_parity_small_f32c32_structure():
    _parity(SMALL)


def test_parity_sana_like_variant():
    _parity(SANA_LIKE, seed=3)


@pytest.mark.skipif(not os.environ.get("EMIGM_SLOW_TESTS"),
                    reason="full-width f32c32 parity (323M params) is opt-in: EMIGM_SLOW_TESTS=1")
def test_parity_full_f32c32():
    _parity(DC_AE_F32C32_IN)


def test_pixel_shuffle_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)  # NHWC
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    # unshuffle: [2, 6, 8, 2] NHWC from a [2, 2, 6, 8] NCHW tensor
    y = np.random.default_rng(1).standard_normal((2, 6, 8, 2)).astype(np.float32)
    yt = torch.from_numpy(y.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(np.asarray(pixel_unshuffle(y, 2)),
                                  torch.nn.functional.pixel_unshuffle(yt, 2).numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, 2)),
                                  torch.nn.functional.pixel_shuffle(xt, 2).numpy().transpose(0, 2, 3, 1))


def test_from_diffusers_config_json_and_directory_loading(tmp_path):
    """A released-style config.json (lists, strings) rebuilds the config; dir loading works."""
    released = {
        "_class_name": "AutoencoderDC", "_diffusers_version": "0.32.0",
        "attention_head_dim": 32, "decoder_act_fns": ["relu", "relu", "relu", "silu", "silu", "silu"],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock",
                                "EfficientViTBlock", "EfficientViTBlock"],
        "decoder_layers_per_block": [0, 5, 10, 2, 2, 2],
        "decoder_norm_types": ["batch_norm", "batch_norm", "batch_norm", "rms_norm", "rms_norm", "rms_norm"],
        "decoder_qkv_multiscales": [[], [], [], [], [], []],
        "downsample_block_type": "pixel_unshuffle",
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock",
                                "EfficientViTBlock", "EfficientViTBlock"],
        "encoder_layers_per_block": [0, 4, 8, 2, 2, 2],
        "encoder_qkv_multiscales": [[], [], [], [], [], []],
        "in_channels": 3, "latent_channels": 32, "scaling_factor": 1.0,
        "upsample_block_type": "pixel_shuffle",
    }
    assert DCAEConfig.from_diffusers_config(released) == DC_AE_F32C32_IN
    sana = dict(released, encoder_block_types="ResBlock", decoder_norm_types="rms_norm")
    assert DCAEConfig.from_diffusers_config(sana).decoder_norm_types == ("rms_norm",) * 6
    with pytest.raises(ValueError, match="unknown DC-AE config fields"):
        DCAEConfig.from_diffusers_config(dict(released, bogus=1))

    from safetensors.numpy import save_file
    model_t = _torch_model(SMALL)
    sd = _randomize(model_t, 5)
    cfg_json = {f.name: getattr(SMALL, f.name) for f in dataclasses.fields(SMALL)}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    variables, cfg = load_dcae(str(tmp_path))
    assert cfg == SMALL
    np.testing.assert_array_equal(variables["params"]["encoder"]["conv_out"]["bias"],
                                  sd["encoder.conv_out.bias"])
