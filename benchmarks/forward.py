"""Forward+backward time per step and tokens/s of the unified loss for one config.

Usage:
  python benchmarks/forward.py                       # small config (width 256, 4+4 blocks)
  python benchmarks/forward.py --config=xs --batch=8  # eMIGM-XS-256

Times the jitted value_and_grad of ``loss_fn`` (masking, MAE transformer, diffusion head with
diffusion_batch_mul=4), excluding compilation; tokens/s counts the N image tokens per example.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from emigm_jax.losses import loss_fn
from emigm_jax.config_files import load_config
from emigm_jax.models import init_params, param_count, seq_len, token_dim
from timing import timed_calls  # this folder (the script's sys.path[0])


def small_config():
    c = load_config("base")
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 256, 4, 4, 4
    m.head_depth, m.head_width = 3, 256
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small", help="small or an eMIGM size: xs, s, b, l, h")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.config == "small":
        config = small_config()
    else:
        config = load_config(f"emigm_{args.config}_256")
    config.model.dtype = args.dtype
    n, c = seq_len(config), token_dim(config)
    params = init_params(config, jax.random.key(0))
    batch = {"tokens": jax.random.normal(jax.random.key(1), (args.batch, n, c)),
             "label": jnp.arange(args.batch) % config.model.num_classes}
    step = jax.jit(jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, config), has_aux=True))
    # call 0 (key 2) compiles; the timed calls use keys 3, 4, ...
    (compile_s,), _ = timed_calls(lambda i: step(params, batch, jax.random.key(2 + i)), 1)
    times, _ = timed_calls(lambda i: step(params, batch, jax.random.key(3 + i)), args.steps)
    times.sort()
    med = times[len(times) // 2]
    print(f"device={jax.devices()[0].device_kind} config={args.config} "
          f"params={param_count(config) / 1e6:.1f}M batch={args.batch} dtype={args.dtype}")
    print(f"compile_s={compile_s:.1f} fwd_bwd_s_per_step(median of {args.steps})={med:.3f} "
          f"tokens_per_s={args.batch * n / med:.0f} examples_per_s={args.batch / med:.2f}")


if __name__ == "__main__":
    main()
