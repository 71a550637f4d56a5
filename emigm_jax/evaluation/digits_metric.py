"""Quality score for generated digits: classifier accuracy and a Frechet distance.

A small MLP (scikit-learn, fixed seed) is trained on the real digits train split. It scores
images two ways:

  * class accuracy: the fraction of images the classifier assigns to their requested label
    (does a sample of class 3 look like a 3?);
  * Frechet distance (FD) between Gaussian fits of the classifier's hidden features
    (tanh layer, float64; tanh rather than ReLU so no unit is dead and the feature
    covariance stays full rank) of the images and of the real held-out test split: an FID analogue
    for 8x8 digits, sensitive to diversity as well as class fidelity.

The real-image reference numbers are reported next to the sample numbers:
``real_class_accuracy`` is the classifier's accuracy on the held-out test split (the
ceiling), and ``real_fd`` is the FD of real *train* images, subsampled to the number of
generated images, against the same test split (the floor a generator that reproduces the
training distribution would reach at that sample count; FD is biased upwards at small n).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
from sklearn.neural_network import MLPClassifier

from emigm_jax.data.digits import NUM_CLASSES, PIXEL_MAX, SIDE, DigitsSplits, load_digits_splits
from emigm_jax.evaluation.metrics import frechet_distance, gaussian_stats

@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
    """A fitted sklearn MLP (tanh hidden layers); ``features`` are its last hidden layer."""

    model: object  # sklearn.neural_network.MLPClassifier

    @staticmethod
    def _inputs(images) -> np.ndarray:
        x = np.asarray(images, np.float64)
        if x.ndim != 3 or x.shape[1:] != (SIDE, SIDE):
            raise ValueError(f"digits images must be [n, 8, 8], got shape {x.shape}")
        return x.reshape(len(x), SIDE * SIDE) / PIXEL_MAX

    def predict(self, images) -> np.ndarray:
        """images [n, 8, 8] in 0..16 -> predicted labels [n]."""
        return self.model.predict(self._inputs(images)).astype(np.int32)

    def features(self, images) -> np.ndarray:
        """images [n, 8, 8] -> last hidden-layer activations [n, F], float64."""
        h = self._inputs(images)
        for w, b in zip(self.model.coefs_[:-1], self.model.intercepts_[:-1]):
            h = np.tanh(h @ w + b)
        return h

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))


@functools.lru_cache(maxsize=4)
def fit_classifier(test_fraction: float = 0.2, split_seed: int = 0, seed: int = 0,
                   hidden: int = 64) -> DigitsClassifier:
    """MLP (64 -> hidden tanh -> 10, L-BFGS) on the real train split; deterministic.

    About 97% accuracy on the held-out split; fits in seconds.
    """
    splits = load_digits_splits(test_fraction, split_seed)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="tanh", solver="lbfgs",
                        alpha=1e-2, max_iter=500, random_state=seed)
    with warnings.catch_warnings():  # L-BFGS "max_iter reached" is expected and harmless
        warnings.simplefilter("ignore")
        clf.fit(DigitsClassifier._inputs(splits.train_images), splits.train_labels)
    return DigitsClassifier(clf)


def score_samples(images: np.ndarray, labels: np.ndarray, *, test_fraction: float = 0.2,
                  split_seed: int = 0, seed: int = 0) -> dict[str, float]:
    """Scores generated ``images`` [K, 8, 8] (0..16) requested as ``labels`` [K].

    Returns sample_class_accuracy, sample_fd, real_class_accuracy, real_fd,
    per_class_accuracy (list of 10), num_samples.
    """
    images = np.asarray(images, np.float64)
    labels = np.asarray(labels).astype(np.int32)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    if not np.isfinite(images).all():
        raise ValueError("generated images contain non-finite values")
    splits: DigitsSplits = load_digits_splits(test_fraction, split_seed)
    clf = fit_classifier(test_fraction, split_seed, seed)

    ref = gaussian_stats(clf.features(splits.test_images))
    pred = clf.predict(images)
    per_class = [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else float("nan")
                 for c in range(NUM_CLASSES)]
    sample_fd = frechet_distance(*gaussian_stats(clf.features(images)), *ref)

    k = min(len(images), len(splits.train_images))
    pick = np.random.default_rng(seed).choice(len(splits.train_images), size=k, replace=False)
    real_fd = frechet_distance(*gaussian_stats(clf.features(splits.train_images[pick])), *ref)
    return {
        "sample_class_accuracy": float(np.mean(pred == labels)),
        "sample_fd": float(sample_fd),
        "real_class_accuracy": clf.accuracy(splits.test_images, splits.test_labels),
        "real_fd": float(real_fd),
        "per_class_accuracy": per_class,
        "num_samples": int(len(images)),
    }
