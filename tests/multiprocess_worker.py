"""Subprocess worker for the multi-device, multi-process and resume tests.

Runs ``emigm_jax.train.train`` on a tiny digits config in a fresh process, so each test can
choose XLA_FLAGS (fake device count) and jax.distributed settings before jax is imported,
and can kill or signal the process. Writes the final parameters (npz) and a JSON summary.

    python tests/multiprocess_worker.py --workdir=W --out=R [--steps=8] [--devices=1]
        [--coordinator=localhost:PORT --num_processes=2 --process_id=0]
        [--kill_at=K] [--sigterm_at=K] [--overrides='{"train.batch_size": 16}']
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_digits_config(overrides: dict | None = None):
    """The digits config shrunk to compile and step in seconds (no dropout: deterministic)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import digits  # pylint: disable=import-outside-toplevel

    c = digits.get_config()
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 32, 1, 1, 4
    m.buffer_size = 2
    m.head_depth, m.head_width, m.diffusion_batch_mul = 1, 32, 1
    m.attn_dropout = m.proj_dropout = 0.0
    m.encoder_buckets = m.loss_buckets = ()  # plain step: each ladder rung compiles a branch
    m.label_drop_prob = 0.1
    c.train.batch_size = 16
    c.train.num_steps = 8
    c.train.log_every = 1
    c.train.progress = False
    c.optim.warmup_steps = 2
    c.optim.decay = "constant"  # resume tests change num_steps; a cosine would follow it
    c.checkpoint.every_steps = 4
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.sample.num_iter = 2
    c.sample.solver_steps = 2
    c.sample.solver_order = 2
    c.sample.batch_size = 500
    for key, value in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num_processes", type=int, default=None)
    ap.add_argument("--process_id", type=int, default=None)
    ap.add_argument("--kill_at", type=int, default=0)
    ap.add_argument("--sigterm_at", type=int, default=0)
    ap.add_argument("--overrides", default="{}")
    args = ap.parse_args()

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    from emigm_jax import train as train_lib  # pylint: disable=import-outside-toplevel

    if args.coordinator:
        shd.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    overrides = json.loads(args.overrides)
    overrides.setdefault("train.num_steps", args.steps)
    config = tiny_digits_config(overrides)

    def hook(step, state, ckpt):
        if args.kill_at and step == args.kill_at:
            ckpt.wait()  # the checkpoint before the kill is committed; then die hard
            os.kill(os.getpid(), signal.SIGKILL)
        if args.sigterm_at and step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train_lib.train(config, args.workdir, hooks=[hook])
    params = result.state.params
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    flat = {shd.path_str(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]}
    if jax.process_index() == 0:
        np.savez(args.out + ".npz", **flat)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"step": result.step, "start_step": result.start_step,
                       "preempted": result.preempted, "loss": result.last_metrics.get("loss"),
                       "process_count": jax.process_count(),
                       "train_rungs": [list(r) for r in result.train_rungs],
                       "device_count": jax.device_count()}, f)


if __name__ == "__main__":
    main()
