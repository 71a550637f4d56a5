"""The NFE-vs-quality sweep on the embedded digits default, scored by the digits classifier.

Why: the Inception sweep needs ImageNet-scale weights and references, which a new user does
not have. On ``configs/digits.py`` the same grid (``emigm_jax.evaluation.sweep``) runs with
``emigm_jax.data.digits_metric`` instead: each point samples ``sweep.num_images`` digits
(0 -> ``sample.num_images``; class-major, the same count per class) and reports the
classifier's class accuracy and the Frechet distance in its feature space (FD), so a real
quality-vs-NFE curve appears in minutes on a CPU:

    python -m emigm_jax.main --mode=sweep --config=configs/digits.py --workdir=runs/digits \
        --config.sweep.num_iters='(1, 2, 4, 8, 16)' --config.sweep.cfg_scales='(1.0, 3.0)'

Labels, batches and the key (``jax.random.key(seed + 1)`` folded with the batch offset)
are the training job's final report's, so the point with the config's own sample settings
reproduces ``metrics.json``. Timing separates the sampler's compile (``compile_seconds``,
once per point: every num_iter is a new program) from sampling (``seconds_per_image``).
"""
from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from emigm_jax.evaluation.sweep import (Metric, finish, grid_points, params_fingerprint, run_grid,
                                        sweep_settings)

METRIC_COLUMNS = ("class_accuracy", "fd")
PLOTS = (Metric("fd", "digits FD (classifier features)", False),
         Metric("class_accuracy", "class accuracy", True))


def digits_labels(num_images: int) -> np.ndarray:
    """int32 [10 * ceil(num_images / 10)]: class-major, the same count for every class."""
    from emigm_jax.data.digits import NUM_CLASSES  # pylint: disable=import-outside-toplevel
    if num_images < 1:
        raise ValueError(f"digits sweep num_images={num_images}: expected >= 1")
    per_class = -(-num_images // NUM_CLASSES)
    return np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)


def sample_digits(params, labels: np.ndarray, config, mesh, seed: int
                  ) -> tuple[np.ndarray, dict]:
    """Tokens [K, N, C] for labels [K] in padded batches of sample.batch_size on the mesh.

    Returns (tokens, info) with info: nfe (the sampler's count), compile_seconds,
    sample_seconds (compile excluded).
    """
    from emigm_jax import sampling  # pylint: disable=import-outside-toplevel
    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    from emigm_jax.evaluation.evaluate import sample_batch_size  # pylint: disable=import-outside-toplevel

    labels = np.asarray(labels, np.int32)
    bs = sample_batch_size(config, mesh)
    sampler = sampling.make_sampler(config)
    rng = jax.random.key(seed)
    compiled, t_compile, t_sample, nfe, out = None, 0.0, 0.0, None, []
    for start in range(0, len(labels), bs):
        chunk = labels[start:start + bs]
        pad = np.concatenate([chunk, np.zeros(bs - len(chunk), np.int32)])
        glabels = jax.make_array_from_callback(pad.shape, shd.batch_sharding(mesh),
                                               lambda idx, pad=pad: pad[idx])
        key = jax.random.fold_in(rng, start)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = sampler.lower(params, glabels, key).compile()
            t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        tokens, info = compiled(params, glabels, key)
        tokens = jax.block_until_ready(tokens)
        t_sample += time.perf_counter() - t0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        out.append(np.asarray(tokens)[:len(chunk)])
        nfe = int(jax.device_get(info["nfe"]))
    return np.concatenate(out), {"nfe": nfe, "compile_seconds": t_compile,
                                 "sample_seconds": t_sample}


def digits_sweep(config, params, workdir: str, mesh) -> dict:
    """Runs the sweep grid with the digits classifier's scores; see the module docstring."""
    from emigm_jax.data import digits_metric  # pylint: disable=import-outside-toplevel
    from emigm_jax.data.digits import tokenizer_from_config  # pylint: disable=import-outside-toplevel
    from emigm_jax.sampling import expected_nfe  # pylint: disable=import-outside-toplevel

    sw = sweep_settings(config)
    sw["num_images"] = int(sw["num_images"] or config.sample.num_images)
    labels = digits_labels(sw["num_images"])
    k = len(labels)
    tok = tokenizer_from_config(config)
    seed = int(config.seed) + 1
    test_fraction = float(config.data.get("test_fraction", 0.2))
    split_seed = int(config.data.get("split_seed", 0))
    reference = {}

    def run_point(cfg, point):  # pylint: disable=unused-argument
        tokens, info = sample_digits(params, labels, cfg, mesh, seed)
        scores = digits_metric.score_samples(tok.decode(tokens), labels,
                                             test_fraction=test_fraction, split_seed=split_seed)
        return {
            "nfe": info["nfe"], "nfe_expected": expected_nfe(cfg.sample),
            "class_accuracy": scores["sample_class_accuracy"], "fd": scores["sample_fd"],
            "real_class_accuracy": scores["real_class_accuracy"], "real_fd": scores["real_fd"],
            "per_class_accuracy": scores["per_class_accuracy"],
            "compile_seconds": info["compile_seconds"],
            "sample_seconds": info["sample_seconds"],
            "seconds_per_image": info["sample_seconds"] / k,
        }

    key_base = {"scorer": "digits_classifier", "num_images": k, "seed": seed,
                "split": [test_fraction, split_seed], "params": params_fingerprint(params)}
    rows = run_grid(config, grid_points(sw), os.path.join(workdir, sw["out_dir"]), key_base,
                    run_point)
    bad = [(r.get("preset", ""), r["num_iter"]) for r in rows
           if "nfe" in r and r["nfe"] != r["nfe_expected"]]
    if bad:  # the scan's own count disagreeing with the host plan is a sampler bug
        logging.warning("digits sweep: measured NFE != expected_nfe at (preset, num_iter) %s", bad)
    for r in rows:
        if "real_fd" in r:
            reference = {"fd": r["real_fd"], "class_accuracy": r["real_class_accuracy"]}
            break
    notes = []
    if reference:
        notes.append(f"Real data ({k} images): class accuracy {reference['class_accuracy']:.3f} "
                     f"(classifier on the held-out split), FD {reference['fd']:.3f} (train "
                     f"subsample vs held-out split). {k} samples per point "
                     f"({k // 10} per class); FD against the held-out split.")
    return finish(rows, workdir, sw, metric_columns=METRIC_COLUMNS, plots=PLOTS,
                  title=f"{config.get('name', 'digits')}: classifier FD and class accuracy vs "
                        f"NFE ({k} samples per point)",
                  notes=notes, references=reference, extra={"reference": reference})
