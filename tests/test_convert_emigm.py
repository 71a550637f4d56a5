"""Official eMIGM checkpoint conversion: layout coverage, forward parity, EMA semantics, CLI.

The torch model below is this test's own plain-torch implementation of the reference
forward (models/emigm.py with timm's Block, MAR's SimpleMLPAdaLN), written from their
semantics: same module names and registration order (so its ``state_dict()`` has exactly
the official layout, incl. the shared mask/fake vector listed twice), the reference's
token dropping by boolean index select, and scatter-back with the mask token. timm is not
needed.
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_convert_emigm")

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed; install the interop extra: pip install -e '.[interop]'")
nn = torch.nn

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import emigm_s_256, emigm_xs_256  # noqa: E402
from emigm_jax.convert import emigm as conv  # noqa: E402
from emigm_jax.models import build_model, param_count, seq_len, token_dim  # noqa: E402
from tests.conftest import ROOT, tiny_config  # noqa: E402


# ------------------------------------------------------------------ reference torch model
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        hd = c // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, hd]
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [cos | sin]
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.in_ln = nn.LayerNorm(ch, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(ch, ch), nn.SiLU(), nn.Linear(ch, ch))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 3 * ch))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, ch, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(ch, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(ch, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(ch, 2 * ch))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_ch, width, z_ch, depth):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_ch, width)
        self.input_proj = nn.Linear(in_ch, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_ch)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for blk in self.res_blocks:
            x = blk(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    def __init__(self, in_ch, width, z_ch, depth):
        super().__init__()
        self.net = SimpleMLPAdaLN(in_ch, width, z_ch, depth)


class TorchEMIGM(nn.Module):
    """Registration order as in the reference __init__ (it fixes the state_dict order)."""

    def __init__(self, config, shared=True):
        super().__init__()
        m = config.model
        d, self.buffer, self.shared = m.width, m.buffer_size, shared
        n, c = seq_len(config), token_dim(config)
        self.class_emb = nn.Embedding(m.num_classes, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.z_proj = nn.Linear(c, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + self.buffer, d))
        self.encoder_blocks = nn.ModuleList([Block(d, m.num_heads) for _ in range(m.enc_depth)])
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, d)
        if shared:
            self.mask_token = self.fake_latent  # one Parameter under two names
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n + self.buffer, d))
        self.decoder_blocks = nn.ModuleList([Block(d, m.num_heads) for _ in range(m.dec_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
        self.diffloss = DiffLoss(c, m.head_width, d, m.head_depth)

    @torch.no_grad()
    def randomize_(self, seed):
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
                    name.endswith("ln.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "time_embed.mlp.0.weight" in name:  # reference init; keeps the fp32 ulp
                p.copy_(0.02 * torch.randn(p.shape, generator=g))  # noise of sin/cos(999 f) small
            elif "adaLN_modulation" in name and p.ndim == 2:  # moderate modulation
                p.copy_(0.3 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif p.ndim == 2 and "emb" not in name and name not in ("fake_latent",):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        return self

    def cond(self, labels):
        emb = self.class_emb(labels.clamp(min=0))
        return torch.where((labels < 0)[:, None], self.fake_latent.expand_as(emb), emb)

    def forward_encoder(self, x, mask, class_embedding):
        x = self.z_proj(x)
        b, _, d = x.shape
        x = torch.cat([torch.zeros(b, self.buffer, d), x], dim=1)
        mwb = torch.cat([torch.zeros(b, self.buffer), mask], dim=1)
        x[:, :self.buffer] = class_embedding.unsqueeze(1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        x = x[(1 - mwb).nonzero(as_tuple=True)].reshape(b, -1, d)  # drop masked tokens
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x, mask):
        x = self.decoder_embed(x)
        b, _, d = x.shape
        mwb = torch.cat([torch.zeros(b, self.buffer), mask], dim=1)
        tok = self.mask_token.reshape(1, 1, d)
        full = tok.repeat(b, mwb.shape[1], 1).clone()
        full[(1 - mwb).nonzero(as_tuple=True)] = x.reshape(-1, d)
        x = full + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, self.buffer:]
        return x + self.diffusion_pos_embed_learned

    @torch.no_grad()
    def transformer(self, tokens, mask, labels):
        x = self.forward_encoder(tokens, mask.float(), self.cond(labels))
        return self.forward_decoder(x, mask.float())

    @torch.no_grad()
    def head(self, x, t, z):
        return self.diffloss.net(x, t, z)


def numpy_state_dict(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def official_args(**kw):
    a = dict(model="emigm_xsmall", img_size=256, vae_embed_dim=16, vae_stride=16, patch_size=1,
             diffloss_d=3, diffloss_w=1024, use_unsup_cfg=True, use_mae=True, buffer_size=64,
             class_num=1000, attn_dropout=0.1, proj_dropout=0.1, label_drop_prob=0.1,
             mask_strategy="exp", clamp_t_min=0.2, use_weighted_loss=False,
             diffusion_batch_mul=4, cfg=2.9, cfg_schedule="linear", temperature=0.95,
             num_iter=64, output_dir="/tmp/out", lr=4e-4, ema_rate=0.9999)
    a.update(kw)
    return argparse.Namespace(**a)


def official_training_checkpoint(model, ema_noise=0.01, seed=0, args=None):
    """A checkpoint built the way the reference's util/misc.py save_model builds it."""
    g = torch.Generator().manual_seed(seed)
    ema_params = [p.detach() + ema_noise * torch.randn(p.shape, generator=g)
                  for _, p in model.named_parameters()]
    ema_sd = copy.deepcopy(model.state_dict())
    for i, (name, _) in enumerate(model.named_parameters()):
        ema_sd[name] = ema_params[i]
    return {"model": model.state_dict(), "model_ema": ema_sd,
            "optimizer": {"state": {}, "param_groups": [{"betas": (0.9, 0.95), "params": [0]}]},
            "epoch": 799, "scaler": {"scale": 65536.0}, "args": args}


def reference_eval_state(config, ckpt, shared=True):
    """What main_emigm.py --resume --evaluate loads, replayed with real torch semantics."""
    m = TorchEMIGM(config, shared=shared)
    m.load_state_dict(ckpt["model"])
    ema_params = [ckpt["model_ema"][name] for name, _ in m.named_parameters()]
    sd = copy.deepcopy(m.state_dict())
    for i, (name, _) in enumerate(m.named_parameters()):
        sd[name] = ema_params[i]
    m.load_state_dict(sd)
    return m


def assert_trees_equal(a, b):
    fa, fb = conv.flatten(a), conv.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def xs_torch():
    torch.manual_seed(0)
    return TorchEMIGM(emigm_xs_256.get_config(), shared=True).randomize_(1)


@pytest.fixture(scope="module")
def xs_pth(xs_torch, tmp_path_factory):
    path = tmp_path_factory.mktemp("xs") / "eMIGM_xsmall_256_checkpoint.pth"
    torch.save(official_training_checkpoint(xs_torch, args=official_args()), path)
    return str(path)


# ------------------------------------------------------------------ layout and coverage
def test_xs_official_layout_and_full_coverage(xs_torch):
    sd = xs_torch.state_dict()
    assert len(sd) == 292
    assert sum(v.numel() for v in sd.values()) == 69_019_296
    assert sum(p.numel() for p in xs_torch.parameters()) == 69_018_848  # shared vector once
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["class_emb.weight"] == (1000, 448)
    assert shapes["fake_latent"] == shapes["mask_token"] == (1, 448)
    assert shapes["encoder_blocks.0.attn.qkv.weight"] == (1344, 448)
    assert shapes["diffloss.net.res_blocks.0.adaLN_modulation.1.weight"] == (3072, 1024)
    assert shapes["diffloss.net.final_layer.linear.weight"] == (32, 1024)
    config = emigm_xs_256.get_config()
    assert config.model.scan_layers  # the shipped layout: one stacked `block` per stack
    params = conv.convert_weights(numpy_state_dict(xs_torch), config)
    assert conv.parameter_count(params) == param_count(config) == 69_018_848
    flat = conv.flatten(params)
    qkv = sd["encoder_blocks.3.attn.qkv.weight"].numpy().T
    np.testing.assert_array_equal(
        flat[("backbone", "encoder_blocks", "block", "attn", "qkv", "kernel")][3], qkv)
    config.model.scan_layers = False
    flat = conv.flatten(conv.convert_weights(numpy_state_dict(xs_torch), config))
    np.testing.assert_array_equal(
        flat[("backbone", "encoder_blocks", "block_3", "attn", "qkv", "kernel")], qkv)
    np.testing.assert_array_equal(flat[("diffloss", "net", "res_blocks_2", "in_ln", "scale")],
                                  sd["diffloss.net.res_blocks.2.in_ln.weight"].numpy())
    np.testing.assert_array_equal(flat[("mask_token",)], sd["mask_token"].numpy())


@pytest.mark.parametrize("shared", [True, False])
def test_tiny_coverage_and_missing_or_extra_tensors(shared):
    config = tiny_config()
    config.model.cfg_mode = "mask_token" if shared else "fake_class"
    sd = numpy_state_dict(TorchEMIGM(config, shared=shared).randomize_(0))
    params = conv.convert_weights(sd, config)
    assert conv.parameter_count(params) == param_count(config)
    missing = dict(sd)
    del missing["decoder_blocks.0.mlp.fc2.bias"]
    with pytest.raises(conv.ConversionError, match="decoder_blocks/block_0/mlp/fc2/bias"):
        conv.convert_weights(missing, config)
    extra = dict(sd, **{"decoder_blocks.0.ls1.gamma": np.ones(32, np.float32)})
    with pytest.raises(conv.CheckpointMismatchError, match="ls1.gamma"):
        conv.convert_weights(extra, config)


# ------------------------------------------------------------------ forward parity
def _parity(config, torch_model, batch, num_masked, seed=0):
    rng = np.random.default_rng(seed)
    n, c = seq_len(config), token_dim(config)
    tokens = rng.standard_normal((batch, n, c)).astype(np.float32)
    mask = np.zeros((batch, n), bool)
    for i in range(batch):  # same count per row (the reference's dropping needs it)
        mask[i, rng.permutation(n)[:num_masked]] = True
    labels = np.array([3, -1, 7, -1][:batch], np.int32)
    params = conv.convert_weights(numpy_state_dict(torch_model), config)
    model = build_model(config)
    z = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                    jnp.asarray(labels), method="transformer")
    z_ref = torch_model.transformer(torch.from_numpy(tokens), torch.from_numpy(mask),
                                    torch.from_numpy(labels).long())
    np.testing.assert_allclose(np.asarray(z), z_ref.numpy(), atol=1e-4, rtol=1e-4)
    m = min(2 * n, batch * n)
    x_t = rng.standard_normal((m, c)).astype(np.float32)
    t = rng.uniform(0, 999, m).astype(np.float32)
    zz = np.array(z).reshape(-1, z.shape[-1])[:m]
    out = model.apply({"params": params}, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(zz),
                      method="head")
    out_ref = torch_model.head(torch.from_numpy(x_t), torch.from_numpy(t), torch.from_numpy(zz))
    assert out.shape == (m, 2 * c)
    out, out_ref = np.asarray(out), out_ref.numpy()
    np.testing.assert_allclose(out[:, :c], out_ref[:, :c], atol=1e-4, rtol=1e-4)  # eps half
    np.testing.assert_allclose(out[:, c:], out_ref[:, c:], atol=1e-4, rtol=1e-4)  # variance half


@pytest.mark.parametrize("shared,scan", [(True, False), (False, False), (True, True)])
def test_tiny_forward_parity(shared, scan):
    config = tiny_config()
    config.model.cfg_mode = "mask_token" if shared else "fake_class"
    config.model.enc_depth = config.model.dec_depth = 2
    config.model.scan_layers = scan  # scanned layout: stacked [depth, ...] block parameters
    torch_model = TorchEMIGM(config, shared=shared).randomize_(3).eval()
    _parity(config, torch_model, batch=4, num_masked=6)


def test_xs_forward_parity_batch1(xs_torch):
    _parity(emigm_xs_256.get_config(), xs_torch, batch=1, num_masked=100, seed=1)


# ------------------------------------------------------------------ EMA semantics
def test_weights_selection_matches_reference_evaluation(tmp_path):
    config = tiny_config()
    model = TorchEMIGM(config, shared=True).randomize_(5)
    ckpt = official_training_checkpoint(model, args=None)
    # The reference checkpoints' quirk: model_ema keeps the online value under 'mask_token'.
    assert torch.equal(ckpt["model_ema"]["mask_token"], ckpt["model"]["mask_token"])
    assert not torch.equal(ckpt["model_ema"]["fake_latent"], ckpt["model"]["fake_latent"])
    evaluated = reference_eval_state(config, ckpt)
    # Real torch semantics: the evaluation runs the online shared vector, EMA elsewhere.
    assert torch.equal(evaluated.mask_token, ckpt["model"]["mask_token"])
    assert torch.equal(evaluated.z_proj.weight, ckpt["model_ema"]["z_proj.weight"])

    path = tmp_path / "tiny.pth"
    torch.save(ckpt, path)
    parsed = conv.read_checkpoint(path)
    assert conv.is_shared(parsed)
    ema = conv.convert_weights(conv.select_weights(parsed, "ema"), config)
    assert_trees_equal(ema, conv.convert_weights(numpy_state_dict(evaluated), config))
    raw = conv.convert_weights(conv.select_weights(parsed, "raw"), config)
    assert_trees_equal(raw, conv.convert_weights(numpy_state_dict(model), config))
    ema_all = conv.convert_weights(conv.select_weights(parsed, "ema_all"), config)
    np.testing.assert_array_equal(ema_all["mask_token"], ckpt["model_ema"]["fake_latent"].numpy())
    np.testing.assert_array_equal(ema_all["class_emb"]["embedding"], ema["class_emb"]["embedding"])
    # A fake_class config gets the shared value in both vectors (same function).
    config.model.cfg_mode = "fake_class"
    fc = conv.convert_weights(conv.select_weights(parsed, "ema"), config)
    np.testing.assert_array_equal(fc["fake_latent"], ema["mask_token"])
    np.testing.assert_array_equal(fc["mask_token"], ema["mask_token"])


def test_separate_mask_token_mar_layout(tmp_path):
    config = tiny_config()
    model = TorchEMIGM(config, shared=False).randomize_(6)
    ckpt = official_training_checkpoint(model, args=argparse.Namespace(model="mar_base"))
    evaluated = reference_eval_state(config, ckpt, shared=False)
    path = tmp_path / "mar.pth"
    torch.save(ckpt, path)
    parsed = conv.read_checkpoint(path)
    assert not conv.is_shared(parsed)
    sd = conv.select_weights(parsed, "ema")
    with pytest.raises(conv.CheckpointMismatchError,
                       match=r"'mask_token' has shape \(1, 1, 32\).*cfg_mode=fake_class"):
        conv.convert_weights(sd, config)  # tiny config is cfg_mode=mask_token
    config.model.cfg_mode = "fake_class"
    assert_trees_equal(conv.convert_weights(sd, config),
                       conv.convert_weights(numpy_state_dict(evaluated), config))


def test_args_pick_config_and_overrides():
    config, name, overrides = conv.config_from_args(vars(official_args()))
    assert name == "emigm_xs_256" and overrides == []
    assert config.model.cfg_mode == "mask_token" and config.mask.t_min == 0.2
    config, name, overrides = conv.config_from_args(
        vars(official_args(model="emigm_base", diffloss_d=3, use_unsup_cfg=False)))
    assert name == "emigm_b_256"
    assert overrides == ["model.head_depth=3", "model.cfg_mode=fake_class"]
    config, name, overrides = conv.config_from_args({"model": "mar_large", "img_size": 256,
                                                     "diffloss_d": 8, "diffloss_w": 1280})
    assert name == "mar" and config.name == "mar_large_256"
    assert config.model.cfg_mode == "fake_class" and config.mask.distribution == "uniform_count"
    assert overrides == ["model.width=1024", "model.enc_depth=16", "model.dec_depth=16",
                         "model.num_heads=16", "model.head_depth=8", "model.head_width=1280"]
    assert conv.config_signature(config) == conv.config_signature(  # same tensor shapes
        conv.load_config("emigm_l_256"))
    config, name, overrides = conv.config_from_args({"model": "mar_base", "img_size": 256,
                                                     "diffloss_d": 6, "diffloss_w": 1024})
    assert name == "mar" and overrides == []
    with pytest.raises(ValueError, match="args.model='vit_tiny'"):
        conv.config_from_args({"model": "vit_tiny"})
    with pytest.raises(conv.CheckpointMismatchError, match="num_heads=8"):
        c = emigm_xs_256.get_config()
        c.model.num_heads = 4
        conv.check_args_against_config(vars(official_args()), c)
    with pytest.raises(conv.CheckpointMismatchError, match="model.arch"):
        conv.check_args_against_config(vars(official_args(use_mae=False)),
                                       emigm_xs_256.get_config())


def layout_only(config, shared):
    """The official state dict's shapes as zero-stride numpy arrays (no memory)."""
    with torch.device("meta"):
        m = TorchEMIGM(config, shared=shared)
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in m.state_dict().items()}


def test_mar_b_layout_suggests_fake_class_override():
    from configs import emigm_b_256
    sd = layout_only(emigm_b_256.get_config(), shared=False)
    assert tuple(sd["mask_token"].shape) == (1, 1, 768)
    with pytest.raises(conv.CheckpointMismatchError) as e:
        conv.convert_weights(sd, emigm_b_256.get_config())
    msg = str(e.value)
    assert "'mask_token' has shape (1, 1, 768)" in msg and "cfg_mode=fake_class" in msg
    assert "emigm_b_256 with --config.model.cfg_mode=fake_class" in msg
    assert ", mar" in msg  # configs/mar.py: MAR-B with a separate fake class


def test_flat_state_dict_without_args(tmp_path):
    config = tiny_config()
    model = TorchEMIGM(config, shared=True).randomize_(4)
    path = tmp_path / "ema_only.pth"
    torch.save(model.state_dict(), path)  # a bare state dict: no args, no model_ema key
    with pytest.raises(ValueError, match="has no training 'args' to pick a config from"):
        conv.convert_checkpoint(path)
    params, cfg = conv.load_official_checkpoint(path, config)
    assert cfg is config
    assert_trees_equal(params, conv.convert_weights(numpy_state_dict(model), config))
    with pytest.raises(ValueError, match="weights='raw' needs"):
        conv.convert_checkpoint(path, config, weights="raw")


def test_missing_torch_message(monkeypatch, tmp_path):
    from emigm_jax.convert import torch_io
    path = tmp_path / "x.pth"
    path.write_bytes(b"0")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[interop\]'"):
        torch_io.load_pth(path)


def test_untrusted_pickle_is_refused(tmp_path):
    from emigm_jax.convert import torch_io
    path = tmp_path / "obj.pth"
    torch.save({"model": {}, "args": np.random.default_rng(0)}, path)  # arbitrary object
    with pytest.raises(ValueError, match="--trusted_pickle"):
        torch_io.load_pth(path)
    assert "args" in torch_io.load_pth(path, trusted_pickle=True)


# ------------------------------------------------------------------ mismatch and CLI
def test_xs_checkpoint_with_s_config_names_tensor_and_suggests_xs(xs_torch):
    sd = numpy_state_dict(xs_torch)
    with pytest.raises(conv.CheckpointMismatchError) as e:
        conv.convert_weights(sd, emigm_s_256.get_config())
    msg = str(e.value)
    assert "'encoder_pos_embed_learned' has shape (1, 320, 448)" in msg
    assert "expects (1, 320, 512)" in msg and "emigm_s_256" in msg
    assert "configs whose shapes match this checkpoint: emigm_xs_256" in msg


def test_cli_end_to_end_xs_convert_restore_sample(xs_pth, xs_torch, tmp_path):
    workdir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "emigm_jax.convert", f"--src={xs_pth}", f"--workdir={workdir}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config emigm_xs_256" in r.stdout and "69,018,848 parameters" in r.stdout
    assert "--mode=sample --config=configs/emigm_xs_256.py" in r.stdout
    info = json.load(open(os.path.join(workdir, "convert_info.json")))
    assert info["weights"] == "ema" and info["config"] == "emigm_xs_256"

    # Restore exactly as `python -m emigm_jax.main --mode=sample` does.
    from emigm_jax import main as main_lib
    from emigm_jax import sampling
    from emigm_jax import sharding as shd
    config = emigm_xs_256.get_config()
    config.mesh.data = 1
    mesh = shd.make_mesh(config.mesh)
    step, params = main_lib.restore_ema_params(config, workdir, mesh)
    assert step == 0
    ckpt = torch.load(xs_pth, weights_only=False, mmap=True)
    np.testing.assert_array_equal(np.asarray(params["mask_token"]),
                                  ckpt["model"]["mask_token"].numpy())  # online shared vector
    np.testing.assert_array_equal(np.asarray(params["class_emb"]["embedding"]),
                                  ckpt["model_ema"]["class_emb.weight"].numpy())

    config.sample.num_iter, config.sample.solver_steps = 2, 1
    config.sample.solver_order = 1  # one first-order head step: the cheapest to compile
    config.sample.cfg_scale = 1.0  # the unconditional path is covered by the parity tests
    with config.unlocked():
        config.sample.head_capacity = "full"  # one head shape: compiles once
    tokens, out = sampling.sample(params, jnp.array([1, 2, 3, 4]), jax.random.key(0), config)
    tokens = np.asarray(tokens)
    assert tokens.shape == (4, 256, 16) and np.isfinite(tokens).all()
    assert int(out["nfe"]) == 2 and int(out["masked_left"]) == 0


def test_cli_errors(tmp_path):
    """A mismatching --config names the tensor, both shapes and that no config fits; no output."""
    config = tiny_config()
    model = TorchEMIGM(config, shared=True).randomize_(2)
    with_args = tmp_path / "tiny.pth"
    torch.save(official_training_checkpoint(model, args=official_args()), with_args)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "emigm_jax.convert", f"--src={with_args}",
                        f"--workdir={tmp_path / 'a'}", "--config=configs/emigm_xs_256.py"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 1
    assert "error: checkpoint tensor 'encoder_pos_embed_learned' has shape (1, 20, 32), but " \
           "config 'emigm_xs_256' expects (1, 320, 448)" in r.stderr
    assert "no config under configs/ matches; the checkpoint has {'width': 32" in r.stderr
    assert not os.path.exists(tmp_path / "a" / "checkpoints")
