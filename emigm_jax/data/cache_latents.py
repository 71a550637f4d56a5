r"""Encode an image dataset once into tokenizer "moments" (image and its flip), ArrayRecord shards.

  python -m emigm_jax.data.cache_latents --config=configs/emigm_b_256.py \
      --config.data.path=/data/imagenet --config.tokenizer.path=/ckpt/kl16.ckpt \
      --cache_dir=/data/imagenet_kl16_256 [--source=folder|tfds] [--labels=labels.txt]

What is stored: per image, an array [2, K, h, w, C] — index 0 the image,
1 its horizontal flip; K = 2 (posterior mean, clamped log-variance) for KL-16, K = 1 (the
latent) for the deterministic DC-AE. No scale factor is applied: training multiplies by
``tokenizer.scale`` (`emigm_jax.data.latent_dataset`).

Layout of ``cache_dir``:
  cache_settings.json                    what the cache is for (checked on restart)
  latents-00003-of-01252.array_record    raw little-endian records of ``dtype``
  shard-00003-of-01252.json              labels, file names, skipped files; written last,
                                         so its presence marks the shard finished
  labels.npy, manifest.json              written when every shard is done (manifest last)

Images are split into fixed shards of ``--shard_size`` consecutive files; shard s goes to
process s mod P, and each process encodes its shards with a jit-compiled step whose batch is
sharded over its local devices (no cross-process collectives, so processes never wait on each
other until the final barrier; multi-host runs pass ``--distributed`` and need ``cache_dir``
on a filesystem all hosts share). A rerun skips finished shards; each shard's files are written
under a temporary name and renamed, so an interrupted run never leaves a half shard that
looks finished. Corrupt or non-image files are logged with their path, skipped, counted per
shard and in the manifest, and the total is printed at the end.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import ml_dtypes
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
from tqdm import tqdm

from emigm_jax.convert.tokenizers import tokenizer_from_config
from emigm_jax.data import sources
from emigm_jax.tokenizers import build_tokenizer

MANIFEST = "manifest.json"
SETTINGS = "cache_settings.json"
FORMAT_VERSION = 1
STORAGE_DTYPES = ("float32", "bfloat16", "float16")


def storage_dtype(name: str) -> np.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"cache dtype {name!r}: expected one of {STORAGE_DTYPES}")
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def shard_names(s: int, n: int) -> tuple[str, str]:
    return f"latents-{s:05d}-of-{n:05d}.array_record", f"shard-{s:05d}-of-{n:05d}.json"


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_array_record(path: str, records: np.ndarray) -> None:
    """One record per leading-axis entry (raw bytes), atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for r in records:
        writer.write(np.ascontiguousarray(r).tobytes())
    writer.close()
    os.replace(tmp, path)


def _num_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


def shard_done(cache_dir: str, s: int, n: int) -> dict | None:
    """The shard's metadata if it is complete (marker present, record count right)."""
    rec, meta = (os.path.join(cache_dir, f) for f in shard_names(s, n))
    if not (os.path.isfile(meta) and os.path.isfile(rec)):
        return None
    info = _read_json(meta)
    if _num_records(rec) != info["count"]:
        logging.warning("shard %d: %s has %d records, metadata says %d; redoing it", s, rec,
                        _num_records(rec), info["count"])
        return None
    return info


def make_encode_fn(tok, variables, out_dtype: np.dtype, mesh: jax.sharding.Mesh):
    """jit: uint8 [B, S, S, 3] -> [B, 2, K, h, w, C] (image, flip) in ``out_dtype``."""
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def encode(variables, images):
        x = images.astype(jnp.float32) / 255.0
        x = (x - 0.5) / 0.5
        b = x.shape[0]
        both = jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)       # [2B, S, S, 3]
        m = tok.encode_moments(variables, both)                      # [2B, K, h, w, C]
        m = m.reshape(2, b, *m.shape[1:]).swapaxes(0, 1)              # [B, 2, K, h, w, C]
        return m.astype(out_dtype)

    fn = jax.jit(encode, in_shardings=(repl, data), out_shardings=data)
    return fn, jax.device_put(variables, repl)


def _settings(config, tok, n_files: int, shard_size: int, dtype: str, source: str, split: str,
              record_shape) -> dict:
    t = config.tokenizer
    weights = t.get("path", "") or f"random_init(seed={int(t.get('seed', 0))})"
    return dict(format_version=FORMAT_VERSION, tokenizer=tok.name, tokenizer_weights=weights,
                tokenizer_arch=json.loads(json.dumps(tok.arch.__dict__)),  # tuples as lists
                image_size=int(config.data.image_size),
                dtype=dtype, num_files=n_files, shard_size=shard_size, source=source, split=split,
                record_shape=list(record_shape), num_moments=tok.num_moments)


def cache_latents(config, cache_dir: str, *, labels_file: str | None = None,
                  source: str | None = None, split: str = "train", per_device_batch: int = 32,
                  shard_size: int = 1024, dtype: str = "float32", num_threads: int = 16,
                  max_images: int | None = None, records=None, variables=None) -> dict | None:
    """Encodes ``config``'s image dataset into ``cache_dir``; returns the manifest (process 0).

    ``records``/``variables`` inject a record source / tokenizer weights (tests).
    """
    if per_device_batch <= 0 or shard_size <= 0:
        raise ValueError(f"batch size {per_device_batch} and shard size {shard_size} must be > 0")
    out_dtype = storage_dtype(dtype)
    image_size = int(config.data.image_size)
    if source is None:
        source = config.data.source if config.data.source in ("folder", "tfds") else "folder"
    if records is None:
        records = sources.make_records(config, split, labels_file=labels_file, source=source)
    if variables is None:
        tok, variables = tokenizer_from_config(config)
    else:
        t = config.tokenizer
        tok = build_tokenizer(t.name, scale=t.get("scale", None), arch=t.get("arch", None))
    h, w, c = tok.latent_shape(image_size)
    record_shape = (2, tok.num_moments, h, w, c)

    n = len(records) if not max_images or max_images < 0 else min(len(records), int(max_images))
    num_shards = math.ceil(n / shard_size)
    pid, nproc = jax.process_index(), jax.process_count()
    os.makedirs(cache_dir, exist_ok=True)

    settings = _settings(config, tok, n, shard_size, dtype, source, split, record_shape)
    _check_or_write_settings(cache_dir, settings)

    mine = [s for s in range(num_shards) if s % nproc == pid]
    pending = [s for s in mine if shard_done(cache_dir, s, num_shards) is None]
    logging.info("process %d/%d: %d shards of %d, %d already done, %d to encode", pid, nproc,
                 len(mine), num_shards, len(mine) - len(pending), len(pending))
    print(f"caching {n} images into {num_shards} shards: {len(mine) - len(pending)} of this "
          f"process's {len(mine)} shards already done", flush=True)

    if pending:
        _encode_pending(pending, records, tok, variables, cache_dir, num_shards, n, shard_size,
                        per_device_batch, num_threads, out_dtype, image_size, record_shape)

    if nproc > 1:
        multihost_utils.sync_global_devices("emigm_cache_latents_done")
    if pid != 0:
        return None
    return write_manifest(cache_dir, settings, num_shards, tok, records)


def _check_or_write_settings(cache_dir: str, settings: dict) -> None:
    """A cache is only extended with the settings it was started with."""
    spath = os.path.join(cache_dir, SETTINGS)
    if not os.path.isfile(spath):
        _write_json(spath, settings)
        return
    old = _read_json(spath)
    if old != settings:
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        raise ValueError(f"{cache_dir!r} holds a cache made with different settings "
                         f"(existing, requested): {diff}; use another --cache_dir")


def _encode_pending(pending, records, tok, variables, cache_dir: str, num_shards: int, n: int,
                    shard_size: int, per_device_batch: int, num_threads: int, out_dtype,
                    image_size: int, record_shape) -> None:
    """Encodes and writes the ``pending`` shards of this process on its local devices."""
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
    batch = per_device_batch * len(jax.local_devices())
    encode, variables = make_encode_fn(tok, variables, out_dtype, mesh)
    print(f"encoding on {len(jax.local_devices())} local devices "
          f"({jax.local_devices()[0].platform}), {batch} images (+ flips) per step", flush=True)
    indices = [i for s in pending for i in range(s * shard_size, min((s + 1) * shard_size, n))]
    decoded = iter(
        grain.MapDataset.source(indices)
        .map(lambda i: sources.decode_record(records, i, image_size))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=max(2 * batch, 64))))
    bar = tqdm(total=len(indices), unit="img", desc="encoding",
               disable=jax.process_index() != 0)
    for s in pending:
        lo, hi = s * shard_size, min((s + 1) * shard_size, n)
        latents, labels, names, skipped = _encode_shard(
            decoded, hi - lo, encode, variables, batch, image_size, record_shape, out_dtype, bar)
        rec, meta = (os.path.join(cache_dir, f) for f in shard_names(s, num_shards))
        write_array_record(rec, latents)
        _write_json(meta, dict(shard=s, count=len(labels), first_index=lo, last_index=hi,
                               labels=labels, names=names, skipped=skipped))
    bar.close()


def _encode_shard(decoded, count: int, encode, variables, batch: int, image_size: int,
                  record_shape, out_dtype, bar):
    """Consumes ``count`` decoded records; returns (latents, labels, names, skipped)."""
    labels, names, skipped, outs, buf = [], [], [], [], []

    def flush():
        if buf:
            arr = np.zeros((batch, image_size, image_size, 3), np.uint8)  # padded last batch
            arr[:len(buf)] = np.stack(buf)
            outs.append((encode(variables, arr), len(buf)))  # async dispatch
            buf.clear()

    for _ in range(count):
        d = next(decoded)
        bar.update(1)
        if d.image is None:
            print(f"skipping unreadable file {d.name}: {d.error}", flush=True)
            skipped.append({"name": d.name, "error": d.error})
            continue
        buf.append(d.image)
        labels.append(d.label)
        names.append(d.name)
        if len(buf) == batch:
            flush()
    flush()
    latents = (np.concatenate([np.asarray(o)[:k] for o, k in outs]) if outs
               else np.zeros((0, *record_shape), out_dtype))
    return latents, labels, names, skipped


def write_manifest(cache_dir: str, settings: dict, num_shards: int, tok, records) -> dict:
    shards, labels, skipped = [], [], []
    for s in range(num_shards):
        info = shard_done(cache_dir, s, num_shards)
        if info is None:
            raise RuntimeError(f"shard {s} of {cache_dir!r} is not finished; rerun the command")
        rec, meta = shard_names(s, num_shards)
        shards.append(dict(file=rec, meta=meta, count=info["count"], skipped=len(info["skipped"])))
        labels.extend(info["labels"])
        skipped.extend(info["skipped"])
    labels = np.asarray(labels, np.int32)
    _atomic_write(os.path.join(cache_dir, "labels.npy"), _npy_bytes(labels))
    manifest = dict(settings, count=int(labels.size), tokenizer_scale=tok.scale,
                    stochastic=tok.stochastic, latent_shape=settings["record_shape"][2:],
                    num_classes=int(labels.max()) + 1 if labels.size else 0,
                    class_to_label=getattr(records, "class_to_label", None),
                    labels_file="labels.npy", shards=shards, num_skipped=len(skipped),
                    skipped_files=skipped)
    _write_json(os.path.join(cache_dir, MANIFEST), manifest)
    msg = f"cached {manifest['count']} images in {num_shards} shards to {cache_dir}"
    print(msg + f"; skipped {len(skipped)} unreadable files"
          + (": " + ", ".join(x["name"] for x in skipped[:20]) if skipped else ""), flush=True)
    return manifest


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if f.distributed:
        jax.distributed.initialize()
    start = time.time()
    cache_latents(f.config, f.cache_dir, labels_file=f.labels, source=f.source, split=f.split,
                  per_device_batch=f.batch_size, shard_size=f.shard_size, dtype=f.dtype,
                  num_threads=f.num_threads, max_images=f.max_images)
    print(f"done in {time.time() - start:.1f}s", flush=True)


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "training config file (data.*, tokenizer.*)",
                                    lock_config=False)
    flags.DEFINE_string("cache_dir", None, "output directory of the latent cache")
    flags.DEFINE_string("labels", None, "labels file for an image folder (class dir [label] per line)")
    flags.DEFINE_enum("source", None, ["folder", "tfds"], "image source (default: config.data.source "
                      "if folder/tfds, else folder)")
    flags.DEFINE_string("split", "train", "dataset split")
    flags.DEFINE_integer("batch_size", 32, "images per device per step")
    flags.DEFINE_integer("shard_size", 1024, "images per output shard")
    flags.DEFINE_enum("dtype", "float32", list(STORAGE_DTYPES), "storage dtype of the moments")
    flags.DEFINE_integer("num_threads", 16, "image decoding threads per process")
    flags.DEFINE_integer("max_images", -1, "encode only the first N files (-1: all)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
    flags.mark_flags_as_required(["config", "cache_dir"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
