"""FID Inception-v3: resize conventions, converter coverage, parity with pytorch-fid, sharding."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax.convert import inception as conv
from emigm_jax.convert.common import ConversionError, write_variables
from emigm_jax.evaluation.inception import (FIDInceptionV3, make_feature_fn, preprocess_images,
                                            resize_matrix, variable_shapes)

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_inception")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torch_or_skip():
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        import pytorch_fid.inception as pfi
    except ImportError as e:  # pragma: no cover - environment dependent
        pytest.skip(f"torch / torchvision / pytorch_fid not importable ({e}); parity with "
                    "pytorch-fid cannot be checked")
    return torch, pfi


# ----------------------------------------------------------------------------- resize
def test_adm_resize_is_tf1_legacy_bilinear():
    # TF1 ResizeBilinear (align_corners=False, no half-pixel): src = dst * in / out. A linear
    # ramp f(i) = i is reproduced exactly at src, clamped at the last pixel.
    for n_in, n_out in [(5, 7), (256, 299), (512, 299), (299, 299)]:
        m = resize_matrix(n_in, n_out, "adm")
        src = np.arange(n_out) * n_in / n_out
        np.testing.assert_allclose(m @ np.arange(n_in), np.minimum(src, n_in - 1), atol=1e-9)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(resize_matrix(299, 299, "adm"), np.eye(299))


def test_pytorch_resize_is_half_pixel_bilinear():
    for n_in, n_out in [(5, 7), (256, 299), (512, 299)]:
        m = resize_matrix(n_in, n_out, "pytorch_fid")
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        # Source coordinates carry PyTorch's float32 rounding (|err| <= ulp(512) ~ 6e-5).
        np.testing.assert_allclose(m @ np.arange(n_in), src, atol=1e-4)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="'adm' or 'pytorch_fid', got 'area'"):
        resize_matrix(4, 5, "area")


def test_preprocess_matches_torch_interpolate():
    torch, _ = _torch_or_skip()
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    for h, w in [(37, 53), (256, 256), (400, 320)]:
        img = rng.integers(0, 256, size=(2, h, w, 3)).astype(np.float32)
        got = np.asarray(preprocess_images(jnp.asarray(img), "pytorch_fid"))
        for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-4)):
            # float32 is what pytorch-fid runs; float64 torch has exact coordinates.
            x = torch.from_numpy(img / 255.0).to(dtype).permute(0, 3, 1, 2)
            ref = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
            np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=tol)
    adm = preprocess_images(jnp.full((1, 8, 8, 3), 128.0), "adm")
    np.testing.assert_allclose(np.asarray(adm), 0.0, atol=1e-7)   # (x - 128) / 128
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        preprocess_images(jnp.zeros((2, 8, 8)), "adm")


# ----------------------------------------------------------------------------- torch reference
def _torch_fid_inception(seed=0):
    """pytorch-fid's FID Inception with random weights and calibrated BN statistics.

    Built exactly like pytorch_fid.inception.fid_inception_v3 (torchvision Inception3 with the
    FIDInception* blocks), then: random BN affine parameters, and running statistics taken
    from one train-mode pass so activations keep unit scale through 94 layers (random BN
    stats let them grow to O(100) and make an absolute 1e-4 tolerance meaningless).
    """
    torch, pfi = _torch_or_skip()
    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(1.0, 2.0)
                m.momentum = None  # cumulative average: one batch -> its statistics
        net.train()
        # Calibrate on what the parity test feeds: 256px noise bilinearly upsampled to 299
        # (smoother than 299px noise; BN stats from white noise would not normalise it).
        x = torch.nn.functional.interpolate(torch.rand(4, 3, 256, 256), size=(299, 299),
                                            mode="bilinear", align_corners=False)
        net(x * 2 - 1)
    net.eval()
    return net


@pytest.fixture(scope="module")
def torch_state_dict():
    net = _torch_fid_inception()
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_converter_covers_every_key_of_the_public_layout(torch_state_dict):
    sd = torch_state_dict
    assert len(sd) == 566  # 94 BasicConv2d x (conv + 4 BN tensors + num_batches_tracked) + fc
    layout = conv.expected_torch_layout()
    assert layout == {k: tuple(v.shape) for k, v in sd.items()
                      if not k.endswith("num_batches_tracked")}
    variables = conv.torch_to_flax(sd)
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    assert len(leaves) == 472
    v = variables
    np.testing.assert_array_equal(v["params"]["fc_kernel"], sd["fc.weight"].numpy().T)
    np.testing.assert_array_equal(v["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"],
                                  sd["Mixed_6d.branch1x1.conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                                  sd["Mixed_7c.branch_pool.bn.running_var"].numpy())


def test_converter_by_key_list_without_torch_and_errors():
    rng = np.random.default_rng(0)
    sd = {k: rng.normal(size=s).astype(np.float32) for k, s in conv.expected_torch_layout().items()}
    variables = conv.torch_to_flax(sd)
    shapes = jax.tree.map(lambda a: a.shape, variable_shapes())
    assert jax.tree.map(np.shape, variables) == shapes
    missing = dict(sd)
    del missing["Mixed_6d.branch1x1.bn.running_mean"]
    with pytest.raises(ConversionError, match="batch_stats/Mixed_6d/branch1x1/bn/mean"):
        conv.torch_to_flax(missing)
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ConversionError, match="AuxLogits.fc.weight"):
        conv.torch_to_flax(extra)


def test_msgpack_roundtrip_and_pth_loading(tmp_path, torch_state_dict):
    torch, _ = _torch_or_skip()
    pth = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(torch_state_dict, pth)
    v = conv.load_inception_variables(str(pth))
    out = tmp_path / "inception.msgpack"
    write_variables(v, str(out))
    back = conv.load_inception_variables(str(out))
    jax.tree.map(np.testing.assert_array_equal, v, back)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        conv.load_inception_variables(str(tmp_path / "missing.pth"))


def test_parity_with_pytorch_fid(torch_state_dict, monkeypatch):
    torch, pfi = _torch_or_skip()
    sd = torch_state_dict
    # pytorch-fid's own wrapper (resize + 2x-1 + blocks), fed our random weights instead of the
    # downloaded file.
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
    wrapper = pfi.InceptionV3([3]).eval()
    fc = torch.nn.Linear(2048, 1008)
    fc.load_state_dict({"weight": sd["fc.weight"], "bias": sd["fc.bias"]})
    captured = {}
    mixed_6d = wrapper.blocks[2][6]
    assert type(mixed_6d).__name__ == "FIDInceptionC" and mixed_6d.branch7x7_1.conv.out_channels == 160
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("s", o))

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 256, 256, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        pool = wrapper(x)[0][:, :, 0, 0]
        ref = {"pool": pool.numpy(), "logits": fc(pool).numpy(),
               "logits_unbiased": (pool @ sd["fc.weight"].T).numpy(),
               # ADM: mixed_6/conv[..., :7] flattened in NHWC order.
               "spatial": captured["s"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()}

    variables = conv.torch_to_flax(sd)
    out = FIDInceptionV3(preprocess="pytorch_fid").apply(variables, jnp.asarray(images))
    for k in ("pool", "logits", "logits_unbiased", "spatial"):
        got = np.asarray(out[k])
        assert got.shape == ref[k].shape, k
        err = np.max(np.abs(got - ref[k]))
        assert err <= 1e-4, f"{k}: max abs error {err:.2e} (scale {np.abs(ref[k]).max():.2f})"
    assert ref["spatial"].shape == (2, 17 * 17 * 7)
    assert np.abs(ref["pool"]).max() > 0.1  # the comparison is not between two zero vectors


# ----------------------------------------------------------------------------- sharding
_SHARDED_SCRIPT = textwrap.dedent("""
    import json, types
    import jax, numpy as np
    from emigm_jax import sharding
    from emigm_jax.evaluation.inception import FIDInceptionV3, make_feature_fn, random_variables
    from emigm_jax.evaluation.reference import summarize_features
    assert jax.device_count() == 4, jax.devices()
    v = random_variables(0, FIDInceptionV3(image_size=75))
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(11, 48, 48, 3), dtype=np.uint8)
    batches = [imgs[:4], imgs[4:8], imgs[8:]]          # the last one (3) gets padded to 4
    single = make_feature_fn(v, image_size=75)
    mesh = sharding.make_mesh(types.SimpleNamespace(data=2, fsdp=2))
    multi = make_feature_fn(v, image_size=75, mesh=mesh)
    s1 = summarize_features(single, batches)
    s4 = summarize_features(multi, batches)
    res = {"shards": multi.num_shards, "n": [s1.count, s4.count]}
    # A device array laid out differently (here replicated, as a decoder might leave it) is
    # resharded to the batch layout rather than rejected.
    from jax.sharding import NamedSharding, PartitionSpec
    rep = multi(jax.device_put(imgs[:4], NamedSharding(mesh, PartitionSpec())))["pool"]
    res["replicated_input"] = float(np.max(np.abs(rep - s4.pool_features[:4])))
    for name, a, b in [("pool_features", s1.pool_features, s4.pool_features),
                       ("logits", s1.logits, s4.logits),
                       ("mu", s1.pool.finalize()[0], s4.pool.finalize()[0]),
                       ("sigma", s1.pool.finalize()[1], s4.pool.finalize()[1]),
                       ("mu_s", s1.spatial.finalize()[0], s4.spatial.finalize()[0]),
                       ("sigma_s", s1.spatial.finalize()[1], s4.spatial.finalize()[1])]:
        res[name] = [float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))]
    print("RESULT" + json.dumps(res))
""")


def test_sharded_feature_extraction_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    assert res["shards"] == 4 and res["n"] == [11, 11]
    assert res["replicated_input"] <= 1e-6
    for name in ("pool_features", "logits", "mu", "sigma", "mu_s", "sigma_s"):
        err, scale = res[name]
        assert scale > 0 and err <= 1e-5 * max(1.0, scale), (name, err, scale)


def test_feature_fn_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown Inception outputs"):
        make_feature_fn({}, outputs=("pool", "mixed_6"))
    with pytest.raises(ValueError, match="image_size must be >= 75"):
        jax.eval_shape(FIDInceptionV3(image_size=64).init, jax.random.key(0),
                       jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
