"""SD-VQ-F8 (latent-diffusion VQ-f8): converter coverage on the released key layout, plain-L2
nearest-code quantisation against a float64 numpy argmin, encode/decode on random weights.

The source layout is enumerated here from latent-diffusion's ``ldm/modules/diffusionmodules/
model.py`` (Encoder / Decoder / ResnetBlock / AttnBlock / Downsample / Upsample with
``attn_resolutions``) and ``ldm/models/autoencoder.py`` (VQModel: quant_conv,
post_quant_conv, quantize.embedding, loss.*), independently of the Flax module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.convert.common import ConversionError
from emigm_jax.convert.sdvq import convert_sdvq, load_sdvq
from emigm_jax.tokenizers.registry import build_tokenizer
from emigm_jax.tokenizers.sdvq import SD_VQ_F8, SDVQConfig, SDVQModel, sdvq_variable_shapes

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_tokenizers_sdvq")

# The VQ-f8 structure (4 levels, attention at resolution 32) at reduced width, a 64-code
# codebook, resolution 32 so the attention level is the lowest one of a 32px input (4 x 4).
SMALL = SDVQConfig(ch=32, resolution=32, attn_resolutions=(4,), decoder_attn_resolutions=(4,),
                   codebook_size=64)


def ldm_vq_state_dict_shapes(cfg: SDVQConfig, loss_keys: bool = True) -> dict:
    """Key -> shape of ``ldm.models.autoencoder.VQModel`` for ``cfg`` (double_z False)."""
    sd = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
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

    def mid(prefix, c):
        res(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        res(f"{prefix}.mid.block_2", c, c)

    ch, n, z = cfg.ch, len(cfg.ch_mult), cfg.embed_dim
    conv("encoder.conv_in", 3, ch, 3)
    in_mult, res_now = (1,) + tuple(cfg.ch_mult), cfg.resolution
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if res_now in cfg.attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res_now //= 2
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, z, 3)  # double_z=False
    block_in = ch * cfg.ch_mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(n)):
        block_out = ch * cfg.ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if res_now in cfg.decoder_attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res_now *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)
    conv("quant_conv", z, z, 1)
    conv("post_quant_conv", z, z, 1)
    sd["quantize.embedding.weight"] = (cfg.codebook_size, z)
    if loss_keys:  # VQLPIPSWithDiscriminator: training-only tensors stored in the checkpoint
        sd["loss.logvar"] = ()
        sd["loss.discriminator.main.0.weight"] = (64, 3, 4, 4)
        sd["loss.perceptual_loss.net.slice1.0.weight"] = (64, 3, 3, 3)
    return sd


def random_state_dict(cfg, seed=0, loss_keys=True):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.1
            for k, s in ldm_vq_state_dict_shapes(cfg, loss_keys).items()}


def test_full_vq_f8_layout_is_covered_with_the_released_shapes():
    shapes = ldm_vq_state_dict_shapes(SD_VQ_F8)
    sd = {k: np.broadcast_to(np.float32(0.0), s) for k, s in shapes.items()}
    variables = convert_sdvq(sd)
    flat = jax.tree_util.tree_leaves_with_path(variables)
    n_flax = sum(int(np.prod(v.shape)) for _, v in flat)
    n_src = sum(int(np.prod(s)) for k, s in shapes.items() if not k.startswith("loss."))
    assert n_flax == n_src
    assert variables["params"]["quantize"]["embedding"].shape == (16384, 4)
    assert variables["params"]["encoder"]["down_3"]["attn_1"]["q"]["kernel"].shape == (1, 1, 512, 512)
    assert "attn_0" in variables["params"]["decoder"]["up_3"]
    assert "attn_0" not in variables["params"]["decoder"]["up_2"]
    assert SD_VQ_F8.stride == 8


def test_conversion_maps_values_and_layouts():
    sd = random_state_dict(SMALL, seed=1)
    p = convert_sdvq(sd, SMALL)["params"]
    np.testing.assert_array_equal(p["quantize"]["embedding"], sd["quantize.embedding.weight"])
    np.testing.assert_array_equal(p["encoder"]["down_1"]["block_0"]["conv1"]["kernel"],
                                  sd["encoder.down.1.block.0.conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["decoder"]["mid"]["attn_1"]["norm"]["scale"],
                                  sd["decoder.mid.attn_1.norm.weight"])
    np.testing.assert_array_equal(p["post_quant_conv"]["bias"], sd["post_quant_conv.bias"])


def test_conversion_errors_list_every_problem():
    sd = random_state_dict(SMALL, seed=2)
    del sd["decoder.up.0.block.2.conv2.weight"]
    sd["model_ema.decay"] = np.zeros(())
    with pytest.raises(ConversionError) as e:
        convert_sdvq(sd, SMALL)
    msg = str(e.value)
    assert "model_ema.decay" in msg and "up_0" in msg and "conv2" in msg


@pytest.fixture(scope="module")
def small():
    sd = random_state_dict(SMALL, seed=3, loss_keys=False)
    return SDVQModel(SMALL), convert_sdvq(sd, SMALL)


def test_encode_picks_the_plain_l2_nearest_raw_code(small):
    model, v = small
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    ids, z = model.apply(v, x, method="encode_with_latent")
    assert ids.shape == (2, 16) and z.shape == (2, 4, 4, 4)
    e = np.asarray(v["params"]["quantize"]["embedding"], np.float64)
    zz = np.asarray(z, np.float64).reshape(-1, 4)
    ref = np.argmin(((zz[:, None, :] - e[None]) ** 2).sum(-1), axis=1).reshape(2, 16)
    np.testing.assert_array_equal(np.asarray(ids), ref)
    assert len(np.unique(ref)) > 3
    # plain L2, not cosine: scaling the latent changes some ids
    scaled = model.apply(v, 5.0 * z.reshape(-1, 4), method=lambda m, q: m.quantize(q))
    assert (np.asarray(scaled).reshape(2, 16) != ref).any()


def test_decode_looks_up_raw_rows_and_checks_grid(small):
    model, v = small
    ids = jnp.array([[0, 5, 63, 7] * 4, [1] * 16])
    img = model.apply(v, ids, method="decode")
    assert img.shape == (2, 32, 32, 3)
    rows = jnp.asarray(v["params"]["quantize"]["embedding"])[ids].reshape(2, 4, 4, 4)
    ref = model.apply(v, rows, method="decode_latent")
    np.testing.assert_allclose(np.asarray(img), np.asarray(ref), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(img[0]) - np.asarray(img[1])).max() > 1e-3
    with pytest.raises(ValueError, match="15 tokens is not a square grid"):
        model.apply(v, ids[:, :15], method="decode")


def test_registry_sdvq_f8_tokenizer_roundtrip(tmp_path):
    from flax import serialization
    tok = build_tokenizer("sdvq_f8", arch={"ch": 32, "resolution": 32, "attn_resolutions": (4,),
                                           "decoder_attn_resolutions": (4,),
                                           "codebook_size": 64})
    assert tok.discrete and tok.stride == 8 and tok.latent_shape(256) == (32, 32, 1)
    v = convert_sdvq(random_state_dict(SMALL, seed=4), SMALL)
    path = tmp_path / "sdvq.msgpack"
    path.write_bytes(serialization.msgpack_serialize(v))
    v2 = load_sdvq(str(path), SMALL)
    x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3), minval=-1.0, maxval=1.0)
    ids = tok.images_to_tokens(v2, x, None)
    assert ids.shape == (1, 16) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(
        SDVQModel(SMALL).apply(v, x, method="encode")))
    img = tok.decode_tokens(v2, ids)
    assert img.shape == (1, 32, 32, 3) and np.isfinite(np.asarray(img)).all()
    assert sdvq_variable_shapes(SMALL)["params"]["quantize"]["embedding"].shape == (64, 4)
