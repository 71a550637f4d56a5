"""NFE-vs-quality sweep (``python -m emigm_jax.main --mode=sweep ...``).

Why: eMIGM's claim is a quality/compute trade-off, so quality has to be shown as a function
of network forward passes (NFE), not as one number. Every grid point is sampled and scored
by one of two scorers: Inception (FID, sFID, IS, precision, recall; tokenizer, Inception and
reference loaded once for the grid) or, for ``data.source='digits'``, the digits classifier
(``emigm_jax.evaluation.digits_sweep``). The grid, resumable point files, table and plot are
``emigm_jax.evaluation.sweep_grid``; the files and ``config.sweep`` fields are described in
docs/ARCHITECTURE.md ("The sweep").
"""
from __future__ import annotations

import os

from emigm_jax.config_validation import as_dict
from emigm_jax.evaluation.digits_sweep import digits_sweep
from emigm_jax.evaluation.evaluate import (eval_settings, inception_tag, make_decode_fn,
                                           reference_metrics, sample_and_summarize)
from emigm_jax.evaluation.inception import make_feature_fn
from emigm_jax.evaluation.sweep_grid import (INCEPTION_COLUMNS, GridPoint, Metric, finish,
                                             grid_points, params_fingerprint, pareto_front,
                                             run_grid, sweep_settings)
from emigm_jax.sampling import expected_nfe, sample_batch_size

__all__ = ["GridPoint", "grid_points", "inception_sweep", "pareto_front", "sweep",
           "sweep_settings"]


def sweep(config, params, workdir: str, mesh, *, inception_variables=None) -> dict:
    """--mode=sweep: the digits scorer for data.source='digits', Inception otherwise."""
    if config.data.source == "digits":
        return digits_sweep(config, params, workdir, mesh)
    if inception_variables is None:
        raise ValueError("the Inception sweep needs inception_variables (the CLI loads them "
                         "from config.eval.inception_path)")
    return inception_sweep(config, params, workdir, mesh, inception_variables=inception_variables)


def inception_sweep(config, params, workdir: str, mesh, *, inception_variables) -> dict:
    """FID / sFID / IS / precision / recall per grid point (module docstring)."""
    settings = eval_settings(config)
    sw = sweep_settings(config)
    sw["num_images"] = num_images = int(sw["num_images"] or settings["num_images"])
    feature_fn = make_feature_fn(inception_variables, preprocess=settings["preprocess"],
                                 image_size=int(settings["inception_size"]), mesh=mesh)
    tag = inception_tag(settings)
    decode_fn = make_decode_fn(config, mesh)
    seed = int(config.seed) + 1

    def run_point(cfg, point):  # pylint: disable=unused-argument
        summary, info = sample_and_summarize(cfg, params, mesh, decode_fn=decode_fn,
                                             feature_fn=feature_fn, num_images=num_images,
                                             seed=seed)
        m = reference_metrics(summary, settings, feature_fn, tag,
                              batch_size=sample_batch_size(config, mesh))
        row = {"nfe": info["nfe"], "nfe_expected": expected_nfe(cfg.sample),
               "seconds_per_image": info["sample_seconds"] / num_images}
        row.update({c: float(m[c]) for c in INCEPTION_COLUMNS if c in m})
        return row

    key_base = {"scorer": "inception", "tag": tag, "num_images": num_images, "seed": seed,
                "reference": [settings["reference_path"], settings["fid_stats_path"]],
                "tokenizer": as_dict(config.tokenizer), "params": params_fingerprint(params)}
    rows = run_grid(config, grid_points(sw), os.path.join(workdir, sw["out_dir"]), key_base,
                    run_point)
    return finish(rows, workdir, sw, metric_columns=INCEPTION_COLUMNS,
                  plots=(Metric("fid", "FID", False),),
                  title=f"{config.name}: FID vs NFE ({num_images} images per point)")
