"""The NFE-vs-quality sweep on the embedded digits default, scored by the digits classifier.

Why: the Inception sweep needs ImageNet-scale weights and references, which a new user does
not have. On ``configs/digits.py`` the same grid (``emigm_jax.evaluation.sweep_grid``) runs with
``emigm_jax.evaluation.digits_metric`` instead: each point samples ``sweep.num_images`` digits
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

import numpy as np

from emigm_jax.data.digits import NUM_CLASSES, digits_tokenizer
from emigm_jax.evaluation import digits_metric
from emigm_jax.data.digits import digits_split
from emigm_jax.evaluation.sweep_grid import (Metric, finish, grid_points, params_fingerprint,
                                             run_grid, sweep_settings)
from emigm_jax.sampling import expected_nfe
from emigm_jax.sampling.generate import generate

METRIC_COLUMNS = ("class_accuracy", "fd")
PLOTS = (Metric("fd", "digits FD (classifier features)", False),
         Metric("class_accuracy", "class accuracy", True))


def digits_labels(num_images: int) -> np.ndarray:
    """int32 [10 * ceil(num_images / 10)]: class-major, the same count for every class."""
    if num_images < 1:
        raise ValueError(f"digits sweep num_images={num_images}: expected >= 1")
    per_class = -(-num_images // NUM_CLASSES)
    return np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)


def sample_digits(params, labels: np.ndarray, config, mesh, seed: int
                  ) -> tuple[np.ndarray, dict]:
    """Tokens [K, N, C] for labels [K] and info: nfe, compile_seconds, sample_seconds."""
    tokens, nfe, times = generate(params, labels, config, mesh, seed, progress=False)
    return tokens, {"nfe": nfe, "compile_seconds": times.compile_seconds,
                    "sample_seconds": times.sample_seconds}


def digits_sweep(config, params, workdir: str, mesh) -> dict:
    """Runs the sweep grid with the digits classifier's scores; see the module docstring."""
    sw = sweep_settings(config)
    sw["num_images"] = int(sw["num_images"] or config.sample.num_images)
    labels = digits_labels(sw["num_images"])
    k = len(labels)
    tok = digits_tokenizer(config)
    seed = int(config.seed) + 1
    test_fraction, split_seed = digits_split(config)

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
    reference = next(({"fd": r["real_fd"], "class_accuracy": r["real_class_accuracy"]}
                      for r in rows if "real_fd" in r), {})
    notes = []
    if reference:
        notes.append(f"Real data ({k} images): class accuracy {reference['class_accuracy']:.3f} "
                     f"(classifier on the held-out split), FD {reference['fd']:.3f} (train "
                     f"subsample vs held-out split). {k} samples per point "
                     f"({k // 10} per class); FD against the held-out split.")
    return finish(rows, workdir, sw, metric_columns=METRIC_COLUMNS, plots=PLOTS,
                  title=f"{config.name}: classifier FD and class accuracy vs "
                        f"NFE ({k} samples per point)",
                  notes=notes, references=reference, extra={"reference": reference})
