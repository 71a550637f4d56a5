"""Sample-and-evaluate (`python -m emigm_jax.main --mode=evaluate ...`).

Streams the whole pipeline per batch on the device mesh — mask-prediction sampler, tokenizer
decode, uint8 quantisation, Inception — and only moves Inception outputs to the host, where
running float64 Gaussians (pool3, spatial), pool3 features (precision/recall) and logits (IS)
are accumulated. 50K samples never sit in memory as images unless `eval.save_npz` asks for the
ADM-format sample batch (arr_0 uint8, arr_1 labels), which the official ADM evaluator reads.

Labels: `num_images` class-balanced labels (50 per class for 50K / 1000 classes, as in the
reference code), in a seeded random order so every Inception Score split sees all classes.

Settings: `config.eval` (fields documented in configs/base.py). When both reference files
are given, `fid` is against the ADM batch and `fid_stats_fid` against the FID-only file
(the reference code's number).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from PIL import Image

from emigm_jax import sharding as shd
from emigm_jax.config_validation import as_dict, merged_section
from emigm_jax.evaluation.inception import INCEPTION_SIZE, make_feature_fn
from emigm_jax.evaluation.metrics import RunningStats, frechet_distance
from emigm_jax.evaluation.reference import (FeatureSummary, compute_metrics,
                                            load_reference_stats, reference_pool_features)
from emigm_jax.evaluation.sweep_grid import params_fingerprint
from emigm_jax.sampling.generate import GenerationTimes, generate_batches, sample_batch_size
from emigm_jax.convert.tokenizers import tokenizer_from_config

EVAL_DEFAULTS = dict(inception_path="", reference_path="", fid_stats_path="", preprocess="adm",
                     num_images=0, cache_dir="", save_npz=False, inception_size=INCEPTION_SIZE,
                     preview=64, partial_every_s=300.0)


def eval_settings(config) -> dict:
    """config.eval over EVAL_DEFAULTS, checked."""
    s = merged_section(config, "eval", EVAL_DEFAULTS)
    if not s["num_images"]:
        s["num_images"] = int(config.sample.num_images)
    if s["preprocess"] not in ("adm", "pytorch_fid"):
        raise ValueError(f"config.eval.preprocess={s['preprocess']!r}: expected 'adm' or "
                         "'pytorch_fid'")
    return s


def balanced_labels(num_images: int, num_classes: int, seed: int) -> np.ndarray:
    """[num_images] int32: ceil(num_images / C) per class, truncated, in a seeded order."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    per = -(-num_images // num_classes)
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per)[:num_images]
    return labels[np.random.default_rng(seed).permutation(num_images)]


def make_decode_fn(config, mesh) -> Callable:
    """jitted tokens [B, N, C] (code ids [B, N]) -> uint8 images [B, H, W, 3] on the mesh."""
    if int(config.model.patch_size) != 1:
        raise NotImplementedError(f"model.patch_size={config.model.patch_size}: decoding "
                                  "expects one token per latent position (patch_size=1)")
    tok, variables = tokenizer_from_config(config)
    categorical = config.model.head == "categorical"
    if categorical != tok.discrete:
        raise ValueError(f"model.head={config.model.head!r} cannot be decoded by "
                         f"tokenizer.name={config.tokenizer.name!r}: the categorical head needs "
                         "a codebook tokenizer (vq, vq8), the diffusion head a continuous one")
    variables = jax.device_put(variables, shd.replicated(mesh))
    g = int(config.model.image_size) // int(config.model.latent_stride)

    @functools.partial(jax.jit, out_shardings=shd.batch_sharding(mesh))
    def decode(v, tokens):
        x = tok.decode_tokens(v, tokens, grid=(g, g))
        return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    return lambda tokens: decode(variables, tokens)


class _Partial:
    """The accumulators of an evaluation in progress, saved so a preempted 50K-image run
    resumes at its last saved batch instead of starting over.

    Resuming draws exactly the images an uninterrupted run draws (batch keys depend on the
    batch's start only, see ``sampling.generate``), so the finished metrics are the same.
    ``key`` names the settings and weights; a file with another key is not reused.
    """

    def __init__(self, path: str, key: str, every_s: float):
        self.path, self.key, self.every_s = path, key, every_s
        self.last = time.monotonic()

    def load(self) -> dict | None:
        if not self.path or not os.path.exists(self.path):
            return None
        with np.load(self.path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        if str(state.pop("key")) != self.key:
            logging.warning("evaluate: %s holds another evaluation (other settings or "
                            "weights); starting over", self.path)
            return None
        logging.info("evaluate: resuming at image %d from %s", int(state["done"]), self.path)
        return state

    def due(self, final: bool) -> bool:
        """Whether to save now: every ``every_s`` seconds and once the last batch is in."""
        return bool(self.path) and (final or time.monotonic() - self.last >= self.every_s)

    def save(self, state: dict) -> None:
        """Atomically: a reader sees the previous file or this one, never a torn one."""
        if jax.process_index() != 0:
            return
        tmp = f"{self.path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, key=np.asarray(self.key), **state)
        os.replace(tmp, self.path)
        self.last = time.monotonic()


def _stats_arrays(name: str, st: RunningStats) -> dict:
    return {f"{name}_count": np.asarray(st.count), f"{name}_mean": st.mean, f"{name}_m2": st.m2}


def _stats_from(name: str, state: dict) -> RunningStats:
    return RunningStats(int(state[f"{name}_count"]), state[f"{name}_mean"], state[f"{name}_m2"])


def sample_and_summarize(config, params, mesh, *, decode_fn: Callable, feature_fn: Callable,
                         num_images: int, seed: int, keep_images: int = 0,
                         save_all: bool = False, partial_path: str = "", partial_key: str = "",
                         partial_every_s: float = 300.0) -> tuple[FeatureSummary, dict]:
    """Samples `num_images` images and accumulates their Inception features.

    Returns (summary, info) with info: nfe, sample_seconds (sampling and decoding, compile
    excluded; summed over resumed segments), feature_seconds, labels, images (the first
    `keep_images`, uint8 host array; all of them if save_all). With ``partial_path`` the
    accumulators are saved there every ``partial_every_s`` seconds and a run resumes from
    them (see ``_Partial``); ``evaluate`` removes the file once the metrics are written.
    """
    labels = balanced_labels(num_images, int(config.model.num_classes), seed)
    partial = _Partial(partial_path, partial_key, partial_every_s)
    state = partial.load()
    pool = spat = None
    pools, logits, kept = [], [], []
    nfe, t_decode, t_feat, start = None, 0.0, 0.0, 0
    times = GenerationTimes()
    if state is not None:
        pool, spat = _stats_from("pool", state), _stats_from("spatial", state)
        pools, logits = [state["pools"]], [state["logits"]]
        kept = [state["images"]] if len(state["images"]) else []
        nfe, start = int(state["nfe"]), int(state["done"])
        t_decode, t_feat = float(state["sample_seconds"]), float(state["feature_seconds"])
    for batch in generate_batches(params, labels, config, mesh, seed, times=times, start=start,
                                  desc="evaluate"):
        t0 = time.perf_counter()
        images = jax.block_until_ready(decode_fn(batch.tokens))
        t1 = time.perf_counter()
        out = feature_fn(images)
        t_feat += time.perf_counter() - t1
        t_decode += t1 - t0
        nfe, n = batch.nfe, batch.count
        if pool is None:
            pool = RunningStats.create(out["pool"].shape[1])
            spat = RunningStats.create(out["spatial"].shape[1])
        pool, spat = pool.update(out["pool"][:n]), spat.update(out["spatial"][:n])
        pools.append(np.asarray(out["pool"][:n]))
        logits.append(np.asarray(out["logits_unbiased"][:n]))
        if save_all or sum(len(k) for k in kept) < keep_images:
            kept.append(shd.to_host(images)[:n])
        if partial.due(final=batch.start + n >= num_images):
            pools, logits = [np.concatenate(pools)], [np.concatenate(logits)]
            kept = [np.concatenate(kept)] if kept else []
            partial.save({"done": np.asarray(batch.start + n), "nfe": np.asarray(nfe),
                          "sample_seconds": np.asarray(times.sample_seconds + t_decode),
                          "feature_seconds": np.asarray(t_feat), "pools": pools[0],
                          "logits": logits[0],
                          "images": kept[0] if kept else np.zeros((0,), np.uint8),
                          **_stats_arrays("pool", pool), **_stats_arrays("spatial", spat)})
    imgs = np.concatenate(kept) if kept else np.zeros((0,), np.uint8)
    summary = FeatureSummary(pool, spat, np.concatenate(pools), np.concatenate(logits))
    return summary, {"nfe": nfe, "sample_seconds": times.sample_seconds + t_decode,
                     "feature_seconds": t_feat, "labels": labels,
                     "images": imgs if save_all else imgs[:keep_images]}


def reference_metrics(summary: FeatureSummary, settings: dict, feature_fn, tag: str,
                       batch_size: int = 250) -> dict:
    """FID / sFID / IS / precision / recall of ``summary`` against the configured references."""
    ref_path, stats_path = settings["reference_path"], settings["fid_stats_path"]
    ref = load_reference_stats(ref_path) if ref_path else None
    feats = None
    if ref is not None and ref.num_images:
        feats = reference_pool_features(ref_path, feature_fn, batch_size=batch_size,
                                        cache_dir=settings["cache_dir"] or None, tag=tag)
    out = compute_metrics(summary, ref, feats)
    if stats_path:
        st = load_reference_stats(stats_path)
        mu, sigma = summary.pool.finalize()
        fid = frechet_distance(mu, sigma, st.mu, st.sigma)
        out["fid_stats_fid" if ref_path else "fid"] = fid
    if not (ref_path or stats_path):
        logging.warning("evaluate: no config.eval.reference_path / fid_stats_path; only the "
                        "Inception Score is reported")
    return out


def preview_grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """uint8 [K, H, W, 3] -> one uint8 grid image (rows of `cols`)."""
    k, h, w, c = images.shape
    rows = -(-k // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(k):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
    return grid


def run_tag(config, num_images: int) -> str:
    """File name of an evaluation: the headline settings, then a hash of every sample field
    (companion switches, solver, interval...) so that different settings never overwrite."""
    s = config.sample
    fields = as_dict(s)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return (f"n{num_images}_iter{int(s.num_iter)}_{s.head_sampler}_cfg{float(s.cfg_scale):g}"
            f"_{s.cfg_schedule}_{digest[:8]}")


def inception_tag(settings: dict) -> str:
    """Names the Inception setup in cached reference features and sweep point keys."""
    return (f"{os.path.basename(settings['inception_path']) or 'given'}|"
            f"{settings['preprocess']}|{settings['inception_size']}")


def evaluate(config, params, workdir: str, mesh, *, inception_variables: Any) -> dict:
    """Samples, scores and writes `<workdir>/eval/<tag>.json` (+ preview PNG, optional npz).

    inception_variables: the FID Inception's variables (the CLI loads them once from
    ``eval.inception_path`` with ``emigm_jax.convert.inception``).
    """
    settings = eval_settings(config)
    feature_fn = make_feature_fn(inception_variables, preprocess=settings["preprocess"],
                                 image_size=int(settings["inception_size"]), mesh=mesh)
    tag = inception_tag(settings)
    num_images = int(settings["num_images"])
    out_dir, name = os.path.join(workdir, "eval"), run_tag(config, num_images)
    partial_path = os.path.join(out_dir, f"{name}.partial.npz")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
    summary, info = sample_and_summarize(
        config, params, mesh, decode_fn=make_decode_fn(config, mesh), feature_fn=feature_fn,
        num_images=num_images, seed=int(config.seed) + 1, keep_images=int(settings["preview"]),
        save_all=bool(settings["save_npz"]),
        partial_path=partial_path,
        partial_key=f"{name}|{tag}|{params_fingerprint(params)}|seed{int(config.seed)}",
        partial_every_s=float(settings["partial_every_s"]))
    metrics = reference_metrics(summary, settings, feature_fn, tag,
                                 batch_size=sample_batch_size(config, mesh))
    s = config.sample
    metrics.update({
        "nfe": info["nfe"], "num_images": num_images, "num_iter": int(s.num_iter),
        "cfg_scale": float(s.cfg_scale), "head_sampler": str(s.head_sampler),
        "sample_seconds": info["sample_seconds"], "feature_seconds": info["feature_seconds"],
        "seconds_per_image": info["sample_seconds"] / num_images,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    })
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        if len(info["images"]):
            preview = info["images"][:int(settings["preview"])]
            Image.fromarray(preview_grid(preview)).save(os.path.join(out_dir, f"{name}.png"))
        if settings["save_npz"]:
            np.savez(os.path.join(out_dir, f"{name}.npz"), arr_0=info["images"],
                     arr_1=info["labels"])
        print("evaluate: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in metrics.items()), flush=True)
        if os.path.exists(partial_path):
            os.remove(partial_path)
    return metrics
