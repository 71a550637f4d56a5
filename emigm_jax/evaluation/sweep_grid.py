"""The sweep's grid, resumable points, Pareto table and plot, shared by both scorers.

``run_grid`` calls a scorer's ``run_point(config, point)`` for every grid point not already
on disk (see the resumption notes in ``emigm_jax.evaluation.sweep``); ``finish`` writes the
table, the NFE-vs-quality plot and sweep.json.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from jax.experimental import multihost_utils

from emigm_jax.config_validation import as_dict, merged_section, sample_preset
from emigm_jax.models import seq_len
from emigm_jax.workdir import flatten

SWEEP_DEFAULTS = dict(num_iters=(4, 8, 16, 32, 64), cfg_scales=(), cfg_intervals=(),
                      num_images=0, presets=(), out_dir="sweep")
DEFAULT_PRESET = "default"
PLOT_NAME = "nfe_vs_fid.png"
# Table columns in order; metric columns go between "nfe" and "cfg_t_min".
LEAD_COLUMNS = ("preset", "num_iter", "cfg_scale", "nfe")
TAIL_COLUMNS = ("cfg_t_min", "cfg_t_max", "nfe_expected", "seconds_per_image",
                "compile_seconds", "seconds", "pareto")
INCEPTION_COLUMNS = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclasses.dataclass(frozen=True)
class Metric:
    """A quality column that gets a plot panel and a Pareto front."""

    key: str
    label: str
    higher_is_better: bool


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One sampler setting of the sweep."""

    num_iter: int
    cfg_scale: float
    cfg_t_min: float
    cfg_t_max: float
    preset: str = ""                 # name of a config.sample_presets entry ("" = none)
    overrides: tuple = ()            # that preset's (sample field, value) pairs, sorted

    @property
    def family(self) -> str:
        """Plot line label: points that differ only in num_iter share a family."""
        if self.cfg_scale == 1.0:
            cfg = "no CFG"
        else:
            cfg = f"cfg {self.cfg_scale:g} on ({self.cfg_t_min:g}, {self.cfg_t_max:g}]"
        return f"{self.preset}, {cfg}" if self.preset else cfg

    @property
    def name(self) -> str:
        return (f"{self.preset + '_' if self.preset else ''}iter{self.num_iter}"
                f"_cfg{self.cfg_scale:g}_t{self.cfg_t_min:g}-{self.cfg_t_max:g}")

    def fields(self) -> dict:
        return dataclasses.asdict(self)

    def apply(self, config):
        """A copy of config with this point's sample settings (preset first, then the grid's)."""
        cfg = copy.deepcopy(config)
        with cfg.unlocked() if hasattr(cfg, "unlocked") else contextlib.nullcontext():
            cfg.sample.update(dict(self.overrides), num_iter=self.num_iter,
                              cfg_scale=self.cfg_scale, cfg_t_min=self.cfg_t_min,
                              cfg_t_max=self.cfg_t_max)
        return cfg


# ------------------------------------------------------------------------------ settings / grid
def sweep_settings(config) -> dict:
    """config.sweep over SWEEP_DEFAULTS, checked."""
    s = merged_section(config, "sweep", SWEEP_DEFAULTS)
    s["num_iters"] = [int(k) for k in s["num_iters"]]
    bad = [k for k in s["num_iters"] if k < 1]
    if not s["num_iters"] or bad:
        raise ValueError(f"config.sweep.num_iters={s['num_iters']}: expected positive step counts")
    n = seq_len(config)
    too_many = [k for k in s["num_iters"] if k > n]
    if too_many:
        logging.warning("sweep: config.sweep.num_iters %s exceed the %d tokens per image; "
                        "dropped (every token is revealed after at most %d steps)", too_many, n, n)
        s["num_iters"] = [k for k in s["num_iters"] if k <= n]
        if not s["num_iters"]:
            raise ValueError(f"config.sweep.num_iters={too_many}: every count exceeds the {n} "
                             f"tokens per image; expected counts in [1, {n}]")
    s["num_iters"] = list(dict.fromkeys(s["num_iters"]))
    s["cfg_scales"] = [float(c) for c in s["cfg_scales"]] or [float(config.sample.cfg_scale)]
    intervals = []
    for pair in s["cfg_intervals"] or [(config.sample.cfg_t_min, config.sample.cfg_t_max)]:
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.sweep.cfg_intervals entry {pair!r}: expected a "
                             f"(cfg_t_min, cfg_t_max) pair of numbers") from e
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"config.sweep.cfg_intervals entry {pair!r}: expected "
                             f"0 <= cfg_t_min < cfg_t_max <= 1")
        intervals.append((lo, hi))
    s["cfg_intervals"] = intervals
    s["num_images"] = int(s["num_images"])
    if s["num_images"] < 0:
        raise ValueError(f"config.sweep.num_images={s['num_images']}: expected >= 0 "
                         "(0 = the evaluation's sample count)")
    s["presets"] = _preset_overrides(config, s["presets"])
    out = str(s["out_dir"])
    if not out or os.path.isabs(out) or ".." in out.split("/"):
        raise ValueError(f"config.sweep.out_dir={out!r}: expected a subdirectory name of the "
                         "workdir (relative, no '..')")
    return s


def _preset_overrides(config, names) -> list[tuple[str, tuple]]:
    """[(name, sorted (field, value) pairs)] for sweep.presets; names are checked here."""
    if isinstance(names, str):
        names = (names,)
    out = []
    for name in dict.fromkeys(str(n) for n in names):
        if name == DEFAULT_PRESET:
            out.append((name, ()))
            continue
        overrides = sample_preset(config, name, source="config.sweep.presets entry ",
                                  also_accepted=(DEFAULT_PRESET,))
        out.append((name, tuple(sorted(overrides.items()))))
    return out


def grid_points(settings: dict) -> list[GridPoint]:
    """Families (scale x interval) in config order, num_iters within each.

    CFG scale 1 ignores the interval, so it forms one family whatever the intervals, stored
    with the interval (0, 1) (changing the interval does not invalidate its saved points).
    """
    points = []
    for preset, overrides in settings.get("presets") or [("", ())]:
        for scale in settings["cfg_scales"]:
            for lo, hi in settings["cfg_intervals"]:
                for k in settings["num_iters"]:
                    grid = (k, 1.0, 0.0, 1.0) if scale == 1.0 else (k, scale, lo, hi)
                    p = GridPoint(*grid, preset=preset, overrides=overrides)
                    if p not in points:
                        points.append(p)
    return points


# ------------------------------------------------------------------------------ resumption
@jax.jit
def _leaf_moments(leaves):
    return jnp.stack([jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                 jnp.sum(jnp.abs(x.astype(jnp.float32)))]) for x in leaves])


def params_fingerprint(params) -> str:
    """Short hash of the parameters' shapes, sums and absolute sums.

    Cheap (one reduction per leaf on device) and enough to tell checkpoints apart, so a sweep
    never reuses points sampled from other weights. Rounded to 5 digits against reduction-order
    noise across device layouts.
    """
    leaves = jax.tree.leaves(params)
    moments = np.asarray(jax.device_get(_leaf_moments(leaves)), np.float64)  # [L, 2]
    text = json.dumps([[list(np.shape(x)), str(x.dtype)] for x in leaves]) + ";".join(
        f"{v:.5e}" for v in moments.ravel())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def point_key_fields(base: Mapping[str, Any], config) -> dict:
    """Everything that decides a point's numbers (config.model and config.sample included)."""
    blob = dict(base, model=as_dict(config.model), sample=as_dict(config.sample))
    return json.loads(json.dumps(blob, sort_keys=True, default=str))


def point_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted names of the fields that differ (why a saved point is not reused)."""
    old, new = flatten(old), flatten(new)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _agree(flag: bool) -> bool:
    """Process 0's answer on every process (all must take the same sampling path)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def run_grid(config, points: Sequence[GridPoint], out_dir: str, key_base: Mapping[str, Any],
             run_point: Callable[[Any, GridPoint], dict]) -> list[dict]:
    """Runs ``run_point(point_config, point)`` for every point not already on disk.

    Returns one row per point: the point's fields, run_point's dict, ``seconds`` (wall time
    of the point, sampling and scoring) and ``reused`` (loaded from points/<name>.json).
    With several processes only process 0 reads and writes point files.
    """
    point_dir = os.path.join(out_dir, "points")
    rows = []
    for p in points:
        cfg = p.apply(config)
        fields = point_key_fields(key_base, cfg)
        key = point_key(fields)
        path = os.path.join(point_dir, f"{p.name}.json")
        saved = None
        if jax.process_index() == 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                blob = json.load(f)
            if blob.get("key") == key:
                saved = blob["row"]
            else:
                logging.warning("sweep: %s is stale (changed: %s); sampling it again", path,
                                ", ".join(_changed(blob.get("fields", {}), fields)) or "?")
        if _agree(saved is not None):
            row = dict(saved or p.fields(), reused=True)
            logging.info("sweep: %s reused from %s", p.name, path)
        else:
            t0 = time.perf_counter()
            row = dict(p.fields(), **run_point(cfg, p))
            row["seconds"] = time.perf_counter() - t0
            if jax.process_index() == 0:
                os.makedirs(point_dir, exist_ok=True)
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({"key": key, "row": row, "fields": fields}, f, indent=1)
                os.replace(tmp, path)  # a killed sweep never leaves half a point behind
            row["reused"] = False
            logging.info("sweep: %s", json.dumps({k: v for k, v in row.items()
                                                  if not isinstance(v, list)}))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ table and plot
def pareto_front(nfe: Sequence[float], quality: Sequence[float],
                 higher_is_better: bool = False) -> np.ndarray:
    """bool [P]: points no other point dominates (NFE <= and quality at least as good, one
    of them strictly). Non-finite qualities are never on the front."""
    x = np.asarray(nfe, np.float64)
    q = np.asarray(quality, np.float64)
    q = -q if higher_is_better else q  # lower is better from here on
    ok = np.isfinite(q) & np.isfinite(x)
    front = ok.copy()
    for i in np.flatnonzero(ok):
        dominated = ok & (x <= x[i]) & (q <= q[i]) & ((x < x[i]) | (q < q[i]))
        front[i] = not dominated.any()
    return front


def _mark_pareto(rows: list[dict], metrics: Sequence[Metric]) -> None:
    marks = [[] for _ in rows]
    for m in metrics:
        idx = [i for i, r in enumerate(rows) if m.key in r and "nfe" in r]
        if not idx:
            continue
        front = pareto_front([rows[i]["nfe"] for i in idx], [rows[i][m.key] for i in idx],
                             m.higher_is_better)
        for i, f in zip(idx, front):
            if f:
                marks[i].append(m.key)
    for r, mk in zip(rows, marks):
        r["pareto"] = "+".join(mk)


def write_table(rows: list[dict], out_dir: str, metric_columns: Sequence[str] = INCEPTION_COLUMNS,
                plots: Sequence[Metric] = (Metric("fid", "FID", False),), *,
                title: str = "", notes: Sequence[str] = (),
                references: Mapping[str, float] | None = None) -> dict[str, str]:
    """sweep.csv, sweep.md and nfe_vs_fid.png in out_dir; returns their paths.

    rows: from ``run_grid`` (sorted here by family then NFE). plots: one panel per metric,
    quality against NFE with one line per family and the Pareto front ringed. references:
    metric key -> real-data value drawn as a dotted line (e.g. the digits' real FD).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, "sweep.csv"), "md": os.path.join(out_dir, "sweep.md"),
             "png": os.path.join(out_dir, PLOT_NAME)}
    _mark_pareto(rows, plots)
    order = list(LEAD_COLUMNS) + list(metric_columns) + list(TAIL_COLUMNS)
    cols = [c for c in order if any(r.get(c, "") != "" for r in rows)]
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    if notes:
        lines += [""] + list(notes)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, plots, paths["png"], title, references or {})
    return paths


def _plot(rows, plots: Sequence[Metric], path: str, title: str, references: Mapping[str, float]):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel  (after use())

    fig, axes = plt.subplots(1, len(plots), figsize=(5 * len(plots), 3.8), squeeze=False)
    families = list(dict.fromkeys(r["family"] for r in rows))
    for ax, m in zip(axes[0], plots):
        for fam in families:
            pts = sorted((r["nfe"], r[m.key]) for r in rows
                         if r["family"] == fam and m.key in r and np.isfinite(r[m.key]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=fam)
        front = sorted((r["nfe"], r[m.key]) for r in rows if m.key in r.get("pareto", "").split("+"))
        if front:
            ax.scatter(*zip(*front), s=140, facecolors="none", edgecolors="black", linewidths=1.2,
                       label="Pareto front", zorder=3)
            ax.step(*zip(*front), where="post", color="black", linestyle="--", linewidth=0.8,
                    zorder=2)
        if m.key in references and np.isfinite(references[m.key]):
            ax.axhline(references[m.key], color="grey", linestyle=":", label="real data")
        xs = sorted({r["nfe"] for r in rows if "nfe" in r})
        if xs and max(xs) > 2 * min(xs):
            ax.set_xscale("log", base=2)
        if 0 < len(xs) <= 12:  # label the NFEs that were run, as plain numbers
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
        ax.set_xlabel("NFE (network forward passes per image)")
        ax.set_ylabel(m.label + (" (higher is better)" if m.higher_is_better
                                 else " (lower is better)"))
        ax.grid(True, alpha=0.3)
        if ax.lines or ax.collections:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish(rows: list[dict], workdir: str, settings: dict, *, metric_columns: Sequence[str],
           plots: Sequence[Metric], title: str = "", notes: Sequence[str] = (),
           references: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None
           ) -> dict:
    """Writes the table, plot and sweep.json on process 0 and prints the Markdown table."""
    for r in rows:
        r["family"] = GridPoint(r["num_iter"], r["cfg_scale"], r["cfg_t_min"],
                                r["cfg_t_max"], r.get("preset", "")).family
    result = {"rows": rows, "num_images": settings["num_images"], **dict(extra or {})}
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, settings["out_dir"])
        result["files"] = write_table(rows, out_dir, metric_columns, plots, title=title,
                                      notes=notes, references=references)
        with open(os.path.join(out_dir, "sweep.json"), "w", encoding="utf-8") as f:
            json.dump({**result, "settings": {k: v for k, v in settings.items()}}, f, indent=2,
                      default=str)
        reused = sum(bool(r.get("reused")) for r in rows)
        with open(result["files"]["md"], encoding="utf-8") as f:
            print(f.read(), flush=True)
        print(f"sweep: {len(rows)} points ({reused} reused); wrote {out_dir}/sweep.csv, "
              f"sweep.md, {PLOT_NAME}", flush=True)
    return result
