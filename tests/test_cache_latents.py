"""Latent caching end to end on a generated image folder, and reading the cache for training.

Tiny random-weight tokenizers with the production architecture code (fewer channels, 32px).
The CLI runs in subprocesses with 1 and 4 fake CPU devices; outputs must agree.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from emigm_jax.data import cache_latents as cl
from emigm_jax.data import latent_dataset as ld

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_cache_latents")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["n02", "n01", "n04", "n03"]  # unsorted on purpose: labels follow sorted names
PER_CLASS = 16
KL_ARCH = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
               resolution=32, embed_dim=4)
DC_ARCH = dict(latent_channels=8,
               encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
               decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
               encoder_block_out_channels=(16, 32, 32, 64), decoder_block_out_channels=(16, 32, 32, 64),
               encoder_layers_per_block=(0, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1),
               encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
               decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
               decoder_act_fns=("relu", "relu", "silu", "silu"))

CONFIG_FILE = f'''
import ml_collections

def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(source="folder", path="", image_size=32, num_workers=0))
    c.tokenizer = ml_collections.ConfigDict(dict(name="kl16", path="", scale=0.5, random_init=True,
                                                 seed=0, arch={KL_ARCH!r}))
    c.train = ml_collections.ConfigDict(dict(batch_size=16))
    return c
'''


def make_folder(root) -> None:
    rng = np.random.default_rng(0)
    for ci, c in enumerate(CLASSES):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            w, h = (int(v) for v in rng.integers(24, 90, size=2))
            # per-class mean colour so labels and latents are related
            base = np.full((h, w, 3), 40 + 50 * ci, np.int16)
            img = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{c}_{i:03d}.JPEG", quality=90)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, format="JPEG")
    (root / "train" / "n03" / "n03_corrupt.JPEG").write_bytes(buf.getvalue()[:300])
    (root / "train" / "n01" / "README.txt").write_text("not an image\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_folder(root)
    return root


def _run_cli(cfg_file, data_path, cache_dir, devices: int, extra=()):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "emigm_jax.data.cache_latents", f"--config={cfg_file}",
           f"--config.data.path={data_path}", f"--cache_dir={cache_dir}", "--batch_size=4",
           "--shard_size=24", "--num_threads=4", *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, f"cache CLI failed:\n{p.stdout}\n{p.stderr[-5000:]}"
    return p.stdout


def _all_records(cache_dir):
    src = ld.CachedLatentSource(str(cache_dir))
    return np.stack([src.moments(i) for i in range(len(src))]), src.labels.copy(), src.manifest


@pytest.fixture(scope="module")
def cached(folder, tmp_path_factory):
    """One CLI run on 1 device; returns (cfg file, cache dir, stdout)."""
    tmp = tmp_path_factory.mktemp("cache")
    cfg_file = tmp / "tiny_cfg.py"
    cfg_file.write_text(CONFIG_FILE)
    out = _run_cli(cfg_file, folder, tmp / "c1", devices=1)
    return cfg_file, tmp / "c1", out


def test_counts_labels_and_skips(cached):
    _, cache_dir, out = cached
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["count"] == 4 * PER_CLASS and m["num_skipped"] == 2
    assert sorted(x["name"] for x in m["skipped_files"]) == [
        os.path.join("n01", "README.txt"), os.path.join("n03", "n03_corrupt.JPEG")]
    assert "skipped 2 unreadable files" in out
    assert "n03_corrupt.JPEG" in out and "README.txt" in out
    assert m["tokenizer"] == "kl16" and m["image_size"] == 32 and m["dtype"] == "float32"
    assert m["record_shape"] == [2, 2, 8, 8, 4] and m["num_classes"] == 4
    assert m["class_to_label"] == {"n01": 0, "n02": 1, "n03": 2, "n04": 3}
    assert len(m["shards"]) == 3  # 66 files / 24 per shard
    moments, labels, _ = _all_records(cache_dir)
    names = [n for s in range(3) for n in json.loads(
        (cache_dir / cl.shard_names(s, 3)[1]).read_text())["names"]]
    assert labels.tolist() == [m["class_to_label"][n.split(os.sep)[0]] for n in names]
    assert np.bincount(labels).tolist() == [PER_CLASS] * 4
    assert moments.shape == (64, 2, 2, 8, 8, 4) and np.isfinite(moments).all()
    # flip entry differs from the image entry, logvar is clamped
    assert np.abs(moments[:, 0] - moments[:, 1]).max() > 1e-3
    assert moments[:, :, 1].min() >= -30 and moments[:, :, 1].max() <= 20


def test_cached_moments_equal_direct_encoding(cached, folder):
    """Record i is the tokenizer's moments of ADM-cropped image i and of its mirror image."""
    import jax
    from emigm_jax.data.preprocess import preprocess_image, to_model_range
    from emigm_jax.convert.tokenizers import tokenizer_from_config
    cfg_file, cache_dir, _ = cached
    moments, _, m = _all_records(cache_dir)
    names = json.loads((cache_dir / cl.shard_names(1, 3)[1]).read_text())["names"][:3]
    first = sum(s["count"] for s in m["shards"][:1])
    cfg = _load_cfg(cfg_file)
    tok, variables = tokenizer_from_config(cfg)
    imgs = np.stack([preprocess_image(str(folder / "train" / n), 32) for n in names])
    x = to_model_range(imgs)
    direct = np.asarray(jax.jit(tok.encode_moments)(variables, x))
    direct_flip = np.asarray(jax.jit(tok.encode_moments)(variables, x[:, :, ::-1]))
    np.testing.assert_allclose(moments[first:first + 3, 0], direct, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(moments[first:first + 3, 1], direct_flip, atol=1e-5, rtol=1e-5)


def _load_cfg(cfg_file, **data):
    ns: dict = {}
    exec(compile(open(cfg_file).read(), str(cfg_file), "exec"), ns)  # the test's own file
    c = ns["get_config"]()
    for k, v in data.items():
        c.data[k] = v
    return c


def test_rerun_skips_finished_shards_and_redoes_missing(cached, folder, tmp_path):
    cfg_file, cache_dir, _ = cached
    import shutil
    work = tmp_path / "c"
    shutil.copytree(cache_dir, work)
    before, labels_before, _ = _all_records(work)
    mtimes = {f: os.path.getmtime(work / f) for f in os.listdir(work) if f.endswith(".array_record")}
    os.remove(work / cl.shard_names(1, 3)[1])       # shard 1 "interrupted" before its marker
    os.remove(work / "manifest.json")
    cfg = _load_cfg(cfg_file, path=str(folder))
    m = cl.cache_latents(cfg, str(work), per_device_batch=4, shard_size=24, num_threads=2)
    assert m["count"] == 64 and m["num_skipped"] == 2
    after = {f: os.path.getmtime(work / f) for f in mtimes}
    redone = sorted(f for f in mtimes if after[f] != mtimes[f])
    assert redone == [cl.shard_names(1, 3)[0]]
    moments, labels, _ = _all_records(work)
    np.testing.assert_allclose(moments, before, atol=1e-6)
    np.testing.assert_array_equal(labels, labels_before)
    # Full rerun: nothing to do.
    mt2 = {f: os.path.getmtime(work / f) for f in mtimes}
    cl.cache_latents(cfg, str(work), per_device_batch=4, shard_size=24, num_threads=2)
    assert {f: os.path.getmtime(work / f) for f in mtimes} == mt2
    # Different settings into the same directory are refused.
    with pytest.raises(ValueError, match="different settings"):
        cl.cache_latents(cfg, str(work), per_device_batch=4, shard_size=10, num_threads=2)


def test_second_cli_run_skips_and_four_devices_match(cached, folder, tmp_path):
    cfg_file, cache_dir, _ = cached
    out = _run_cli(cfg_file, folder, cache_dir, devices=1)
    assert "3 of this process's 3 shards already done" in out
    out4 = _run_cli(cfg_file, folder, tmp_path / "c4", devices=4)
    assert "0 of this process's 3 shards already done" in out4
    assert "encoding on 4 local devices (cpu), 16 images" in out4
    m1, l1, man1 = _all_records(cache_dir)
    m4, l4, man4 = _all_records(tmp_path / "c4")
    np.testing.assert_array_equal(l1, l4)
    np.testing.assert_allclose(m4, m1, atol=1e-5, rtol=1e-5)
    assert {k: v for k, v in man1.items()} == {k: v for k, v in man4.items()}


def test_training_pipeline_statistics_match_cache(cached):
    from emigm_jax.data import pipeline
    cfg_file, cache_dir, _ = cached
    cfg = _load_cfg(cfg_file, source="cached", path=str(cache_dir))
    src = ld.make_source(cfg)
    ds = pipeline.build_dataset(src, global_batch=16, seed=3,
                                random_transform=ld.random_transform(cfg))
    batches = [ds[i] for i in range(48)]  # 12 epochs of 64
    b0 = batches[0]
    assert b0["tokens"].shape == (16, 64, 4) and b0["tokens"].dtype == np.float32
    assert b0["label"].shape == (16,) and b0["label"].dtype == np.int32
    tokens = np.concatenate([b["tokens"] for b in batches]).astype(np.float64)
    moments, _, _ = _all_records(cache_dir)
    mean, var = moments[:, :, 0].astype(np.float64), np.exp(moments[:, :, 1].astype(np.float64))
    scale = 0.5
    exp_mean = scale * mean.mean()
    exp_std = scale * np.sqrt((mean ** 2).mean() + var.mean() - mean.mean() ** 2)
    assert tokens.mean() == pytest.approx(exp_mean, abs=0.03 * exp_std)
    assert tokens.std() == pytest.approx(exp_std, rel=0.03)
    # Per-position: E[token] follows the cache's (image+flip)/2 mean, labels match examples.
    labels = np.concatenate([b["label"] for b in batches])
    assert np.bincount(labels, minlength=4).tolist() == [12 * PER_CLASS] * 4


def test_sample_tokens_formula():
    rng = np.random.default_rng(0)
    mom = rng.standard_normal((2, 2, 3, 3, 5)).astype(np.float32)
    ex = {"moments": mom, "label": np.int32(7)}
    r1, r2 = np.random.default_rng(42), np.random.default_rng(42)
    out = ld.sample_tokens(ex, r1, 0.2325)
    flip = int(r2.integers(2))
    noise = r2.standard_normal((3, 3, 5), dtype=np.float32)
    want = 0.2325 * (mom[flip, 0].astype(np.float64) + np.exp(0.5 * mom[flip, 1].astype(np.float64)) * noise)
    np.testing.assert_allclose(out["tokens"], want.reshape(9, 5), rtol=1e-6, atol=1e-6)
    assert out["label"] == 7
    det = {"moments": mom[:, :1], "label": np.int32(1)}
    r3 = np.random.default_rng(5)
    f = int(np.random.default_rng(5).integers(2))
    np.testing.assert_allclose(ld.sample_tokens(det, r3, 0.3189)["tokens"],
                               (0.3189 * mom[f, 0].astype(np.float64)).reshape(9, 5), rtol=1e-6)


def test_dcae_cache_is_deterministic_latent(folder, tmp_path):
    cfg = ml_collections.ConfigDict(dict(
        seed=0, data=dict(source="folder", path=str(folder), image_size=32),
        tokenizer=dict(name="dcae_f32c32", path="", scale=0.3189, random_init=True, seed=1,
                       arch=DC_ARCH)))
    m = cl.cache_latents(cfg, str(tmp_path / "dc"), per_device_batch=8, shard_size=40,
                         num_threads=2, max_images=30, dtype="bfloat16")
    # the first 30 files include n01/README.txt
    assert m["count"] == 29 and m["record_shape"] == [2, 1, 4, 4, 8] and m["dtype"] == "bfloat16"
    assert not m["stochastic"] and m["num_skipped"] == 1
    cfg.data.source, cfg.data.cache_dir = "cached", str(tmp_path / "dc")
    src = ld.make_source(cfg)
    ex = src[3]
    out = ld.random_transform(cfg)(ex, np.random.default_rng(0))
    f = int(np.random.default_rng(0).integers(2))
    np.testing.assert_allclose(out["tokens"], 0.3189 * ex["moments"][f, 0].reshape(16, 8), rtol=1e-6)
    cfg.tokenizer.name = "kl16"
    with pytest.raises(ValueError, match="was made with tokenizer 'dcae_f32c32'"):
        ld.make_source(cfg)


def test_missing_and_empty_inputs(tmp_path):
    from emigm_jax.data import sources
    cfg = ml_collections.ConfigDict(dict(data=dict(source="folder", path=str(tmp_path / "nope"),
                                                   image_size=32)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.make_records(cfg)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    cfg.data.path = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="no class directories"):
        sources.make_records(cfg)
    (tmp_path / "empty" / "train" / "cls").mkdir()
    with pytest.raises(ValueError, match="no files"):
        sources.make_records(cfg)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ld.CachedLatentSource(str(tmp_path))


def test_labels_file_and_train_source(folder, tmp_path):
    from emigm_jax.data import sources
    lf = tmp_path / "labels.txt"
    lf.write_text("n04 10\nn03 11\nn02 12\nn01 13\n")
    recs = sources.FolderRecords(str(folder / "train"), str(lf))
    assert recs.class_to_label == {"n01": 13, "n02": 12, "n03": 11, "n04": 10}
    lf.write_text("n04\nn03\n")
    with pytest.raises(ValueError, match="not in labels file"):
        sources.FolderRecords(str(folder / "train"), str(lf))
    lf.write_text("n01\nn02\nn03\nn04\n")
    recs = sources.FolderRecords(str(folder / "train"), str(lf))
    src = sources.TrainImageSource(recs, 32)
    bad = recs.paths.index(str(folder / "train" / "n01" / "README.txt"))
    ex = src[bad]  # replaced by the next readable file
    assert ex["image"].shape == (32, 32, 3) and src.num_skipped == 1
    import pickle  # grain worker processes receive sources and transforms pickled
    pickle.loads(pickle.dumps(src))
    flip = pickle.loads(pickle.dumps(sources.random_transform(None, "train")))
    outs = [flip(ex, np.random.default_rng(s))["image"] for s in range(8)]
    assert any((o == ex["image"][:, ::-1]).all() for o in outs)
    assert any((o == ex["image"]).all() for o in outs)


def test_tfds_records_with_injected_source():
    from emigm_jax.data import sources
    buf = io.BytesIO()
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(buf, format="JPEG")
    fake = [{"image": buf.getvalue(), "label": 5, "file_name": b"n0_1.JPEG"},
            {"image": b"garbage", "label": 2, "file_name": b"n0_2.JPEG"},
            {"image": np.full((40, 30, 3), 7, np.uint8), "label": 1}]  # already decoded
    recs = sources.TfdsRecords(data_source=fake)
    d = sources.decode_record(recs, 0, 32)
    assert d.image.shape == (32, 32, 3) and d.label == 5 and d.name == "n0_1.JPEG"
    d = sources.decode_record(recs, 1, 32)
    assert d.image is None and d.error and d.name == "n0_2.JPEG"
    d = sources.decode_record(recs, 2, 16)
    assert d.image.shape == (16, 16, 3) and (d.image == 7).all() and d.name == "imagenet2012/2"


def test_two_process_split_matches_single_process(cached, folder, tmp_path, monkeypatch):
    """Shards go round-robin to processes; process 0 writes the manifest after the barrier."""
    import jax
    from jax.experimental import multihost_utils
    cfg_file, cache_dir, _ = cached
    cfg = _load_cfg(cfg_file, path=str(folder))
    barriers = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    outs = {}
    for pid in (1, 0):  # process 1 finishes first; process 0 then assembles the manifest
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        outs[pid] = cl.cache_latents(cfg, str(tmp_path / "mp"), per_device_batch=4,
                                     shard_size=24, num_threads=2)
    assert outs[1] is None and outs[0]["count"] == 64 and len(barriers) == 2
    m1, l1, man1 = _all_records(cache_dir)
    m2, l2, man2 = _all_records(tmp_path / "mp")
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(m2, m1, atol=1e-5, rtol=1e-5)
    assert man1 == man2
