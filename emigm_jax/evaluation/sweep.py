"""NFE-vs-quality sweep (`python -m emigm_jax.main --mode=sweep ...`).

Why: eMIGM's claim is a quality/compute trade-off, so the product has to show quality as a
function of network forward passes (NFE), not one number. The sweep re-runs
sample-and-score for every grid point and writes, in ``<workdir>/sweep/``:

  sweep.csv, sweep.md   one row per point: num_iter, cfg_scale, NFE (measured by the sampler,
                        ``info['nfe']``, next to ``sampling.expected_nfe``), the quality
                        metrics, CFG interval, wall time; ``pareto`` names the metrics for
                        which the point is on the NFE-vs-quality Pareto front
  nfe_vs_fid.png        quality against NFE, one line per setting family (CFG scale and
                        interval), Pareto-front points ringed
  sweep.json            rows and settings
  points/<name>.json    one file per finished point (see resumption below)

Two scorers:
  * Inception (ImageNet-style configs): FID, sFID, IS, precision, recall, with one tokenizer,
    one Inception and one reference loaded once for the whole grid.
  * digits (``data.source='digits'``): class accuracy and Frechet distance in the digits
    classifier's feature space (``emigm_jax.evaluation.digits_sweep``); minutes on a CPU.

The grid, resumption, table and plot are shared: ``emigm_jax.evaluation.sweep_grid``.

Resumption: each point's JSON carries a key hashed from the model and sample config, the
sample count and seed, the scorer setup and a fingerprint of the parameters. A rerun reuses
every point whose key matches, so an interrupted sweep continues where it stopped, extending
the grid only samples the new points, and a retrained model never mixes with stale points.

Config (``config.sweep``, optional):
  num_iters      mask-prediction step counts (default 4, 8, 16, 32, 64); counts above the
                 number of tokens per image are dropped with a warning (extra steps could
                 only repeat forward passes that reveal nothing)
  cfg_scales     CFG scales (default: just config.sample.cfg_scale)
  cfg_intervals  (cfg_t_min, cfg_t_max) pairs (default: just config.sample's interval)
  num_images     samples per point (0 -> eval.num_images, or sample.num_images for digits)
  presets        names of config.sample_presets to cross with the grid, one plot line family
                 each ("default" = the config's own sample settings); empty: the config's
                 settings only. This is how sampler switches (schedules, Gumbel noise,
                 Z-sampling, ...) are compared at equal NFE in one table.
  out_dir        subdirectory of the workdir for this sweep's files (default "sweep"), so
                 several studies on one model keep separate tables
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
