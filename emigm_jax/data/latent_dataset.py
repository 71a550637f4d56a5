"""Training input from a latent cache (`emigm_jax.data.cache_latents`).

Each example: pick the image or its flip at random, then z = mean + std * eps (KL-16; eps
fresh every time the example is drawn) or the stored latent (DC-AE), times the tokenizer
scale, flattened in raster order of the latent grid: ``{'tokens': float32 [N, C],
'label': int32}`` with N = h * w (patch size 1). Randomness comes from the grain pipeline's
per-element rng (`emigm_jax.data.pipeline`), so it is reproducible and resumable.

Pipeline plugin for ``data.source = 'cached'``: `make_source(config, split)` and
`random_transform(config, split)`. The cache directory is ``config.data.cache_dir`` if set,
else ``config.data.path``.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import grain
import numpy as np

from emigm_jax.data.cache_latents import MANIFEST, storage_dtype
from emigm_jax.tokenizers.registry import moments_to_tokens_np


def read_manifest(cache_dir: str) -> dict:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        hint = (" (an unfinished cache: rerun the same cache_latents command to finish it)"
                if os.path.isfile(os.path.join(cache_dir, "cache_settings.json")) else "")
        raise FileNotFoundError(
            f"no {MANIFEST} in {cache_dir!r}{hint}: create the cache with `python -m "
            "emigm_jax.data.cache_latents --config=... --config.data.path=... --cache_dir=...`")
    with open(path) as f:
        return json.load(f)


class CachedLatentSource:
    """Random access to ``{'moments': [2, K, h, w, C] float32, 'label': int32}``."""

    def __init__(self, cache_dir: str):
        self.manifest = m = read_manifest(cache_dir)
        self.dtype = storage_dtype(m["dtype"])
        self.record_shape = tuple(m["record_shape"])
        files = [os.path.join(cache_dir, s["file"]) for s in m["shards"] if s["count"] > 0]
        self.labels = np.load(os.path.join(cache_dir, m["labels_file"]))
        if len(self.labels) != m["count"]:
            raise ValueError(f"{cache_dir}: labels.npy has {len(self.labels)} entries, manifest "
                             f"count is {m['count']}")
        self._records = grain.sources.ArrayRecordDataSource(files) if files else []
        if len(self._records) != m["count"]:
            raise ValueError(f"{cache_dir}: shards hold {len(self._records)} records, manifest "
                             f"count is {m['count']}")
        self._nbytes = int(np.prod(self.record_shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def moments(self, index: int) -> np.ndarray:
        raw = self._records[int(index)]
        if len(raw) != self._nbytes:
            raise ValueError(f"record {index} has {len(raw)} bytes, expected {self._nbytes} "
                             f"({self.record_shape} {self.dtype})")
        return np.frombuffer(raw, self.dtype).reshape(self.record_shape).astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"moments": self.moments(index), "label": np.int32(self.labels[int(index)])}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"CachedLatentSource({m['tokenizer']}, {m['image_size']}px, {len(self)} images, "
                f"record {self.record_shape} {m['dtype']})")


def sample_tokens(example: dict, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """{'moments' [2, K, h, w, C], 'label'} -> {'tokens' [h*w, C], 'label'} (random flip/noise)."""
    m = example["moments"][int(rng.integers(2))]
    noise = rng.standard_normal(m.shape[1:], dtype=np.float32) if m.shape[0] == 2 else None
    return {"tokens": moments_to_tokens_np(m, scale, noise), "label": np.int32(example["label"])}


def cache_dir_of(config) -> str:
    d = config.data.get("cache_dir", "") or config.data.get("path", "")
    if not d:
        raise ValueError("data.source='cached' needs config.data.cache_dir (or data.path) set to "
                         "the latent cache directory")
    return d


def make_source(config, split: str = "train") -> CachedLatentSource:
    """Pipeline plugin; checks the cache matches ``config.tokenizer`` and image size."""
    if split != "train":
        raise ValueError(f"latent caches hold the training split; got split={split!r}")
    src = CachedLatentSource(cache_dir_of(config))
    m = src.manifest
    if m["tokenizer"] != config.tokenizer.name:
        raise ValueError(f"cache {cache_dir_of(config)!r} was made with tokenizer "
                         f"{m['tokenizer']!r}, but config.tokenizer.name={config.tokenizer.name!r}")
    if int(m["image_size"]) != int(config.data.image_size):
        raise ValueError(f"cache {cache_dir_of(config)!r} holds {m['image_size']}px images, but "
                         f"config.data.image_size={config.data.image_size}")
    return src


def random_transform(config, split: str = "train") -> Callable:
    """Pipeline plugin: image/flip choice, posterior sample, scaling by ``tokenizer.scale``."""
    del split
    return functools.partial(sample_tokens, scale=float(config.tokenizer.scale))
