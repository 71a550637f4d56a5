"""Roofline estimates, collective classification, and the plan.json / plan.md writers.

The step time here is an *estimate* from the compiled program's own counts, not a
measurement: compute at the chip's peak bf16 FLOP/s, HBM traffic (XLA's "bytes accessed") at
HBM bandwidth, and each chip's collective traffic at its interconnect bandwidth. Two bounds
are given: ``overlap`` (everything overlaps: the max of the three) and ``serial`` (collectives
exposed: max(compute, HBM) + collectives). MFU = compute time / step time.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from emigm_jax.plan.chips import GIB, Chip
from emigm_jax.plan.compile import Compiled
from emigm_jax.plan.hlo import Collective, summarize

SMALL_BYTES = 64 * 1024  # scalars, norms, counters: below this a collective is 'small'


def roofline(run: Compiled, chip: Chip) -> dict[str, float]:
    """Compute, HBM and interconnect times at peak. XLA's cost analysis counts a loop body
    (a layer or sampler scan) once, so FLOPs are the larger of it and the loop-aware matmul
    count, and the HBM bytes are scaled by the same loop factor (an estimate)."""
    coll = sum(c.count * c.traffic_bytes for c in run.collectives)
    flops = max(run.flops, run.matmul_flops)
    loop = flops / run.flops if run.flops else 1.0
    t_flops = flops / chip.peak_bf16_flops
    t_hbm = loop * run.bytes_accessed / chip.hbm_bw
    t_ici = coll / chip.ici_bw
    overlap = max(t_flops, t_hbm, t_ici)
    serial = max(t_flops, t_hbm) + t_ici
    return {"flops": flops, "loop_factor": loop, "compute_s": t_flops, "hbm_s": t_hbm,
            "collective_s": t_ici,
            "collective_bytes": coll, "step_overlap_s": overlap, "step_serial_s": serial,
            "mfu_overlap": t_flops / overlap if overlap else 0.0,
            "mfu_serial": t_flops / serial if serial else 0.0}


def weight_sizes(param_shapes: Any, fsdp: int) -> set[int]:
    """Element counts a weight collective can carry: whole, per layer, and their shards."""
    sizes = set()
    for leaf in jax.tree.leaves(param_shapes):
        shape = tuple(leaf.shape)
        for s in (shape, shape[1:]):
            n = int(np.prod(s)) if s else 1
            sizes.update({n, n // max(fsdp, 1)})
    return sizes


def classify(c: Collective, weights: set[int]) -> str:
    """'weight' (a parameter, layer slice or shard), 'small' (<= 64 KiB), or 'activation'."""
    if all(e in weights for e in c.elements):
        return "weight"
    return "small" if c.payload_bytes <= SMALL_BYTES else "activation"


def collective_rows(run: Compiled, weights: set[int]) -> list[dict]:
    """One row per collective instruction, largest per-step traffic first."""
    rows = [{"kind": c.kind, "shapes": ", ".join(f"{dt}{list(d)}" for dt, d in c.shapes),
             "group": c.group, "count": c.count, "payload_bytes": c.payload_bytes,
             "bytes_per_step": c.count * c.traffic_bytes, "class": classify(c, weights),
             "op": c.op_name, "source": c.source} for c in run.collectives]
    return sorted(rows, key=lambda r: -r["bytes_per_step"])


def run_summary(run: Compiled, chip: Chip, weights: set[int]) -> dict:
    out = {"what": run.what, "mesh": {"data": run.mesh[0], "fsdp": run.mesh[1]},
           "remat": run.remat, "global_batch": run.batch, "per_chip_batch": run.per_chip_batch,
           "fits": run.fits, "compile_s": round(run.compile_s, 1), "error": run.error,
           "memory_bytes": run.memory, "state_bytes": run.state_bytes,
           "hbm_bytes": chip.hbm_bytes, "flops": run.flops, "matmul_flops": run.matmul_flops,
           "bytes_accessed": run.bytes_accessed}
    if run.memory:
        out["headroom"] = 1.0 - run.memory["total"] / chip.hbm_bytes
        out["roofline"] = roofline(run, chip)
        out["collective_summary"] = summarize(run.collectives)
        out["collectives"] = collective_rows(run, weights)
    return out


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _point_line(s: dict) -> str:
    r = s.get("roofline", {})
    mem = s.get("memory_bytes", {})
    return (f"| {s['mesh']['data']}x{s['mesh']['fsdp']} | {s['remat']} | {s['per_chip_batch']} | "
            f"{'yes' if s['fits'] else 'no'} | {_gib(mem.get('total', float('nan')))} | "
            f"{r.get('step_overlap_s', float('nan')) * 1e3:.1f} | "
            f"{r.get('step_serial_s', float('nan')) * 1e3:.1f} | "
            f"{100 * r.get('mfu_serial', 0):.1f} | {s['compile_s']} |")


def markdown(plan: dict) -> str:
    """plan.md: the chosen point, its collectives, the mesh/remat comparison, batch search."""
    chip, best = plan["chip"], plan["chosen"]
    lines = [f"# Plan: {plan['config']} on {plan['target']} ({plan['num_devices']} devices)", "",
             f"jax {plan['jax']}, libtpu {plan['libtpu']}. All times are **estimates** from "
             f"compile-only runs (roofline: compute at peak, HBM traffic at bandwidth, "
             f"collectives at interconnect bandwidth), not measurements.", "",
             "| chip | HBM GiB | peak bf16 TFLOP/s | HBM GB/s | ICI GB/s | source |",
             "|---|---|---|---|---|---|",
             f"| {chip['name']} | {_gib(chip['hbm_bytes'])} | {chip['peak_bf16_flops'] / 1e12:g} "
             f"| {chip['hbm_bw'] / 1e9:g} | {chip['ici_bw'] / 1e9:g} | {chip['source']} |", ""]
    lines += [f"## Chosen: {plan['what']} step, mesh data={best['mesh']['data']} x "
              f"fsdp={best['mesh']['fsdp']}, remat={best['remat']}, global batch "
              f"{best['global_batch']} ({best['per_chip_batch']} per chip)", ""]
    if not best.get("memory_bytes"):
        lines += [f"Does not compile: {best['error']}", ""]
    else:
        m, r = best["memory_bytes"], best["roofline"]
        lines += [
            "| per chip | GiB |", "|---|---|",
            *[f"| {k} | {_gib(m[k])} |" for k in ("argument", "output", "alias", "temp", "total")],
            f"| sharded state + batch (expected arguments) | {_gib(best['state_bytes'])} |",
            f"| HBM limit | {_gib(best['hbm_bytes'])} (headroom {100 * best['headroom']:.1f}%) |",
            "", f"Per chip per step: {r['flops'] / 1e12:.3f} TFLOP (matmuls, loop trips counted; "
            f"XLA's cost analysis, each loop body once: {best['flops'] / 1e12:.3f}), "
            f"{r['loop_factor'] * best['bytes_accessed'] / 1e9:.2f} GB accessed (cost analysis x "
            f"the loop factor {r['loop_factor']:.2f}), "
            f"{r['collective_bytes'] / 1e9:.3f} GB collective traffic.", "",
            f"Estimated step: compute {r['compute_s'] * 1e3:.2f} ms, HBM {r['hbm_s'] * 1e3:.2f} ms,"
            f" collectives {r['collective_s'] * 1e3:.2f} ms -> {r['step_overlap_s'] * 1e3:.2f} ms "
            f"(all overlapped; implied MFU {100 * r['mfu_overlap']:.1f}%) to "
            f"{r['step_serial_s'] * 1e3:.2f} ms (collectives exposed; implied MFU "
            f"{100 * r['mfu_serial']:.1f}%).", ""]
        for k, v in plan.get("extras", {}).items():
            lines.append(f"- {k}: {v}")
        lines += ["", "### Collectives (per chip per step, largest first)", "",
                  "| kind | payload | group | count | MB/step | class | caused by | source |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in best["collectives"]:
            op = c["op"].split("/", 1)[-1][-110:]
            lines.append(f"| {c['kind']} | {c['shapes'][:60]} | {c['group']} | {c['count']} | "
                         f"{c['bytes_per_step'] / 1e6:.2f} | {c['class']} | `{op}` | "
                         f"{os.path.basename(c['source'])} |")
    lines += ["", "## Mesh and remat comparison (best first)", "",
              "| data x fsdp | remat | per chip | fits | GiB | est. ms (overlap) | "
              "est. ms (serial) | MFU % (serial) | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [_point_line(s) for s in plan["sweep"]]
    if plan.get("batch_search"):
        b = plan["batch_search"]
        lines += ["", "## Largest per-chip batch (compile-only search)", "",
                  f"At mesh {b['mesh']}, remat={b['remat']}: **{b['largest']}** per chip fits; "
                  f"{b['next'] or '>' + str(b['max'])} does not"
                  f"{' (' + b['next_error'] + ')' if b.get('next_error') else ''}.", "",
                  "| per chip | fits | GiB |", "|---|---|---|"]
        lines += [f"| {p} | {'yes' if f else 'no'} | {g / GIB:.4f} |" if g >= 0 else
                  f"| {p} | no | compile failed |" for p, f, g in b["tried"]]
    return "\n".join(lines) + "\n"


def write(plan: dict, out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    pj, pm = os.path.join(out_dir, "plan.json"), os.path.join(out_dir, "plan.md")
    with open(pj, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1, default=float)
    with open(pm, "w", encoding="utf-8") as f:
        f.write(markdown(plan))
    return pj, pm
