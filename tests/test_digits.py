"""The embedded digits dataset, its tokenizer, and the digits quality score."""
import numpy as np
import pytest

from emigm_jax.data import digits
from emigm_jax.evaluation import digits_metric as dm
from emigm_jax.evaluation.metrics import gaussian_stats
from tests.multiprocess_worker import tiny_digits_config


def test_split_is_fixed_stratified_and_disjoint():
    s = digits.load_digits_splits(0.2, 0)
    assert s.train_images.shape == (1437, 8, 8) and s.test_images.shape == (360, 8, 8)
    assert s.train_labels.dtype == np.int32 and s.train_images.dtype == np.float32
    assert s.train_images.min() == 0 and s.train_images.max() == 16
    # stratified: every class holds ~20% out (178..183 images per class)
    counts = np.bincount(s.test_labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37
    # disjoint and complete: together they are exactly the 1797 images (as a multiset)
    from sklearn.datasets import load_digits
    both = np.concatenate([s.train_images, s.test_images]).reshape(1797, -1)
    u1, c1 = np.unique(both, axis=0, return_counts=True)
    u2, c2 = np.unique(load_digits().data.astype(np.float32), axis=0, return_counts=True)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(c1, c2)
    # deterministic
    fresh = digits.load_digits_splits.__wrapped__(0.2, 0)
    np.testing.assert_array_equal(fresh.test_labels, s.test_labels)
    np.testing.assert_array_equal(fresh.train_images, s.train_images)
    with pytest.raises(ValueError, match="test_fraction"):
        digits.load_digits_splits(1.5, 0)


def test_pixel_constants_match_dataset():
    from sklearn.datasets import load_digits
    x = load_digits().images.astype(np.float64)
    assert abs(x.mean() - digits.PIXEL_MEAN) < 1e-3
    assert abs(x.std() - digits.PIXEL_STD) < 1e-3


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_tokenizer_roundtrip_and_layout(patch):
    tok = digits.DigitsTokenizer(patch_size=patch)
    s = digits.load_digits_splits()
    x = s.train_images[:7]
    t = tok.encode(x)
    assert t.shape == (7, (8 // patch) ** 2, patch * patch) and t.dtype == np.float32
    np.testing.assert_allclose(tok.decode(t), x, atol=1e-5)
    # token (gy, gx) channel (py, px) is pixel (gy * p + py, gx * p + px), standardised
    g = 8 // patch
    gy, gx, py, px = g - 1, 0, patch - 1, patch // 2
    want = (x[3, gy * patch + py, gx * patch + px] - digits.PIXEL_MEAN) / digits.PIXEL_STD
    assert t[3, gy * g + gx, py * patch + px] == pytest.approx(want, abs=1e-6)


def test_tokens_are_about_unit_variance_and_decode_clips():
    tok = digits.DigitsTokenizer(patch_size=2)
    t = tok.encode(digits.load_digits_splits().train_images)
    assert abs(t.mean()) < 0.05 and abs(t.std() - 1.0) < 0.05
    wild = np.full((2, 16, 4), 100.0, np.float32)
    wild[1] = -100.0
    out = tok.decode(wild)
    assert out.max() == 16.0 and out.min() == 0.0
    assert tok.decode(wild, clip=False).max() > 16.0


def test_tokenizer_errors_name_the_problem():
    with pytest.raises(ValueError, match="patch_size=3"):
        digits.DigitsTokenizer(patch_size=3)
    with pytest.raises(ValueError, match=r"\[B, 16, 4\]"):
        digits.DigitsTokenizer(patch_size=2).decode(np.zeros((2, 64, 1)))
    c = tiny_digits_config()
    c.model.num_classes = 1000
    with pytest.raises(ValueError, match="model.num_classes=10"):
        digits.digits_tokenizer(c)


def test_digits_source_matches_split_and_config():
    c = tiny_digits_config()
    src = digits.digits_source(c, "train")
    assert len(src) == 1437 and len(digits.digits_source(c, "test")) == 360
    ex = src[5]
    assert ex["tokens"].shape == (16, 4) and ex["label"].dtype == np.int32
    s = digits.load_digits_splits()
    np.testing.assert_allclose(digits.DigitsTokenizer(2).decode(ex["tokens"][None])[0],
                               s.train_images[5], atol=1e-5)
    from emigm_jax.models import seq_len, token_dim
    assert (seq_len(c), token_dim(c)) == ex["tokens"].shape


def test_gaussian_fit_is_float64_mean_and_unbiased_cov():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 3)).astype(np.float32)
    mu, cov = gaussian_stats(f)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    x = f.astype(np.float64)
    np.testing.assert_allclose(cov, (x - x.mean(0)).T @ (x - x.mean(0)) / 49, rtol=1e-12)
    with pytest.raises(ValueError, match="n >= 2"):
        gaussian_stats(f[:1])


def test_score_real_images_sets_the_ceiling_and_noise_scores_badly():
    s = digits.load_digits_splits()
    real = dm.score_samples(s.test_images, s.test_labels)
    # the held-out images scored as "samples" reproduce the real numbers exactly
    assert real["sample_class_accuracy"] == real["real_class_accuracy"]
    assert real["real_class_accuracy"] > 0.95
    assert abs(real["sample_fd"]) < 1e-6
    assert 0 < real["real_fd"] < 2.0
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 50)
    noise = dm.score_samples(rng.uniform(0, 16, (500, 8, 8)), labels)
    assert noise["sample_class_accuracy"] < 0.3
    assert noise["sample_fd"] > 10 * noise["real_fd"]
    # real train images of the requested classes: accurate, FD near the floor
    pick = np.concatenate([np.flatnonzero(s.train_labels == c)[:50] for c in range(10)])
    good = dm.score_samples(s.train_images[pick], s.train_labels[pick])
    assert good["sample_class_accuracy"] > 0.97
    assert good["sample_fd"] < 3 * good["real_fd"]
    assert len(good["per_class_accuracy"]) == 10


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        dm.score_samples(np.zeros((3, 8, 8)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        dm.score_samples(np.zeros((2, 8, 8)), np.array([0, 10]))
    with pytest.raises(ValueError, match="non-finite"):
        dm.score_samples(np.full((2, 8, 8), np.nan), np.array([0, 1]))


# ----------------------------------------------------------------------------- discrete tokens


def test_discrete_tokens_are_the_pixels_in_raster_order():
    tok = digits.DigitsTokenizer(patch_size=1, discrete=True)
    s = digits.load_digits_splits()
    x = s.train_images[:9]
    t = tok.encode(x)
    assert t.shape == (9, 64) and t.dtype == np.int32
    assert t.min() >= 0 and t.max() == 16  # the 17-symbol vocabulary is used to its top
    # token r * 8 + c of image 4 is pixel (r, c)
    assert t[4, 3 * 8 + 5] == int(x[4, 3, 5]) and t[4, 7 * 8 + 0] == int(x[4, 7, 0])
    back = tok.decode(t)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, x)  # lossless


def test_discrete_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="patch_size must be 1"):
        digits.DigitsTokenizer(patch_size=2, discrete=True)
    tok = digits.DigitsTokenizer(patch_size=1, discrete=True)
    with pytest.raises(ValueError, match="integer pixels in 0..16"):
        tok.encode(np.full((1, 8, 8), 2.5, np.float32))
    with pytest.raises(ValueError, match="integer pixels in 0..16"):
        tok.encode(np.full((1, 8, 8), 17.0, np.float32))
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        tok.decode(np.zeros((2, 16), np.int32))
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode(np.zeros((2, 64), np.float32))


@pytest.mark.parametrize("name", ["digits_maskgit", "digits_mdm", "digits_di", "digits_maskgil"])
def test_discrete_digits_configs_tokenise_pixels(name):
    import importlib
    from emigm_jax.config_validation import validate_config
    from emigm_jax.models import seq_len
    c = importlib.import_module(f"configs.{name}").get_config()
    validate_config(c)
    tok = digits.digits_tokenizer(c)
    assert tok.discrete and seq_len(c) == 64 and c.model.vocab_size == digits.PIXEL_LEVELS == 17
    ex = digits.digits_source(c, "train")[0]
    assert ex["tokens"].shape == (64,) and ex["tokens"].dtype == np.int32
    np.testing.assert_array_equal(ex["tokens"].reshape(8, 8),
                                  digits.load_digits_splits().train_images[0])
    c.model.vocab_size = 16
    with pytest.raises(ValueError, match="model.head='categorical' needs model.vocab_size=17"):
        digits.digits_tokenizer(c)
