"""The digits job's scores and files: samples.npz, samples.png and metrics.json.

Why here and not in the CLI: the same sampling and scoring run after training, in
``--mode=sample`` / ``evaluate`` and (as preview grids) during training, and they belong
with the other scorers. Images are the pixel tokens decoded to 0..16, one row per class.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from PIL import Image

from emigm_jax.data.digits import NUM_CLASSES, PIXEL_MAX, digits_split, digits_tokenizer
from emigm_jax.evaluation import digits_metric
from emigm_jax.sampling.generate import generate


def digits_grid(images, rows: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """[rows*cols, H, W] in 0..16 -> uint8 grid, one row per class, nearest upscaling."""
    images = np.asarray(images, np.float32)
    k, h, w = images.shape
    cols = k // rows
    img = np.clip(images[:rows * cols] / PIXEL_MAX * 255.0, 0, 255).astype(np.uint8)
    img = img.repeat(scale, 1).repeat(scale, 2).reshape(rows, cols, h * scale, w * scale)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = np.full((rows * cell_h + pad, cols * cell_w + pad), 64, np.uint8)
    for r in range(rows):
        for c in range(cols):
            grid[pad + r * cell_h: pad + r * cell_h + h * scale,
                 pad + c * cell_w: pad + c * cell_w + w * scale] = img[r, c]
    return grid


def class_major_rows(images, per_class: int, cols: int) -> np.ndarray:
    """The first ``cols`` images of each class from class-major ``images`` [10 * per_class]."""
    return np.concatenate([images[c * per_class: c * per_class + cols]
                           for c in range(NUM_CLASSES)])


def digits_sample_fn(config, mesh, per_class: int | None = None):
    """Periodic training samples (EMA weights): a grid and the samples' class accuracy.

    Uses ``sample.num_images`` samples by default (one padded batch of ``sample.batch_size``
    costs the same whatever the count, and reuses the final report's compiled sampler).
    """
    tok = digits_tokenizer(config)
    per_class = per_class or max(10, int(config.sample.num_images) // NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    clf = digits_metric.fit_classifier(*digits_split(config))

    def fn(state, step):
        tokens, _, _ = generate(state.ema_params, labels, config, mesh, seed=int(step),
                                progress=False)
        images = tok.decode(tokens)
        return {"image": digits_grid(class_major_rows(images, per_class, 10), NUM_CLASSES),
                "class_accuracy": clf.accuracy(images, labels)}
    return fn


def write_digits_files(workdir: str, images, labels, tokens, per_class: int,
                       metrics: dict) -> None:
    """samples.npz (images, labels, tokens), samples.png (<= 10 per class), metrics.json."""
    np.savez(os.path.join(workdir, "samples.npz"), images=images.astype(np.float32),
             labels=labels, tokens=np.asarray(tokens))
    shown = class_major_rows(images, per_class, min(per_class, 10))
    Image.fromarray(digits_grid(shown, NUM_CLASSES)).save(os.path.join(workdir, "samples.png"))
    with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)


def digits_report(config, params, workdir: str, mesh, *, train_steps: int,
                  train_seconds: float) -> dict:
    """Samples ``sample.num_images`` digits (>= 50 per class), scores them, writes the files."""
    per_class = max(50, int(config.sample.num_images) // NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
    t0 = time.perf_counter()
    tokens, nfe, _ = generate(params, labels, config, mesh, seed=int(config.seed) + 1)
    sample_seconds = time.perf_counter() - t0
    images = digits_tokenizer(config).decode(tokens)  # [K, 8, 8] in 0..16
    test_fraction, split_seed = digits_split(config)
    scores = digits_metric.score_samples(images, labels, test_fraction=test_fraction,
                                         split_seed=split_seed)
    metrics = {k: scores[k] for k in ("sample_class_accuracy", "sample_fd",
                                      "real_class_accuracy", "real_fd")}
    metrics.update({
        "nfe": nfe, "train_steps": int(train_steps), "train_seconds": float(train_seconds),
        "sample_seconds": float(sample_seconds), "num_samples": int(len(labels)),
        "per_class_accuracy": scores["per_class_accuracy"],
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    })
    if jax.process_index() == 0:
        write_digits_files(workdir, images, labels, tokens, per_class, metrics)
        print(f"\ndigits ({len(labels)} samples, NFE {nfe}, {train_steps} train steps in "
              f"{train_seconds:.0f}s):\n"
              f"  class accuracy  samples {metrics['sample_class_accuracy']:.3f}   "
              f"real held-out {metrics['real_class_accuracy']:.3f}\n"
              f"  Frechet dist.   samples {metrics['sample_fd']:.3f}   "
              f"real train-vs-held-out {metrics['real_fd']:.3f}\n"
              f"  wrote {workdir}/metrics.json, samples.npz, samples.png", flush=True)
    return metrics
