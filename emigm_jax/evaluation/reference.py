"""Reference statistics: loading the two public file kinds, writing ADM-format files, and the
feature summaries that FID/sFID/IS/precision/recall are computed from.

File kinds (both `.npz`):
* ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`): mu, sigma (pool3), mu_s, sigma_s
  (sFID spatial features) and arr_0, the reference images [N, H, W, 3] uint8 (10,000 for
  ImageNet). Precision/recall need the pool3 features of arr_0: they are computed once per
  (file, Inception setup) and cached as .npy.
* FID-only stats (`fid_stats_imagenet256_guided_diffusion.npz`, the file the eMIGM reference
  code hands to torch-fidelity): mu, sigma.

`write_adm_reference` makes the first kind from any image iterator (e.g. `iter_image_folder`),
so users can build statistics for their own data (CLI: `emigm_jax.evaluation.make_reference`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import zipfile
from typing import Iterable, Iterator

import numpy as np

from emigm_jax.data.preprocess import preprocess_image
from emigm_jax.evaluation.inception import FeatureFn, pad_batch
from emigm_jax.evaluation.metrics import (RunningStats, frechet_distance, inception_score,
                                          precision_recall)

ADM_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FID_KEYS = ("mu", "sigma")
IMAGE_KEY = "arr_0"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Loaded reference statistics. kind: 'adm' (with sFID stats) or 'fid' (mu/sigma only)."""
    path: str
    kind: str
    mu: np.ndarray                   # [2048]
    sigma: np.ndarray                # [2048, 2048]
    mu_s: np.ndarray | None = None   # [2023]
    sigma_s: np.ndarray | None = None
    num_images: int = 0              # rows of arr_0 (0 when absent)


def load_reference_stats(path: str) -> ReferenceStats:
    """Reads an ADM reference batch or a FID-only stats file; errors name any missing key."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference statistics file not found: {path!r}")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        missing_fid = [k for k in FID_KEYS if k not in keys]
        if missing_fid:
            raise KeyError(f"{path!r} is not a reference-statistics file: missing key(s) "
                           f"{missing_fid} (found {sorted(keys)}); expected an ADM reference "
                           f"batch ({', '.join(ADM_KEYS + (IMAGE_KEY,))}) or FID stats "
                           f"({', '.join(FID_KEYS)})")
        has_spatial = [k for k in ("mu_s", "sigma_s") if k in keys]
        if len(has_spatial) == 1:
            other = "sigma_s" if has_spatial[0] == "mu_s" else "mu_s"
            raise KeyError(f"{path!r} has {has_spatial[0]!r} but is missing key {other!r} "
                           "(an ADM reference batch needs both)")
        kind = "adm" if has_spatial else "fid"
        arrays = {k: np.asarray(z[k], np.float64) for k in (ADM_KEYS if has_spatial else FID_KEYS)}
    num_images = _npz_array_shape(path, IMAGE_KEY)[0] if IMAGE_KEY in keys else 0
    d = arrays["mu"].shape
    if arrays["mu"].ndim != 1 or arrays["sigma"].shape != d * 2:
        raise ValueError(f"{path!r}: mu {arrays['mu'].shape} and sigma {arrays['sigma'].shape} "
                         "must be [D] and [D, D]")
    return ReferenceStats(path=path, kind=kind, num_images=num_images, **arrays)


# ----------------------------------------------------------------------------- arr_0 streaming
def _npz_array_shape(path: str, name: str) -> tuple[int, ...]:
    with _open_npy(path, name) as f:
        return _read_npy_header(f)[0]


@contextlib.contextmanager
def _open_npy(path: str, name: str):
    """The raw stream of array ``name`` inside the npz at ``path`` (not loaded)."""
    with zipfile.ZipFile(path, "r") as zf:
        if f"{name}.npy" not in zf.namelist():
            raise KeyError(f"{path!r} has no array {name!r}")
        with zf.open(f"{name}.npy", "r") as f:
            yield f


def _read_npy_header(f):
    """(shape, dtype) of a C-ordered, non-object .npy stream positioned at its start."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if fortran or dtype.hasobject:
        raise ValueError("reference images must be a C-ordered, non-object array")
    return shape, dtype


def iter_npz_images(path: str, batch_size: int, name: str = IMAGE_KEY) -> Iterator[np.ndarray]:
    """Streams [b, H, W, 3] batches of an npz array without loading all of it (2 GB for 10K
    256px images)."""
    with _open_npy(path, name) as f:
        shape, dtype = _read_npy_header(f)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for lo in range(0, shape[0], batch_size):
            b = min(batch_size, shape[0] - lo)
            buf = f.read(b * row)
            if len(buf) != b * row:
                raise ValueError(f"{path!r}:{name} ended early at row {lo}")
            yield np.frombuffer(buf, dtype).reshape((b,) + tuple(shape[1:]))


# ----------------------------------------------------------------------------- summaries
@dataclasses.dataclass
class FeatureSummary:
    """What the metrics need from a set of images: running pool3/spatial Gaussians, and the
    pool3 features (precision/recall) and bias-free logits (IS) when kept."""
    pool: RunningStats
    spatial: RunningStats | None
    pool_features: np.ndarray | None = None   # [N, 2048]
    logits: np.ndarray | None = None          # [N, 1008]

    @property
    def count(self) -> int:
        return self.pool.count


def summarize_features(feature_fn: FeatureFn, batches: Iterable[np.ndarray], *,
                       keep_pool: bool = True, keep_logits: bool = True,
                       spatial: bool = True) -> FeatureSummary:
    """Runs Inception over [b, H, W, 3] uint8 batches of any b.

    Smaller batches (the last one) are padded to the first batch's size and every batch to
    the shard count, so one compiled shape serves the whole stream.
    """
    shards = getattr(feature_fn, "num_shards", 1)
    pool = spat = None
    pools, logits = [], []
    target = None
    for images in batches:
        images = np.asarray(images) if not hasattr(images, "sharding") else images
        if target is not None and images.shape[0] < target:
            padded, n = pad_batch(np.asarray(images), target)
        else:
            padded, n = pad_batch(np.asarray(images), shards)
            target = target or padded.shape[0]
        out = feature_fn(padded)
        if pool is None:
            pool = RunningStats.create(out["pool"].shape[1])
            if spatial:
                spat = RunningStats.create(out["spatial"].shape[1])
        pool = pool.update(out["pool"][:n])
        if spatial:
            spat = spat.update(out["spatial"][:n])
        if keep_pool:
            pools.append(out["pool"][:n])
        if keep_logits:
            logits.append(out["logits_unbiased"][:n])
    if pool is None:
        raise ValueError("summarize_features got no images")
    return FeatureSummary(pool, spat, np.concatenate(pools) if keep_pool else None,
                          np.concatenate(logits) if keep_logits else None)


def compute_metrics(summary: FeatureSummary, reference: ReferenceStats | None = None,
                    ref_pool_features: np.ndarray | None = None, *, is_splits: int = 10,
                    is_shuffle_seed: int | None = 0, pr_k: int = 3) -> dict[str, float]:
    """FID, sFID (ADM reference only), IS, precision/recall (needs reference features).

    Metrics whose inputs are missing are left out of the result rather than guessed.
    """
    out: dict[str, float] = {"num_images": float(summary.count)}
    if reference is not None:
        mu, sigma = summary.pool.finalize()
        out["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
        if reference.kind == "adm" and summary.spatial is not None:
            mu_s, sigma_s = summary.spatial.finalize()
            out["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    if summary.logits is not None and summary.logits.shape[0] >= is_splits:
        out["inception_score"], out["inception_score_std"] = inception_score(
            summary.logits, is_splits, shuffle_seed=is_shuffle_seed)
    if ref_pool_features is not None and summary.pool_features is not None:
        out["precision"], out["recall"] = precision_recall(ref_pool_features,
                                                           summary.pool_features, k=pr_k)
    return out


def reference_pool_features(path: str, feature_fn: FeatureFn, *, batch_size: int = 250,
                            cache_dir: str | None = None, tag: str = "") -> np.ndarray:
    """pool3 features [N, 2048] of an ADM reference batch's arr_0, computed once and cached.

    The cache name hashes the file's path, size and mtime plus `tag`: put the Inception setup
    (weights file, preprocess mode) in the tag so a different setup does not reuse the cache.
    """
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{tag}".encode())
    cache_dir = cache_dir or os.path.dirname(os.path.abspath(path))
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.pool3.{key.hexdigest()[:12]}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    summary = summarize_features(feature_fn, iter_npz_images(path, batch_size),
                                 keep_pool=True, keep_logits=False, spatial=False)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + ".tmp.npy"
    np.save(tmp, summary.pool_features)
    os.replace(tmp, cache)
    return summary.pool_features


# ----------------------------------------------------------------------------- writing
def write_adm_reference(out_path: str, batches: Iterable[np.ndarray], feature_fn: FeatureFn,
                        *, store_images: bool = True) -> ReferenceStats:
    """Writes an ADM-format reference batch (mu, sigma, mu_s, sigma_s[, arr_0]) for any images.

    batches: [b, H, W, 3] uint8. arr_0 is what precision/recall compares against; pass
    store_images=False for stats only (then the file also serves as a FID-stats file).
    """
    kept: list[np.ndarray] = []

    def tee():
        for b in batches:
            b = np.asarray(b)
            if b.dtype != np.uint8 or b.ndim != 4 or b.shape[-1] != 3:
                raise ValueError(f"reference images must be uint8 [b, H, W, 3], got "
                                 f"{b.dtype} {b.shape}")
            if store_images:
                kept.append(b)
            yield b

    s = summarize_features(feature_fn, tee(), keep_pool=False, keep_logits=False)
    mu, sigma = s.pool.finalize()
    mu_s, sigma_s = s.spatial.finalize()
    arrays = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    if store_images:
        arrays[IMAGE_KEY] = np.concatenate(kept)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez(out_path, **arrays)
    return load_reference_stats(out_path if out_path.endswith(".npz") else out_path + ".npz")


def iter_image_folder(folder: str, image_size: int, batch_size: int,
                      limit: int | None = None) -> Iterator[np.ndarray]:
    """uint8 [b, size, size, 3] batches of every image under `folder` (sorted, recursive),
    ADM-center-cropped like the training data (`data.preprocess`)."""
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
                   if f.endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    files = files[:limit] if limit else files
    for lo in range(0, len(files), batch_size):
        yield np.stack([preprocess_image(fn, image_size) for fn in files[lo:lo + batch_size]])
