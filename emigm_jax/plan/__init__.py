"""Pod-scale plan without a pod: compile the real train step or sampler for a target slice.

``python -m emigm_jax.main --mode=plan --config=configs/emigm_h_256.py
--config.plan.target=tpu:v5p:4x4x8 --workdir=DIR`` lowers and compiles the program for every
(data, fsdp) mesh and remat setting asked for, on the target's compile-only devices (libtpu's
TPU topologies, or ``cpu:N`` host devices with a configurable memory limit), and writes
``DIR/plan/plan.json`` and ``plan.md``: per-chip memory against HBM, FLOPs, bytes, every
collective with the op that causes it, roofline step-time estimates with implied MFU, the
largest per-chip batch that fits, and the meshes ranked best first.
"""
from __future__ import annotations

import importlib.metadata
import logging
import math
import os

import jax

from emigm_jax.models import param_shapes
from emigm_jax.plan import report
from emigm_jax.plan.chips import CHIPS, resolve_target
from emigm_jax.plan.compile import (Compiled, compile_point, factorisations, largest_batch,
                                    sweep, variant)

WHATS = ("train", "sample")


def set_cpu_devices(spec: str) -> None:
    """cpu:N needs N host devices, which must be requested before jax starts its backends."""
    if spec.startswith("cpu:") and spec[4:].isdigit():
        try:
            jax.config.update("jax_num_cpu_devices", int(spec[4:]))
        except RuntimeError:  # backends already up: resolve_target reports a shortfall
            pass


def _libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _rank_key(run: Compiled, chip) -> tuple:
    if not run.fits:
        return (1, run.memory.get("total", math.inf))
    return (0, report.roofline(run, chip)["step_serial_s"])


def _extras(config, what: str, s: dict) -> dict[str, str]:
    r = s.get("roofline")
    if not r:
        return {}
    if what == "sample":
        return {"estimated s/image (per chip)":
                f"{r['step_serial_s'] / s['per_chip_batch']:.4f} serial, "
                f"{r['step_overlap_s'] / s['per_chip_batch']:.4f} overlapped",
                "estimated s/image (whole slice)":
                f"{r['step_serial_s'] / s['global_batch']:.6f} serial"}
    n_img, epochs = int(config.data.num_train_images), float(config.train.epochs)
    steps = epochs * math.ceil(n_img / s["global_batch"])
    return {"steps for the configured epochs": f"{steps:.0f} ({epochs:g} epochs of {n_img})",
            "estimated days": f"{steps * r['step_serial_s'] / 86400:.2f} serial, "
                              f"{steps * r['step_overlap_s'] / 86400:.2f} overlapped",
            "estimated images/s (slice)": f"{s['global_batch'] / r['step_serial_s']:.0f}"}


def make_plan(config, what: str = "train") -> dict:
    """Compiles the sweep (and the batch search) and returns the plan as a JSON-able dict."""
    p = config.plan
    if what not in WHATS:
        raise ValueError(f"plan what={what!r}; expected one of {WHATS}")
    target = resolve_target(str(p.target), float(p.hbm_gib))
    n = target.num_devices
    meshes = [tuple(int(v) for v in m) for m in p.meshes] or factorisations(n)
    for m in meshes:
        if m[0] * m[1] != n:
            raise ValueError(f"config.plan.meshes entry {m} needs {m[0] * m[1]} devices; the "
                             f"target {p.target} has {n}")
    remats = [bool(r) for r in p.remat]
    if what == "sample" and int(p.sample_per_chip) > 0:
        config = variant(config, meshes[0], remats[0], int(p.sample_per_chip) * n, "sample")
    runs = sorted(sweep(config, target, meshes, remats, what),
                  key=lambda r: _rank_key(r, target.chip))
    shapes = param_shapes(config)
    summaries = [report.run_summary(r, target.chip, report.weight_sizes(shapes, r.mesh[1]))
                 for r in runs]
    chosen = summaries[0]
    plan = {"config": str(config.name), "target": str(p.target), "what": what,
            "num_devices": n, "jax": jax.__version__, "libtpu": _libtpu_version(),
            "chip": dict(vars(target.chip)), "chosen": chosen, "sweep": summaries,
            "extras": _extras(config, what, chosen)}
    if bool(p.search_batch):
        best = variant(config, runs[0].mesh, runs[0].remat, runs[0].batch, what)
        largest, nxt, tried = largest_batch(best, target, what, int(p.max_per_chip),
                                             known=(runs[0],))
        last = next((t for t in tried if t.per_chip_batch == nxt), None)
        plan["batch_search"] = {
            "mesh": f"{runs[0].mesh[0]}x{runs[0].mesh[1]}", "remat": runs[0].remat,
            "largest": largest, "next": nxt, "max": int(p.max_per_chip),
            "next_error": last.error if last else "",
            "tried": [(t.per_chip_batch, t.fits, t.memory.get("total", -1.0)) for t in tried]}
    return plan


def run_plan(config, workdir: str) -> dict:
    """The ``--mode=plan`` job: plan(s) for ``config.plan.what`` written under workdir/plan."""
    whats = WHATS if config.plan.what == "both" else (str(config.plan.what),)
    out = {}
    for what in whats:
        plan = make_plan(config, what)
        out_dir = os.path.join(workdir, str(config.plan.out_dir), what)
        pj, pm = report.write(plan, out_dir)
        logging.info("plan (%s) written to %s and %s", what, pj, pm)
        out[what] = plan
    return out


__all__ = ["CHIPS", "make_plan", "run_plan", "set_cpu_devices", "compile_point",
           "resolve_target", "Compiled"]
