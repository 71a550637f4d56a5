"""Inception Score and improved precision/recall against hand-checked values."""
import numpy as np
import pytest

from emigm_jax.evaluation.metrics import inception_score, manifold_radii, precision_recall


# ----------------------------------------------------------------------------- Inception Score
def test_is_of_uniform_logits_is_one():
    mean, std = inception_score(np.zeros((100, 10)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_is_of_confident_balanced_logits_is_num_classes():
    c, n = 10, 1000
    logits = np.full((n, c), -1e4)
    logits[np.arange(n), np.arange(n) % c] = 1e4   # each split of 100 holds 10 per class
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    # Class-sorted samples (like 50-per-class generation) need the shuffle: unshuffled, every
    # split sees one class and the score collapses to 1.
    sorted_logits = logits[np.argsort(np.arange(n) % c, kind="stable")]
    assert inception_score(sorted_logits, splits=10)[0] == pytest.approx(1.0, abs=1e-9)
    assert inception_score(sorted_logits, splits=10, shuffle_seed=0)[0] > 9.0


def test_is_two_class_closed_form():
    # p(y|x) = (q, 1-q) for half the samples and (1-q, q) for the other half, one split:
    # marginal (1/2, 1/2) -> KL = log 2 + q log q + (1-q) log(1-q).
    q = 0.8
    lg = np.log(np.array([[q, 1 - q], [1 - q, q]] * 50))
    expected = np.exp(np.log(2) + q * np.log(q) + (1 - q) * np.log(1 - q))
    assert inception_score(lg, splits=1)[0] == pytest.approx(expected, rel=1e-12)


def test_is_errors():
    with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
        inception_score(np.zeros(5))
    with pytest.raises(ValueError, match="splits=10, N=5"):
        inception_score(np.zeros((5, 3)), splits=10)


# ----------------------------------------------------------------------------- precision/recall
def _embed(x1d, dim=8, seed=0):
    """1-D points placed on a random line in R^dim (distances preserved)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    pts = np.zeros((len(x1d), dim))
    pts[:, 0] = x1d
    return (pts @ q.T + rng.normal(size=dim)).astype(np.float32)


def test_precision_recall_hand_checked_1d_clouds():
    # ref = 0 1 2 3 10. k=3 radius = 3rd-nearest other point (self counted as the 0th):
    #   0 -> 3, 1 -> 2, 2 -> 2, 3 -> 3, 10 -> 9: ref manifold covers [-3, 19].
    # samples = 2.5 2.6 2.7 2.8 30: radii 0.3 0.2 0.2 0.3 27.4 (30's distances 27.2..27.5),
    #   balls [2.2,2.8] [2.4,2.8] [2.5,2.9] [2.5,3.1] [2.6,57.4].
    # precision: 2.5..2.8 inside [-3, 19], 30 outside -> 4/5.
    # recall: ref 3 and 10 inside a sample ball, 0 1 2 not -> 2/5.
    ref = _embed([0, 1, 2, 3, 10])
    smp = _embed([2.5, 2.6, 2.7, 2.8, 30])
    np.testing.assert_allclose(np.sqrt(manifold_radii(ref, k=3)), [3, 2, 2, 3, 9], atol=1e-3)
    np.testing.assert_allclose(np.sqrt(manifold_radii(smp, k=3)), [0.3, 0.2, 0.2, 0.3, 27.4],
                               atol=1e-3)
    p, r = precision_recall(ref, smp, k=3)
    assert (p, r) == (0.8, 0.4)
    # Swapping the roles swaps precision and recall.
    assert precision_recall(smp, ref, k=3) == (0.4, 0.8)


def test_precision_recall_k1_hand_checked():
    # k=1: radius = nearest other point. ref 0 1 | 10 11 (radii 1), samples 0.5 5 (radii 4.5).
    # precision: 0.5 in [−1, 2] yes; 5 no -> 1/2. recall: sample balls [−4, 5], [0.5, 9.5]:
    # refs 0, 1 in; 10, 11 out -> 1/2.
    p, r = precision_recall(_embed([0, 1, 10, 11]), _embed([0.5, 5]), k=1)
    assert (p, r) == (0.5, 0.5)


def test_precision_recall_matches_brute_force_and_blocking():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(60, 5)).astype(np.float32)
    smp = (rng.normal(size=(45, 5)) * 1.3 + 0.4).astype(np.float32)

    def brute(a, b, k):
        da = ((a[:, None] - a[None]) ** 2).sum(-1)
        db = ((b[:, None] - b[None]) ** 2).sum(-1)
        ra, rb = np.sort(da, 1)[:, k], np.sort(db, 1)[:, k]
        dab = ((a[:, None] - b[None]) ** 2).sum(-1)       # [Na, Nb]
        prec = np.mean(np.any(dab <= ra[:, None], axis=0))
        rec = np.mean(np.any(dab <= rb[None, :], axis=1))
        return prec, rec

    expected = brute(ref.astype(np.float64), smp.astype(np.float64), 3)
    assert precision_recall(ref, smp, k=3) == pytest.approx(expected)
    assert precision_recall(ref, smp, k=3, block_size=7) == pytest.approx(expected)
    assert precision_recall(ref, smp, k=3, distance_dtype="float16") == pytest.approx(
        expected, abs=0.05)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="k=5, N=3"):
        manifold_radii(np.zeros((3, 2)), k=5)
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="distance_dtype"):
        precision_recall(np.zeros((4, 2)), np.zeros((4, 2)), distance_dtype="int8")
