"""model.scan_layers: train-step compile time vs depth, and step time, scanned vs unrolled.

Compiles the full jitted train step (``emigm_jax.train``) of an eMIGM config at its depth
and at twice its depth, with ``model.scan_layers`` on and off, on the local devices, and
times a few steps. Both wall-clock and process CPU seconds are reported: on a shared box
the CPU seconds are the steadier measure of compile work.

    python benchmarks/scan_layers.py --config=configs/emigm_xs_256.py --batch=8 --steps=3
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from emigm_jax import sharding as shd  # noqa: E402
from emigm_jax import train as train_lib  # noqa: E402
from emigm_jax.models import init_params, seq_len, token_dim  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def measure(config, steps: int) -> dict:
    mesh = shd.make_mesh(config.mesh)
    schedule = train_lib.lr_schedule(config, 1000)
    optimizer = train_lib.make_optimizer(config, schedule)
    state, _, shardings = train_lib.create_sharded_state(
        config, mesh, optimizer, functools.partial(init_params, config))
    b, n = int(config.train.batch_size), seq_len(config)
    batch = shd.global_batch({"tokens": jnp.ones((b, n, token_dim(config)), jnp.float32),
                              "label": jnp.arange(b, dtype=jnp.int32) % 10}, mesh)
    step = train_lib.jit_train_step(train_lib.make_train_step(config, optimizer, schedule),
                                    shardings, mesh)
    w0, c0 = time.perf_counter(), time.process_time()
    compiled = step.lower(state, batch).compile()
    out = {"compile_wall_s": time.perf_counter() - w0, "compile_cpu_s": time.process_time() - c0}
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    out.update(step_wall_s=(time.perf_counter() - w0) / steps,
               step_cpu_s=(time.process_time() - c0) / steps, loss=float(m["loss"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "emigm_xs_256.py"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", default="scan,unrolled")
    ap.add_argument("--mults", default="1,2", help="depth multipliers to compile")
    args = ap.parse_args()
    rows = []
    for mode in args.modes.split(","):
        for mult in [int(m) for m in args.mults.split(",")]:
            c = load_config(args.config)
            c.train.batch_size = args.batch
            c.model.scan_layers = mode == "scan"
            c.model.enc_depth *= mult
            c.model.dec_depth *= mult
            r = measure(c, args.steps)
            r.update(mode=mode, depth=f"{c.model.enc_depth}+{c.model.dec_depth}")
            print(json.dumps(r), flush=True)
            rows.append(r)
    for mode in args.modes.split(","):
        runs = [r for r in rows if r["mode"] == mode]
        if len(runs) != 2:
            continue
        one, two = runs
        print(f"{mode}: compile 2x/1x depth = {two['compile_cpu_s'] / one['compile_cpu_s']:.2f} "
              f"(CPU s), {two['compile_wall_s'] / one['compile_wall_s']:.2f} (wall)")


if __name__ == "__main__":
    main()
