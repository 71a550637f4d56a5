"""Generic grain input pipeline: seeded shuffle, repeat, per-process sharding, batching.

Every data source (the embedded digits, image folders, TFDS, cached latents) is a finite,
random-access, unshuffled sequence of example dicts; this module turns it into the infinite
stream of host-local batches the train loop consumes, with an iterator whose state Orbax
saves next to the model (``grain.checkpoint.CheckpointSave``).

Order of operations, and why:

  source -> shuffle(seed) -> repeat (reshuffled every epoch) -> random transform (seeded by
  the *global* element index) -> process shard -> batch(local) -> iterator

Sharding is by global-batch blocks: process p of P reads rows [p*b, (p+1)*b) of every
global batch of B = P*b examples. The global batch (which examples, in which row, with which
augmentation draws) is therefore the same for any number of processes, so a 2-process run
computes exactly what a 1-process run computes (tested), and each host reads only its share.
The iterator state is just the next local index, so saving and restoring it is exact.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from emigm_jax.data import digits

SOURCES = ("digits", "folder", "tfds", "cached")
# Where the non-embedded sources live (written alongside this module). Each module provides
#   make_source(config, split) -> random-access source or grain.MapDataset of example dicts
# and may provide
#   random_transform(config, split) -> None | fn(example, np.random.Generator) -> example
_SOURCE_MODULES = {
    "folder": "emigm_jax.data.sources",
    "tfds": "emigm_jax.data.sources",
    "cached": "emigm_jax.data.latent_dataset",
}

RandomTransform = Callable[[Any, np.random.Generator], Any]


class GlobalBatchShard(grain.MapDataset):
    """Process p's view of a global stream: local index j -> global index of its batch block.

    With global batch B = b * P, local element j belongs to local batch j // b, row j % b;
    it is global element (j // b) * B + p * b + (j % b).
    """

    def __init__(self, parent: grain.MapDataset, *, local_batch: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        if local_batch <= 0:
            raise ValueError(f"local batch size must be > 0, got {local_batch}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self._b, self._p, self._n = local_batch, process_index, process_count
        self._len = len(parent) // process_count

    def __len__(self) -> int:
        return self._len

    def _global_index(self, index: int) -> int:
        batch, row = divmod(index, self._b)
        return batch * self._b * self._n + self._p * self._b + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._global_index(i) for i in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"GlobalBatchShard(local_batch={self._b}, process={self._p}/{self._n})"


def build_dataset(source, *, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True, repeat: bool = True,
                  random_transform: RandomTransform | None = None,
                  transform: Callable[[Any], Any] | None = None,
                  drop_remainder: bool = True) -> grain.MapDataset:
    """Host-local batches of a source as a grain MapDataset (random access by batch index).

    Args:
      source: finite random-access sequence (or grain.MapDataset) of example pytrees.
      global_batch: examples per step over all processes; must divide by ``process_count``.
      seed: shuffle and random-transform seed (same on every process).
      random_transform: ``fn(example, rng)``, seeded by the global element index, so it is
        reproducible on resume and identical for any process count.
      transform: deterministic per-example ``fn(example)``, applied after the shard.
      drop_remainder: only for ``repeat=False`` (evaluation): keep a short last batch.
    Returns:
      grain.MapDataset whose element i is process ``process_index``'s i-th batch, a pytree of
      arrays with leading dim ``global_batch // process_count``.
    """
    if global_batch % process_count:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the number of processes "
            f"{process_count}")
    if len(source) == 0:
        raise ValueError(f"data source {source!r} is empty")
    local_batch = global_batch // process_count
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat(None)
    elif len(ds) < global_batch and drop_remainder:
        raise ValueError(f"data source has {len(ds)} examples, fewer than one global batch "
                         f"of {global_batch}")
    if random_transform is not None:
        ds = ds.random_map(random_transform)
    if process_count > 1:
        ds = GlobalBatchShard(ds, local_batch=local_batch, process_index=process_index,
                              process_count=process_count)
    if transform is not None:
        ds = ds.map(transform)
    return ds.batch(local_batch, drop_remainder=drop_remainder)


def to_iterator(ds: grain.MapDataset, *, num_threads: int = 0,
                prefetch: int = 2, num_workers: int = 0) -> grain.DatasetIterator:
    """A checkpointable iterator over a batched MapDataset.

    ``num_workers > 0`` reads in that many worker processes (``mp_prefetch``; for decoding
    images); otherwise ``num_threads`` reader threads in this process (0 = read on demand,
    best for in-memory sources, which gains nothing from threads under the GIL).
    """
    if num_workers < 0 or num_threads < 0:
        raise ValueError(f"num_workers={num_workers} and num_threads={num_threads} must be >= 0")
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch if num_threads else 0))
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


def _plugin(name: str):
    module_name = _SOURCE_MODULES[name]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"data.source={name!r} needs {module_name} ({e})") from e


def make_source(config, split: str = "train"):
    """The finite example source for ``config.data.source`` and a split ('train'|'test')."""
    name = config.data.source
    if name not in SOURCES:
        raise ValueError(f"config.data.source={name!r} is invalid: expected one of {SOURCES}")
    if name == "digits":
        return digits.digits_source(config, split)
    return _plugin(name).make_source(config, split)


def make_random_transform(config, split: str = "train") -> RandomTransform | None:
    """Per-example random augmentation of the source (None for digits)."""
    name = config.data.source
    if name == "digits":
        return None
    fn = getattr(_plugin(name), "random_transform", None)
    return fn(config, split) if fn is not None else None


def make_train_iterator(config, *, process_index: int | None = None,
                        process_count: int | None = None):
    """(iterator, num_train_examples) for training on the current process."""
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    source = make_source(config, "train")
    ds = build_dataset(
        source, global_batch=int(config.train.batch_size),
        seed=int(config.data.get("seed", config.seed)), process_index=process_index,
        process_count=process_count, random_transform=make_random_transform(config, "train"))
    in_memory = config.data.source == "digits"
    workers = 0 if in_memory else int(config.data.get("num_workers", 0))
    it = to_iterator(ds, num_threads=0 if in_memory else 16, num_workers=workers)
    logging.info("train data: %s, %d examples, %d processes", config.data.source,
                 len(source), process_count)
    return it, len(source)
