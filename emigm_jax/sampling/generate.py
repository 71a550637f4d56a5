"""The one generation loop: labels -> sampled tokens in padded, sharded batches.

Used by the digits report, evaluation and the sweep, so that every job pads, shards, keys
and times its batches the same way: batch ``start`` uses ``fold_in(key(seed), start)``, so
a run that resumes at a batch boundary draws exactly what an uninterrupted run would have
drawn. A tqdm bar shows images/s and the time left.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from emigm_jax import sharding as shd
from emigm_jax.sampling import ar, ar_prefix
from emigm_jax.sampling.sampler import make_sampler


@dataclasses.dataclass
class GeneratedBatch:
    """One batch of the loop: rows [0, count) of ``tokens`` are labels[start:start + count]."""
    start: int
    count: int
    tokens: jax.Array      # [bs, N, C] or [bs, N], sharded over the mesh; padded rows last
    nfe: int               # forward passes per image (the sampler's own count)


@dataclasses.dataclass
class GenerationTimes:
    """Wall time of the loop, compile excluded from ``sample_seconds``."""
    compile_seconds: float = 0.0
    sample_seconds: float = 0.0


def sample_batch_size(config, mesh) -> int:
    """sample.batch_size rounded down to a multiple of the device count (at least one each)."""
    n_dev = mesh.devices.size
    bs = int(config.sample.batch_size)
    return max(n_dev, bs - bs % n_dev)


def sampler_for(config):
    """The jitted ``(params, labels, rng)`` sampler of a config: the masked sampler, the AR
    sampler (``model.arch='ar'``), or MaskGIL's AR prefix (``sample.ar_prefix`` > 0; then
    ``params`` is ``{'masked': ..., 'ar': ...}``, see ``main.sampling_params``)."""
    if config.model.arch == "ar":
        return ar.make_ar_sampler(config)
    if ar_prefix.prefix_length(config) > 0:
        return ar_prefix.make_prefix_sampler(
            config, ar_prefix.load_ar_config(config.sample.ar_workdir))
    return make_sampler(config)


def generate_batches(params, labels: np.ndarray, config, mesh, seed: int, *, start: int = 0,
                     times: GenerationTimes | None = None, progress: bool = True,
                     desc: str = "sampling") -> Iterator[GeneratedBatch]:
    """Samples labels[start:] [K] batch by batch (``start`` must be a batch boundary).

    The sampler is compiled once, before the first batch (timed apart in ``times``).
    """
    labels = np.asarray(labels, np.int32)
    bs = sample_batch_size(config, mesh)
    if start % bs:
        raise ValueError(f"generation start={start} is not a multiple of the batch size {bs}")
    times = times if times is not None else GenerationTimes()
    sampler, compiled, rng = sampler_for(config), None, jax.random.key(seed)
    bar = tqdm(total=len(labels), initial=start, unit="img", desc=desc, dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0, mininterval=1.0)
    for first in range(start, len(labels), bs):
        chunk = labels[first:first + bs]
        pad = np.concatenate([chunk, np.zeros(bs - len(chunk), np.int32)])
        glabels = jax.make_array_from_callback(pad.shape, shd.batch_sharding(mesh),
                                               lambda idx, pad=pad: pad[idx])
        key = jax.random.fold_in(rng, first)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = sampler.lower(params, glabels, key).compile()
            times.compile_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens, info = compiled(params, glabels, key)
        tokens = jax.block_until_ready(tokens)
        times.sample_seconds += time.perf_counter() - t0
        bar.update(len(chunk))
        yield GeneratedBatch(first, len(chunk), tokens, int(jax.device_get(info["nfe"])))
    bar.close()


def generate(params, labels: np.ndarray, config, mesh, seed: int, **kw
             ) -> tuple[np.ndarray, int, GenerationTimes]:
    """(tokens [K, ...] numpy, NFE per image, times) for labels [K]; see ``generate_batches``."""
    times = GenerationTimes()
    out, nfe = [], None
    for batch in generate_batches(params, labels, config, mesh, seed, times=times, **kw):
        out.append(shd.to_host(batch.tokens)[:batch.count])
        nfe = batch.nfe
    return np.concatenate(out), nfe, times
