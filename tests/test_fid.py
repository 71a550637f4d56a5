"""Frechet distance, streaming Gaussian estimator, reference-statistics files, and the
sample-and-evaluate / sweep jobs end to end on a tiny model."""
import os

import numpy as np
import pytest
import scipy.linalg

from emigm_jax.evaluation import metrics
from emigm_jax.evaluation.metrics import RunningStats, frechet_distance, gaussian_stats
from emigm_jax.evaluation import reference as ref_lib


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2):
    """Symmetric form Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) via eigendecompositions only."""
    r1 = _psd_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1)))


# ----------------------------------------------------------------------------- Frechet distance
def test_fid_of_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 64)) * rng.uniform(0.1, 3.0, size=64) + rng.normal(size=64)
    mu, sigma = gaussian_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_self_singular_covariance_is_zero_relative_to_trace():
    # N < D: rank-deficient covariance, the usual near-singular case of small sample sets.
    rng = np.random.default_rng(1)
    mu, sigma = gaussian_stats(rng.normal(size=(100, 256)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.2, 2.0, 16), rng.uniform(0.2, 2.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((a - b) ** 2)
    got = frechet_distance(mu1, np.diag(a**2), mu2, np.diag(b**2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_full_covariance_matches_symmetric_closed_form():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _closed_form_fid(mu1, s1, mu2, s2), rel=1e-9)


def test_fid_of_gaussian_samples_matches_closed_form_within_sampling_error():
    rng = np.random.default_rng(4)
    d, n = 4, 200_000
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.5 * np.eye(d), b @ b.T + 0.5 * np.eye(d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    true = _closed_form_fid(mu1, s1, mu2, s2)
    est = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    # Seeds 4-8 give relative errors of 0.01-0.4% at n=200K (moments' error ~ 1/sqrt(n)).
    assert est == pytest.approx(true, rel=1.5e-2)


def test_fid_non_finite_sqrtm_falls_back_to_eps_offset(monkeypatch):
    real = scipy.linalg.sqrtm
    calls = []

    def flaky(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", flaky)
    s = np.diag([1.0, 0.0])  # singular product
    with pytest.warns(UserWarning, match="adding 1e-06"):
        f = frechet_distance(np.zeros(2), s, np.zeros(2), s)
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert abs(f) < 1e-5


def test_fid_complex_sqrtm_handling(monkeypatch):
    s = np.eye(3)
    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", lambda a: a + 1e-9j)
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", lambda a: a + 0.5j)
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(3), s, np.zeros(3), s)


def test_fid_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(3,\) and \(4,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must be \[3, 3\]"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu2 contains non-finite"):
        frechet_distance(np.zeros(3), np.eye(3), np.full(3, np.nan), np.eye(3))


# ----------------------------------------------------------------------------- streaming stats
def test_running_stats_matches_np_cov_over_concatenation():
    rng = np.random.default_rng(5)
    # Large offset + small spread: the case where raw-moment accumulation loses digits.
    chunks = [1e3 + rng.normal(size=(b, 7)).astype(np.float32) for b in (1, 5, 64, 3, 100)]
    acc = RunningStats.create(7)
    for c in chunks:
        acc = acc.update(c)
    mu, sigma = acc.finalize()
    allx = np.concatenate(chunks).astype(np.float64)
    assert acc.count == allx.shape[0]
    np.testing.assert_allclose(mu, allx.mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(allx, rowvar=False), rtol=1e-9, atol=1e-12)


def test_running_stats_merge_is_order_independent():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 4))
    a = RunningStats.create(4).update(x[:20])
    b = RunningStats.create(4).update(x[20:])
    for m in (a.merge(b), b.merge(a), RunningStats.create(4).merge(a).merge(b)):
        np.testing.assert_allclose(m.finalize()[1], np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match=r"features must be \[B, 4\]"):
        a.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        RunningStats.create(4).update(x[:1]).finalize()


# ----------------------------------------------------------------------------- reference files
def _fake_feature_fn(images):
    """Deterministic stand-in for Inception: features are simple functions of the pixels."""
    x = np.asarray(images, np.float64).reshape(images.shape[0], -1)
    pool = np.stack([x.mean(1), x.std(1), x[:, 0], x[:, -1]], 1)
    return {"pool": pool, "spatial": x[:, :5], "logits_unbiased": pool[:, :3]}


def test_write_and_load_adm_reference_roundtrip(tmp_path):
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    out = tmp_path / "ref.npz"
    ref = ref_lib.write_adm_reference(str(out), [imgs[:3], imgs[3:]], _fake_feature_fn)
    assert ref.kind == "adm" and ref.num_images == 10
    f = _fake_feature_fn(imgs)
    np.testing.assert_allclose(ref.mu, f["pool"].mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(f["pool"], rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(ref.sigma_s, np.cov(f["spatial"], rowvar=False), rtol=1e-10)
    streamed = np.concatenate(list(ref_lib.iter_npz_images(str(out), batch_size=4)))
    np.testing.assert_array_equal(streamed, imgs)


def test_load_fid_only_stats_and_errors(tmp_path):
    p = tmp_path / "fid_stats.npz"
    np.savez(p, mu=np.zeros(3), sigma=np.eye(3))
    r = ref_lib.load_reference_stats(str(p))
    assert r.kind == "fid" and r.mu_s is None and r.num_images == 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), cov=np.eye(3))
    with pytest.raises(KeyError, match=r"missing key\(s\) \['sigma'\]"):
        ref_lib.load_reference_stats(str(bad))
    half = tmp_path / "half.npz"
    np.savez(half, mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2))
    with pytest.raises(KeyError, match="missing key 'sigma_s'"):
        ref_lib.load_reference_stats(str(half))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        ref_lib.load_reference_stats(str(tmp_path / "nope.npz"))


def test_reference_pool_features_are_cached(tmp_path):
    rng = np.random.default_rng(8)
    imgs = rng.integers(0, 256, size=(6, 4, 4, 3), dtype=np.uint8)
    out = tmp_path / "ref.npz"
    ref_lib.write_adm_reference(str(out), [imgs], _fake_feature_fn)
    calls = []

    def counting(images):
        calls.append(images.shape[0])
        return _fake_feature_fn(images)

    a = ref_lib.reference_pool_features(str(out), counting, batch_size=4, tag="fake")
    b = ref_lib.reference_pool_features(str(out), counting, batch_size=4, tag="fake")
    assert calls == [4, 4]  # last batch padded to the first one's size; 2nd call hit the cache
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, _fake_feature_fn(imgs)["pool"], rtol=1e-6)
    ref_lib.reference_pool_features(str(out), counting, batch_size=4, tag="other-setup")
    assert calls == [4, 4, 4, 4]


def test_compute_metrics_against_own_reference_is_zero(tmp_path):
    rng = np.random.default_rng(9)
    imgs = rng.integers(0, 256, size=(40, 4, 4, 3), dtype=np.uint8)
    ref = ref_lib.write_adm_reference(str(tmp_path / "r.npz"), [imgs], _fake_feature_fn)
    summary = ref_lib.summarize_features(_fake_feature_fn, [imgs[:16], imgs[16:]])
    feats = ref_lib.reference_pool_features(ref.path, _fake_feature_fn)
    m = ref_lib.compute_metrics(summary, ref, feats)
    assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["num_images"] == 40 and m["inception_score"] >= 1.0


def test_iter_image_folder_center_crops(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(10)
    for i, (h, w) in enumerate([(40, 60), (70, 33), (16, 16)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    batches = list(ref_lib.iter_image_folder(str(tmp_path), image_size=16, batch_size=2))
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (1, 16, 16, 3)]
    assert batches[0].dtype == np.uint8
    with pytest.raises(FileNotFoundError, match="no images"):
        list(ref_lib.iter_image_folder(str(tmp_path / "empty"), 16, 2))


# ----------------------------------------------------------------------------- sample-and-evaluate
def _tiny_eval_config(tmp_path, ref_path, stats_path):
    import ml_collections
    from tests.conftest import tiny_config
    c = tiny_config()                    # 16px images, stride-4 latents with 3 channels, 10 classes
    c.tokenizer = ml_collections.ConfigDict(dict(
        name="kl16", path="", scale=0.5, random_init=True, seed=0,
        arch=dict(ch=8, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                  resolution=16, embed_dim=3, num_groups=4)))
    c.sample.num_iter, c.sample.solver_steps, c.sample.batch_size = 2, 1, 8
    c.sample.solver_order = 1  # one first-order head step: the cheapest sampler to compile
    c.sample.num_images = 12
    c.eval = ml_collections.ConfigDict(dict(
        reference_path=str(ref_path), fid_stats_path=str(stats_path), inception_size=75,
        cache_dir=str(tmp_path / "cache"), preview=4))
    c.sweep = ml_collections.ConfigDict(dict(num_iters=(1, 2), num_images=10))
    return c


def test_evaluate_and_sweep_end_to_end(tmp_path, monkeypatch):
    import json
    import types
    import jax
    from emigm_jax import sharding
    from emigm_jax.evaluation import evaluate as ev
    from emigm_jax.evaluation import sweep as sw
    from emigm_jax.evaluation.inception import (FIDInceptionV3, make_feature_fn,
                                                random_variables)
    from emigm_jax.models import init_params

    inc = random_variables(0, FIDInceptionV3(image_size=75))
    mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))
    # Same setup and batch (8) as the evaluation: one Inception compile serves the whole test.
    fn = make_feature_fn(inc, image_size=75, mesh=mesh)
    rng = np.random.default_rng(11)
    ref_imgs = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    ref = ref_lib.write_adm_reference(str(tmp_path / "ref.npz"), [ref_imgs[:8], ref_imgs[8:]], fn)
    np.savez(tmp_path / "stats.npz", mu=ref.mu, sigma=ref.sigma)
    config = _tiny_eval_config(tmp_path, ref.path, tmp_path / "stats.npz")
    params = init_params(config, jax.random.key(0))
    # The plumbing is under test here, not sqrtm: a 2048x2048 sqrtm takes 15-90 s on a shared
    # 2-core CPU and this test would need 9. The diagonal Frechet distance below is exact for
    # diagonal covariances; the real one is tested above.
    calls = []

    def diag_fd(mu1, s1, mu2, s2):
        calls.append(np.shape(mu1))
        return float(np.sum((mu1 - mu2) ** 2) + np.sum(
            (np.sqrt(np.diag(s1).clip(0)) - np.sqrt(np.diag(s2).clip(0))) ** 2))

    monkeypatch.setattr(ev, "frechet_distance", diag_fd)
    monkeypatch.setattr(ref_lib, "frechet_distance", diag_fd)

    m = ev.evaluate(config, params, str(tmp_path / "run"), mesh, inception_variables=inc)
    for k in ("fid", "sfid", "fid_stats_fid", "inception_score", "precision", "recall"):
        assert np.isfinite(m[k]), k
    assert m["fid"] == pytest.approx(m["fid_stats_fid"], rel=1e-12)  # same mu/sigma
    assert m["nfe"] >= 2 and m["num_images"] == 12
    name = ev.run_tag(config, 12)
    assert json.load(open(tmp_path / "run" / "eval" / f"{name}.json"))["fid"] == m["fid"]
    assert (tmp_path / "run" / "eval" / f"{name}.png").exists()
    assert not (tmp_path / "run" / "eval" / f"{name}.partial.npz").exists()
    assert len(list((tmp_path / "cache").glob("ref.npz.pool3.*.npy"))) == 1
    # fid, sfid (3x3x7 spatial grid at inception_size=75), fid against the stats file
    assert calls == [(2048,), (63,), (2048,)]

    res = sw.sweep(config, params, str(tmp_path / "run"), mesh, inception_variables=inc)
    assert [r["num_iter"] for r in res["rows"]] == [1, 2]
    assert all(np.isfinite(r["fid"]) for r in res["rows"])
    md = open(res["files"]["md"]).read().splitlines()
    assert md[0].startswith("| num_iter | cfg_scale | nfe | fid | sfid") and len(md) == 4
    assert os.path.getsize(res["files"]["png"]) > 0


def test_balanced_labels_and_settings_errors():
    import ml_collections
    from emigm_jax.evaluation import evaluate as ev
    labels = ev.balanced_labels(50, 10, seed=0)
    assert np.bincount(labels).tolist() == [5] * 10 and labels[:10].tolist() != list(range(10))
    c = ml_collections.ConfigDict(dict(sample=dict(num_images=8), eval=dict(inceptoin_path="x")))
    with pytest.raises(ValueError, match=r"unknown config.eval fields \['inceptoin_path'\]"):
        ev.eval_settings(c)


def test_evaluation_resumes_from_its_saved_statistics(tmp_path):
    """A preempted evaluation resumes at its last saved batch and ends with the statistics of
    an uninterrupted run; a saved file for other settings or weights is not reused."""
    import types
    import jax
    from emigm_jax import sharding
    from emigm_jax.evaluation.evaluate import sample_and_summarize
    from emigm_jax.models import init_params
    from emigm_jax.sampling import sample_batch_size
    from tests.conftest import tiny_config

    config = tiny_config()
    config.sample.num_iter, config.sample.solver_steps, config.sample.batch_size = 2, 1, 4
    config.sample.solver_order = 1  # one first-order head step: the cheapest to compile
    params = init_params(config, jax.random.key(0))
    mesh = sharding.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))
    bs = sample_batch_size(config, mesh)
    batches = []

    def features(images):  # stand-in for Inception: slices of the sampled tokens
        x = np.asarray(sharding.to_host(images), np.float64).reshape(bs, -1)
        batches.append(bs)
        return {"pool": x[:, :4], "spatial": x[:, 4:7], "logits_unbiased": x[:, 7:12]}

    class Preempted(Exception):
        pass

    def preempted_after_two(images):
        if len(batches) == 2:
            raise Preempted
        return features(images)

    path = str(tmp_path / "eval.partial.npz")
    kw = dict(decode_fn=lambda tokens: tokens, num_images=3 * bs - 1, seed=5, keep_images=64)
    full, _ = sample_and_summarize(config, params, mesh, feature_fn=features, **kw)
    batches.clear()
    with pytest.raises(Preempted):
        sample_and_summarize(config, params, mesh, feature_fn=preempted_after_two,
                             partial_path=path, partial_key="a", partial_every_s=0.0, **kw)
    assert int(np.load(path)["done"]) == 2 * bs
    batches.clear()
    resumed, info = sample_and_summarize(config, params, mesh, feature_fn=features,
                                         partial_path=path, partial_key="a",
                                         partial_every_s=0.0, **kw)
    assert len(batches) == 1  # only the batch that was never scored
    assert resumed.pool.count == full.pool.count == 3 * bs - 1
    np.testing.assert_allclose(resumed.pool.mean, full.pool.mean, rtol=1e-12)
    np.testing.assert_allclose(resumed.pool.m2, full.pool.m2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(resumed.spatial.m2, full.spatial.m2, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(resumed.pool_features, full.pool_features)
    np.testing.assert_array_equal(resumed.logits, full.logits)
    assert info["images"].shape[0] == 3 * bs - 1
    batches.clear()
    sample_and_summarize(config, params, mesh, feature_fn=features, partial_path=path,
                         partial_key="b", partial_every_s=0.0, **kw)
    assert len(batches) == 3  # another key: started over
    assert str(np.load(path)["key"]) == "b"  # and saved under its own key
