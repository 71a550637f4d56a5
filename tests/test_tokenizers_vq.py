"""LlamaGen VQ-16: converter coverage on the released key layout, cosine nearest-code
quantisation against a float64 numpy argmin, and parity with a plain-torch forward.

The source layout (``vq_ds16_c2i.pt["model"]``) is enumerated here from LlamaGen's
``tokenizer/tokenizer_image/vq_model.py`` module definitions (VQModel / Encoder / Decoder /
ResnetBlock / AttnBlock / Downsample / Upsample / VectorQuantizer with its ``codebook_used``
buffer), independently of the Flax module. The torch reference below is a functional forward
written from the same definitions; it reads the state dict by key and records which keys it
used, so it also proves the enumerated key set is exactly what the forward needs.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.convert.common import ConversionError, convert_state_dict
from emigm_jax.convert.vq import VQ16_RULES, convert_vq, load_vq
from emigm_jax.tokenizers.vq import (VQ16, VQConfig, VQModel, lookup_codes, nearest_code_ids,
                                     token_grid, vq_variable_shapes)

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_tokenizers_vq")

# Full VQ-16 block structure (5 levels, attention at the lowest resolution) at reduced width,
# a 64-code codebook and z_channels 32: 64px images -> 4 x 4 = 16 tokens.
SMALL = VQConfig(ch=32, z_channels=32, codebook_size=64)
USAGE_BUFFER = 65536  # LlamaGen VectorQuantizer.codebook_used (show_usage=True default)


def llamagen_state_dict_shapes(cfg: VQConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of LlamaGen's VQModel(ModelArgs) state dict for ``cfg``."""
    sd: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = (cout, cin, k, k)
        sd[f"{name}.bias"] = (cout,)

    def norm(name, c):
        sd[f"{name}.weight"] = (c,)
        sd[f"{name}.bias"] = (c,)

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
        res(f"{prefix}.mid.0", c, c)
        attn(f"{prefix}.mid.1", c)
        res(f"{prefix}.mid.2", c, c)

    ch, n = cfg.ch, len(cfg.encoder_ch_mult)
    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    in_mult = (1,) + tuple(cfg.encoder_ch_mult)
    for i in range(n):
        block_in, block_out = ch * in_mult[i], ch * cfg.encoder_ch_mult[i]
        for j in range(cfg.num_res_blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == n - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != n - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, cfg.z_channels, 3)

    block_in = ch * cfg.decoder_ch_mult[-1]
    conv("decoder.conv_in", cfg.z_channels, block_in, 3)
    mid("decoder", block_in)
    for k, i in enumerate(reversed(range(n))):
        block_out = ch * cfg.decoder_ch_mult[i]
        for j in range(cfg.num_res_blocks + 1):
            res(f"decoder.conv_blocks.{k}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == n - 1:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, cfg.out_channels, 3)

    sd["quantize.embedding.weight"] = (cfg.codebook_size, cfg.codebook_embed_dim)
    sd["quantize.codebook_used"] = (USAGE_BUFFER,)
    conv("quant_conv", cfg.z_channels, cfg.codebook_embed_dim, 1)
    conv("post_quant_conv", cfg.codebook_embed_dim, cfg.z_channels, 1)
    return sd


def random_state_dict(cfg: VQConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in llamagen_state_dict_shapes(cfg).items():
        if k == "quantize.codebook_used":
            a = rng.integers(0, cfg.codebook_size, shape)
        elif k == "quantize.embedding.weight":
            a = rng.standard_normal(shape) * rng.uniform(0.5, 2.0, (shape[0], 1))  # not unit rows
        elif re.search(r"norm\w*\.weight$", k):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith(".weight"):
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            a = 0.05 * rng.standard_normal(shape)
        out[k] = a.astype(np.float32)
    return out


def _zeros_like_layout(cfg):  # zero-stride views: coverage checks without allocating
    return {k: np.broadcast_to(np.float32(0), s) for k, s in llamagen_state_dict_shapes(cfg).items()}


def _np_nearest(z, codebook):
    """float64 cosine nearest code: z [M, D], codebook [K, D] -> (ids [M], distances [M, K])."""
    z = np.asarray(z, np.float64)
    e = np.asarray(codebook, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    d = 2.0 - 2.0 * z @ e.T  # |z - e|^2 for unit vectors (float64: exact to ~1e-15)
    return d.argmin(-1), d


# ----------------------------------------------------------------------------- layout / converter

def test_full_vq16_key_set_shapes_and_parameter_count():
    """Released VQ-16: 344 tensors, 71,948,939 values = 71,883,403 parameters + 65,536 buffer."""
    shapes = llamagen_state_dict_shapes(VQ16)
    assert len(shapes) == 344
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert total == 71_948_939
    assert total - USAGE_BUFFER == 71_883_403  # LlamaGen README: "72M"
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["encoder.conv_blocks.4.attn.1.q.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.0.attn.2.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["decoder.conv_blocks.4.res.0.conv1.weight"] == (128, 128, 3, 3)

    variables = convert_state_dict(_zeros_like_layout(VQ16), VQ16_RULES, vq_variable_shapes(VQ16))
    want = jax.tree_util.tree_map(lambda s: s.shape, vq_variable_shapes(VQ16))
    assert jax.tree_util.tree_map(lambda a: a.shape, variables) == want
    p = variables["params"]
    assert sum(a.size for a in jax.tree_util.tree_leaves(variables)) == 71_883_403
    assert sorted(p["encoder"]["down_4"]) == ["attn_0", "attn_1", "block_0", "block_1"]
    assert "downsample" in p["encoder"]["down_3"]
    assert sorted(p["decoder"]["up_4"]) == ["attn_0", "attn_1", "attn_2", "block_0", "block_1",
                                            "block_2", "upsample"]
    assert sorted(p["decoder"]["up_0"]) == ["block_0", "block_1", "block_2"]
    assert sorted(p["encoder"]["mid"]) == ["attn_1", "block_1", "block_2"]
    assert p["quantize"]["embedding"].shape == (16384, 8)


def test_vq8_layout_is_covered_and_has_stride_8():
    """LlamaGen VQ-8 (vq_ds8_c2i.pt): ch_mult (1, 2, 2, 4), so 4 levels and f8 tokens."""
    from emigm_jax.convert.vq import vq_rules
    from emigm_jax.tokenizers.vq import VQ8
    assert VQ8.stride == 8 and VQ8.codebook_size == 16384 and VQ8.codebook_embed_dim == 8
    from emigm_jax.tokenizers import build_tokenizer
    tok = build_tokenizer("vq8")
    assert tok.arch == VQ8 and tok.stride == 8 and tok.discrete
    shapes = llamagen_state_dict_shapes(VQ8)
    assert "encoder.conv_blocks.3.attn.1.q.weight" in shapes  # attention at the lowest level
    assert not any(k.startswith("encoder.conv_blocks.4.") for k in shapes)
    variables = convert_state_dict(_zeros_like_layout(VQ8), vq_rules(VQ8), vq_variable_shapes(VQ8))
    want = jax.tree_util.tree_map(lambda s: s.shape, vq_variable_shapes(VQ8))
    assert jax.tree_util.tree_map(lambda a: a.shape, variables) == want
    assert sum(a.size for a in jax.tree_util.tree_leaves(variables)) == sum(
        int(np.prod(s)) for k, s in shapes.items() if k != "quantize.codebook_used")


def test_conversion_maps_values_and_layouts():
    sd = random_state_dict(SMALL, seed=3)
    p = convert_vq(sd, SMALL)["params"]
    n = len(SMALL.decoder_ch_mult)
    np.testing.assert_array_equal(p["quantize"]["embedding"], sd["quantize.embedding.weight"])
    np.testing.assert_array_equal(  # decoder conv_blocks.k is Flax level n-1-k
        p["decoder"][f"up_{n - 1}"]["attn_2"]["q"]["kernel"],
        sd["decoder.conv_blocks.0.attn.2.q.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        p["decoder"]["up_1"]["upsample"]["conv"]["kernel"],
        sd[f"decoder.conv_blocks.{n - 2}.upsample.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["encoder"]["mid"]["attn_1"]["norm"]["scale"],
                                  sd["encoder.mid.1.norm.weight"])
    np.testing.assert_array_equal(p["decoder"]["mid"]["block_2"]["norm2"]["bias"],
                                  sd["decoder.mid.2.norm2.bias"])
    np.testing.assert_array_equal(p["encoder"]["down_2"]["block_0"]["nin_shortcut"]["kernel"],
                                  sd["encoder.conv_blocks.2.res.0.nin_shortcut.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["quant_conv"]["kernel"][0, 0],
                                  sd["quant_conv.weight"][:, :, 0, 0].T)


def test_usage_buffer_is_optional():
    sd = _zeros_like_layout(SMALL)
    del sd["quantize.codebook_used"]
    convert_vq(sd, SMALL)  # does not raise


def test_conversion_errors_list_every_problem():
    sd = _zeros_like_layout(SMALL)
    del sd["decoder.conv_blocks.0.attn.1.k.weight"]
    sd["encoder.conv_blocks.1.res.0.conv1.weight"] = np.zeros((32, 32, 1, 3), np.float32)
    sd["decoder.conv_blocks.7.res.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    sd["quantize.embedding.weight"] = np.zeros((64, 4), np.float32)
    sd["discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_vq(sd, SMALL)
    msg = str(e.value)
    assert "params/decoder/up_4/attn_1/k/kernel (1, 1, 128, 128)" in msg            # missing
    assert "encoder.conv_blocks.1.res.0.conv1.weight (32, 32, 1, 3)" in msg          # bad shape
    assert "quantize.embedding.weight (64, 4)" in msg                                # bad shape
    assert "discriminator.main.0.weight" in msg                                      # unexpected
    assert "decoder.conv_blocks.7.res.0.conv1.weight" in msg                         # unknown level
    assert "missing" in msg and "unexpected" in msg and "shape mismatches" in msg


def test_load_vq_from_torch_checkpoint_and_msgpack(tmp_path):
    torch = pytest.importorskip("torch", reason="reading .pt needs PyTorch (extra 'interop')")
    import argparse
    from flax import serialization
    sd = random_state_dict(SMALL, seed=5)
    src = tmp_path / "vq_small.pt"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "steps": 7,
                "args": argparse.Namespace(vq_model="VQ-16")}, src)
    v = load_vq(str(src), SMALL)
    np.testing.assert_array_equal(v["params"]["encoder"]["conv_in"]["bias"], sd["encoder.conv_in.bias"])
    dst = tmp_path / "vq_small.msgpack"
    dst.write_bytes(serialization.msgpack_serialize(v))
    v2 = load_vq(str(dst), SMALL)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v, v2)
    with pytest.raises(KeyError, match="'ema'"):
        load_vq(str(src), SMALL, key="ema")


# ----------------------------------------------------------------------------- quantisation

def test_nearest_code_ids_match_float64_argmin_full_codebook():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((16384, 8)).astype(np.float32) * 3.0   # raw, not unit rows
    z = rng.standard_normal((2, 16, 16, 8)).astype(np.float32) * 0.1
    ids = np.asarray(jax.jit(lambda z, e: nearest_code_ids(z, e, chunk=100))(z, codebook))
    assert ids.shape == (2, 16, 16) and ids.dtype == np.int32
    want, d = _np_nearest(z.reshape(-1, 8), codebook)
    got = ids.reshape(-1)
    # float32 may only disagree on float64 near-ties; random data here has none.
    gap = np.sort(d, axis=-1)[:, 1] - d.min(-1)
    assert gap.min() > 1e-6
    np.testing.assert_array_equal(got, want)
    # Chunked and one-shot searches agree bit for bit.
    np.testing.assert_array_equal(ids, np.asarray(nearest_code_ids(z, codebook, chunk=None)))


def test_quantisation_is_cosine_scale_invariant():
    rng = np.random.default_rng(1)
    codebook = rng.standard_normal((64, 8)).astype(np.float32)
    k = rng.permutation(64)[:20]
    scales = rng.uniform(1e-3, 1e3, (20, 1)).astype(np.float32)
    z = codebook[k] * scales                        # positive rescaling keeps the direction
    np.testing.assert_array_equal(np.asarray(nearest_code_ids(z, codebook)), k)
    # Without l2 normalisation the scaled vectors go to other (larger-norm) codes.
    assert (np.asarray(nearest_code_ids(z, codebook, l2_norm=False)) != k).any()
    # Lookup returns unit rows in the direction of the raw codebook row.
    e = np.asarray(lookup_codes(jnp.asarray(k), codebook))
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(e * np.linalg.norm(codebook[k], axis=-1, keepdims=True),
                               codebook[k], rtol=1e-5, atol=1e-6)


def test_nearest_code_ids_rejects_wrong_dim():
    with pytest.raises(ValueError, match="3 channels.*8"):
        nearest_code_ids(jnp.zeros((4, 3)), jnp.zeros((16, 8)))


@pytest.fixture(scope="module")
def small_model():
    """Random SMALL weights in LlamaGen layout, converted, and the model's jitted entry points
    (compiled once for the module: 2 images of 64px, i.e. a 4 x 4 grid)."""
    sd = random_state_dict(SMALL, seed=1)
    variables = convert_vq(sd, SMALL)
    model = VQModel(SMALL)
    encode = jax.jit(lambda v, x: model.apply(v, x, method=VQModel.encode_with_latent))
    decode = jax.jit(lambda v, i: model.apply(v, i, method=VQModel.decode))
    x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    ids, z = encode(variables, x)
    return dict(sd=sd, variables=variables, model=model, x=x, ids=np.asarray(ids),
                z=np.asarray(z), img=np.asarray(decode(variables, ids)))


def test_encode_picks_nearest_normalised_code(small_model):
    ids, z, variables = small_model["ids"], small_model["z"], small_model["variables"]
    assert z.shape == (2, 4, 4, 8) and ids.shape == (2, 16) and ids.dtype == np.int32
    want, d = _np_nearest(z.reshape(-1, 8), variables["params"]["quantize"]["embedding"])
    assert (np.sort(d, -1)[:, 1] - d.min(-1)).min() > 1e-6
    np.testing.assert_array_equal(ids.reshape(-1), want)   # raster order: (b, row, col)
    assert len(np.unique(ids)) > 4                          # not a degenerate constant code


def test_decode_uses_normalised_codes_and_checks_grid(small_model):
    model, variables = small_model["model"], small_model["variables"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (1, 8)), jnp.int32)
    zq = model.apply(variables, ids, (2, 4), method=VQModel.codes_to_latent)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zq), axis=-1), 1.0, rtol=1e-6)
    img = jax.eval_shape(lambda v, i: model.apply(v, i, (2, 4), method=VQModel.decode), variables, ids)
    assert img.shape == (1, 32, 64, 3)
    with pytest.raises(ValueError, match="8 tokens is not a square grid"):
        token_grid(8)
    with pytest.raises(ValueError, match=r"grid \(3, 3\) holds 9 tokens, but 8"):
        token_grid(8, (3, 3))


# ----------------------------------------------------------------------------- torch parity

class _TorchVQ:
    """Functional LlamaGen VQModel forward over a state dict (test oracle, NCHW)."""

    def __init__(self, sd, cfg: VQConfig):
        import torch
        self.torch, self.cfg = torch, cfg
        self.t = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
        self.used: set[str] = set()

    def p(self, k):
        self.used.add(k)
        return self.t[k]

    def conv(self, name, h, stride=1, pad=None):
        w = self.p(f"{name}.weight")
        pad = w.shape[-1] // 2 if pad is None else pad
        return self.torch.nn.functional.conv2d(h, w, self.p(f"{name}.bias"), stride=stride, padding=pad)

    def gn(self, name, h):
        return self.torch.nn.functional.group_norm(h, self.cfg.num_groups, self.p(f"{name}.weight"),
                                                   self.p(f"{name}.bias"), eps=self.cfg.norm_eps)

    def res(self, name, h):
        silu = self.torch.nn.functional.silu
        y = self.conv(f"{name}.conv1", silu(self.gn(f"{name}.norm1", h)))
        y = self.conv(f"{name}.conv2", silu(self.gn(f"{name}.norm2", y)))
        if f"{name}.nin_shortcut.weight" in self.t:
            h = self.conv(f"{name}.nin_shortcut", h)
        return h + y

    def attn(self, name, h):
        b, c, hh, ww = h.shape
        n = self.gn(f"{name}.norm", h)
        q, k, v = (self.conv(f"{name}.{s}", n).reshape(b, c, hh * ww) for s in "qkv")
        a = self.torch.softmax(self.torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=-1)
        o = self.torch.einsum("bij,bcj->bci", a, v).reshape(b, c, hh, ww)
        return h + self.conv(f"{name}.proj_out", o)

    def mid(self, part, h):
        return self.res(f"{part}.mid.2", self.attn(f"{part}.mid.1", self.res(f"{part}.mid.0", h)))

    def encode(self, x):  # [B, 3, H, W] -> ids [B, h*w], latent [B, D, h, w]
        F, cfg = self.torch.nn.functional, self.cfg
        n = len(cfg.encoder_ch_mult)
        h = self.conv("encoder.conv_in", x)
        for i in range(n):
            for j in range(cfg.num_res_blocks):
                h = self.res(f"encoder.conv_blocks.{i}.res.{j}", h)
                if i == n - 1:
                    h = self.attn(f"encoder.conv_blocks.{i}.attn.{j}", h)
            if i != n - 1:
                h = self.conv(f"encoder.conv_blocks.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)),
                              stride=2, pad=0)
        h = F.silu(self.gn("encoder.norm_out", self.mid("encoder", h)))
        z = self.conv("quant_conv", self.conv("encoder.conv_out", h))
        b, d, hh, ww = z.shape
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
        e = F.normalize(self.p("quantize.embedding.weight"), dim=-1)
        dist = (zf ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * zf @ e.T
        return dist.argmin(1).reshape(b, hh * ww), z

    def decode(self, ids, hh, ww):  # [B, h*w] -> [B, 3, H, W]
        F, cfg = self.torch.nn.functional, self.cfg
        e = F.normalize(self.p("quantize.embedding.weight"), dim=-1)
        b = ids.shape[0]
        zq = e[ids.reshape(-1)].reshape(b, hh, ww, -1).permute(0, 3, 1, 2)
        h = self.conv("decoder.conv_in", self.conv("post_quant_conv", zq))
        h = self.mid("decoder", h)
        n = len(cfg.decoder_ch_mult)
        for k in range(n):
            for j in range(cfg.num_res_blocks + 1):
                h = self.res(f"decoder.conv_blocks.{k}.res.{j}", h)
                if k == 0:
                    h = self.attn(f"decoder.conv_blocks.{k}.attn.{j}", h)
            if k != n - 1:
                h = self.conv(f"decoder.conv_blocks.{k}.upsample.conv",
                              F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv("decoder.conv_out", F.silu(self.gn("decoder.norm_out", h)))


def test_parity_with_plain_torch_forward(small_model):
    torch = pytest.importorskip("torch", reason="parity needs PyTorch (extra 'interop')")
    sd, x = small_model["sd"], small_model["x"]
    ref = _TorchVQ(sd, SMALL)
    with torch.no_grad():
        ids_t, z_t = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2)))
        img_t = ref.decode(ids_t, 4, 4).numpy().transpose(0, 2, 3, 1)
    # The oracle consumed every enumerated tensor except the training-only usage buffer.
    assert ref.used == set(sd) - {"quantize.codebook_used"}

    np.testing.assert_allclose(small_model["z"], z_t.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(small_model["ids"], ids_t.numpy())
    img = small_model["img"]
    assert img.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(img, img_t, rtol=1e-4, atol=2e-4 * np.abs(img_t).max())


def test_registry_vq_roundtrip_through_tokens():
    """The registry's discrete path: images -> ids [B, N] -> images, with a tiny VQ."""
    import jax
    import jax.numpy as jnp

    from emigm_jax.tokenizers.registry import build_tokenizer

    tok = build_tokenizer("vq", arch=dict(ch=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                                          z_channels=16, codebook_size=64, num_res_blocks=1,
                                          num_groups=8))
    assert tok.discrete and tok.channels == 1 and tok.scale == 1.0
    v = tok.random_variables(0)
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    ids = tok.images_to_tokens(v, images, None)
    assert ids.shape == (2, 64) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    direct = tok.module.apply(v, images, method=type(tok.module).encode)
    assert (ids == direct).all()
    out = tok.decode_tokens(v, ids)
    assert out.shape == (2, 16, 16, 3)


def test_evaluation_decodes_sampled_code_ids():
    """--mode=evaluate / sweep on a categorical (VQ) config: ids [B, N] -> uint8 images."""
    import types
    import jax
    import ml_collections

    from emigm_jax import sharding
    from emigm_jax.evaluation.evaluate import make_decode_fn
    from emigm_jax.convert.tokenizers import tokenizer_from_config
    from tests.conftest import tiny_config

    c = tiny_config("categorical", "single")  # 16px, stride 4: 16 tokens over 7 codes
    c.tokenizer = ml_collections.ConfigDict(dict(
        name="vq", path="", scale=1.0, random_init=True, seed=0,
        arch=dict(ch=32, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2), z_channels=16,
                  codebook_size=7, num_res_blocks=1, num_groups=8)))
    mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))
    decode = make_decode_fn(c, mesh)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 7)
    images = np.asarray(decode(ids))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    tok, v = tokenizer_from_config(c)
    ref = np.asarray(tok.decode_tokens(v, ids, grid=(4, 4)), np.float32)
    want = np.clip(np.round((ref + 1.0) * 127.5), 0, 255)
    assert np.abs(images.astype(np.float32) - want).max() <= 1.0  # rounding at .5 only
    c.model.head = "diffusion"
    with pytest.raises(ValueError, match="model.head='diffusion' cannot be decoded by "
                                         "tokenizer.name='vq'"):
        make_decode_fn(c, mesh)
