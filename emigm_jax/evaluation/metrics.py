"""FID / sFID, Inception Score, improved precision/recall, and a streaming Gaussian estimator.

Conventions follow the ADM evaluation suite (guided-diffusion `evaluations/evaluator.py`),
whose numbers the eMIGM paper reports for sFID, precision and recall:

* Frechet distance: float64, `scipy.linalg.sqrtm` of sigma1 @ sigma2; if the result is not
  finite, eps * I is added to both covariances; a complex result is accepted (real part kept)
  only when the imaginary part of its diagonal is below 1e-3. sFID is the same distance on the
  spatial-feature statistics (mu_s, sigma_s).
* Covariances use ddof=1 (`np.cov(rowvar=False)`), the convention of the stored mu/sigma.
* Inception Score: softmax of the bias-free logits, 10 contiguous splits, exp(E KL(p(y|x) ||
  p(y))) per split; mean and std over splits. 50K samples give ADM's 5000-sample splits.
  The log of probabilities is taken from log_softmax in float64, so saturated logits give exact
  zeros instead of 0 * log(0) = nan.
* Precision/recall (Kynkaanniemi et al. 2019 as in ADM): squared Euclidean distances; the
  manifold radius of a point is its k-th smallest distance to its own set *counting itself*
  (k = 3 -> the third other neighbour); a point is covered if it lies within (<=) the radius of
  any point of the other set. precision = fraction of samples covered by the reference
  manifold, recall = fraction of references covered by the sample manifold. ADM computes the
  distances in float16 (float32 fallback on overflow); here float32 is the default and
  distance_dtype='float16' reproduces ADM's rounding.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special


# ----------------------------------------------------------------------------- Frechet distance
def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and "
                         f"{mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be [{d}, {d}] to match the means, got {s.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains non-finite values")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(sigma1 @ sigma2) is not finite (singular product); adding "
                      f"{eps} to the covariance diagonals")
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}; covariances are not PSD")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- streaming stats
class RunningStats(NamedTuple):
    """Running mean / centred scatter in float64 (Chan et al. pairwise merge).

    Holding the centred scatter rather than raw second moments keeps 50K x 2048 accumulations
    accurate; `merge` combines per-host or per-shard accumulators exactly.
    """
    count: int
    mean: np.ndarray   # [D] float64
    m2: np.ndarray     # [D, D] float64, sum of (x - mean)(x - mean)^T

    @classmethod
    def create(cls, dim: int) -> "RunningStats":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    def update(self, x) -> "RunningStats":
        """x: [B, D] features; returns the accumulator including them."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be [B, {self.mean.shape[0]}], got {x.shape}")
        if x.shape[0] == 0:
            return self
        mb = x.mean(axis=0)
        c = x - mb
        return self.merge(RunningStats(x.shape[0], mb, c.T @ c))

    def merge(self, other: "RunningStats") -> "RunningStats":
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"cannot merge stats of dim {self.mean.shape} and {other.mean.shape}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return RunningStats(n, mean, m2)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with ddof=1, like np.cov(rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.count}")
        return self.mean.copy(), self.m2 / (self.count - 1)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of [N, D] features in float64 (ddof=1)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [n >= 2, F] features for a Gaussian fit, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


# ----------------------------------------------------------------------------- Inception Score
def inception_score(logits, splits: int = 10,
                    shuffle_seed: int | None = None) -> tuple[float, float]:
    """(mean, std) over `splits` contiguous chunks of exp(mean_x KL(p(y|x) || p_split(y))).

    Pass shuffle_seed when samples are stored in class order (e.g. 50 per class in label
    order): contiguous splits would otherwise each see only a tenth of the classes.
    torch-fidelity shuffles (seed 2020); ADM does not.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {logits.shape}")
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits}, N={n}")
    if shuffle_seed is not None:
        logits = logits[np.random.default_rng(shuffle_seed).permutation(n)]
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)   # [N, C]
    p = np.exp(logp)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        pp, lp = p[lo:hi], logp[lo:hi]
        marg = pp.mean(axis=0)                                             # [C]
        log_marg = np.log(np.where(marg > 0, marg, 1.0))  # marg_c = 0 => p_ic = 0 for all i
        kl = np.where(pp > 0, pp * (lp - log_marg), 0.0).sum(axis=1)        # [n_split]
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision/recall
@functools.partial(jax.jit, static_argnames=("dtype",))
def _sq_distances(a, b, dtype):
    """[n, D], [m, D] -> [n, m] squared distances max(|a|^2 - 2ab + |b|^2, 0) in float32."""
    a = a.astype(dtype)
    b = b.astype(dtype)
    na = jnp.sum(a * a, axis=1)[:, None]
    nb = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    d = jnp.maximum(na - 2 * ab + nb, 0).astype(jnp.float32)
    if dtype == jnp.float16:  # ADM: fall back to float32 when float16 overflows
        d = jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda: d,
                         lambda: _sq_distances(a.astype(jnp.float32), b.astype(jnp.float32),
                                               jnp.float32))
    return d


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _block_radii(rows, feats, k, dtype):
    d = _sq_distances(rows, feats, dtype)
    return -jax.lax.top_k(-d, k + 1)[0][:, k]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _block_covered(rows, feats, radii, dtype):
    return jnp.any(_sq_distances(rows, feats, dtype) <= radii[None, :], axis=1)


def _row_blocks(x: np.ndarray, block: int):
    """Yields (padded block [block, D], n_valid); padding keeps one compiled shape."""
    for lo in range(0, x.shape[0], block):
        rows = x[lo:lo + block]
        n = rows.shape[0]
        if n < block and x.shape[0] > block:
            rows = np.concatenate([rows, np.repeat(rows[-1:], block - n, axis=0)])
        yield rows, n


def _check_dtype(distance_dtype: str):
    if distance_dtype not in ("float32", "float16"):
        raise ValueError(f"distance_dtype must be 'float32' or 'float16', got {distance_dtype!r}")
    return jnp.float32 if distance_dtype == "float32" else jnp.float16


def manifold_radii(features, k: int = 3, block_size: int = 4096,
                   distance_dtype: str = "float32") -> np.ndarray:
    """[N] squared k-NN radii (self counted as the 0-th neighbour)."""
    f = np.asarray(features, np.float32)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got {f.shape}")
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k must satisfy 1 <= k < N, got k={k}, N={f.shape[0]}")
    dt = _check_dtype(distance_dtype)
    fd = jnp.asarray(f)
    out = [np.asarray(_block_radii(rows, fd, k, dt))[:n] for rows, n in _row_blocks(f, block_size)]
    return np.concatenate(out)


def _coverage(points, feats, radii, block_size, dt) -> np.ndarray:
    fd, rd = jnp.asarray(feats), jnp.asarray(radii)
    out = [np.asarray(_block_covered(rows, fd, rd, dt))[:n]
           for rows, n in _row_blocks(points, block_size)]
    return np.concatenate(out)


def precision_recall(ref_features, sample_features, k: int = 3, block_size: int = 4096,
                     distance_dtype: str = "float32",
                     ref_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall of samples w.r.t. references ([N, D] each).

    ref_radii can be passed to reuse the reference manifold across evaluations.
    """
    ref = np.asarray(ref_features, np.float32)
    smp = np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {ref.shape} and {smp.shape}")
    dt = _check_dtype(distance_dtype)
    if ref_radii is None:
        ref_radii = manifold_radii(ref, k, block_size, distance_dtype)
    smp_radii = manifold_radii(smp, k, block_size, distance_dtype)
    precision = _coverage(smp, ref, ref_radii, block_size, dt).mean()
    recall = _coverage(ref, smp, smp_radii, block_size, dt).mean()
    return float(precision), float(recall)
