"""NFE-vs-FID sweep (`python -m emigm_jax.main --mode=sweep ...`).

Re-runs sample-and-evaluate for every (num_iter, cfg_scale) of `config.sweep` with one
tokenizer, one Inception and one reference (loaded once), and writes
`<workdir>/sweep/sweep.{csv,md,png}`: a table of NFE, FID, sFID, IS, precision, recall and
seconds per image, and FID against NFE (one line per CFG scale). NFE is what the sampler
reports for each setting (interval CFG makes it num_iter + guided steps).

Config (`config.sweep`, optional):
  num_iters    mask-prediction step counts (default 4, 8, 16, 32, 64)
  cfg_scales   CFG scales (default: just config.sample.cfg_scale)
  num_images   samples per point (0 -> eval.num_images; FID-10K is a common sweep size)
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import os

import jax

from emigm_jax.evaluation.evaluate import (_reference_metrics, eval_settings, make_decode_fn,
                                           sample_and_summarize, sample_batch_size)
from emigm_jax.evaluation.inception import make_feature_fn

SWEEP_DEFAULTS = dict(num_iters=(4, 8, 16, 32, 64), cfg_scales=(), num_images=0)
COLUMNS = ("num_iter", "cfg_scale", "nfe", "fid", "sfid", "inception_score", "precision",
           "recall", "seconds_per_image")


def sweep_settings(config) -> dict:
    given = config.get("sweep", None)
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
    unknown = sorted(set(given) - set(SWEEP_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown config.sweep fields {unknown}; known: {sorted(SWEEP_DEFAULTS)}")
    s = dict(SWEEP_DEFAULTS, **given)
    s["num_iters"] = [int(k) for k in s["num_iters"]]
    s["cfg_scales"] = [float(c) for c in s["cfg_scales"]] or [float(config.sample.cfg_scale)]
    bad = [k for k in s["num_iters"] if k < 1]
    if not s["num_iters"] or bad:
        raise ValueError(f"config.sweep.num_iters={s['num_iters']}: expected positive step counts")
    return s


def write_table(rows: list[dict], out_dir: str) -> dict[str, str]:
    """sweep.csv, sweep.md and sweep.png (FID vs NFE per CFG scale) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"sweep.{k}") for k in ("csv", "md", "png")}
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for scale in sorted({r["cfg_scale"] for r in rows}):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["cfg_scale"] == scale and "fid" in r)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"cfg {scale:g}")
    ax.set_xscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


def sweep(config, params, workdir: str, mesh, *, inception_variables=None) -> dict:
    settings = eval_settings(config)
    sw = sweep_settings(config)
    num_images = int(sw["num_images"] or settings["num_images"])
    if inception_variables is None:
        from emigm_jax.convert.inception import load_inception_variables
        if not settings["inception_path"]:
            raise ValueError("config.eval.inception_path is empty: point it at pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth (or a converted .msgpack)")
        inception_variables = load_inception_variables(settings["inception_path"])
    feature_fn = make_feature_fn(inception_variables, preprocess=settings["preprocess"],
                                 image_size=int(settings["inception_size"]), mesh=mesh)
    tag = (f"{os.path.basename(settings['inception_path']) or 'given'}|{settings['preprocess']}"
           f"|{settings['inception_size']}")
    decode_fn = make_decode_fn(config, mesh)
    rows = []
    for scale in sw["cfg_scales"]:
        for k in sw["num_iters"]:
            cfg = copy.deepcopy(config)
            cfg.sample.num_iter = k
            cfg.sample.cfg_scale = scale
            summary, info = sample_and_summarize(cfg, params, mesh, decode_fn=decode_fn,
                                                 feature_fn=feature_fn, num_images=num_images,
                                                 seed=int(config.seed) + 1)
            m = _reference_metrics(summary, settings, feature_fn, tag,
                                   batch_size=sample_batch_size(config, mesh))
            row = {"num_iter": k, "cfg_scale": scale, "nfe": info["nfe"],
                   "seconds_per_image": info["sample_seconds"] / num_images}
            row.update({c: m[c] for c in COLUMNS if c in m})
            rows.append(row)
            logging.info("sweep: %s", json.dumps(row))
    result = {"rows": rows, "num_images": num_images}
    if jax.process_index() == 0:
        result["files"] = write_table(rows, os.path.join(workdir, "sweep"))
        with open(os.path.join(workdir, "sweep", "sweep.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(open(result["files"]["md"], encoding="utf-8").read(), flush=True)
    return result
