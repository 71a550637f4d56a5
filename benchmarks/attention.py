"""Attention on CPU: XLA's ``jax.nn.dot_product_attention`` against the head-major forms.

``emigm_jax.models.attention_ops.fused_attention`` runs ``head_major_attention`` on CPU for
float32, and its per-sample loop (``per_sample_attention``) in inference where
``per_sample_pays``. This times all three, forward and forward + backward, at the shapes of
eMIGM-XS-256's decoder (320 slots, 8 heads of 56) and checks they agree; the batch is the
sampler's (8 images x 2 for CFG) and the train step's (8).

    python benchmarks/attention.py
    python benchmarks/attention.py --batch=16 --length=320 --heads=8 --head_dim=56
"""
from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax.host_memory import use_huge_pages
from emigm_jax.models.attention_ops import head_major_attention, per_sample_attention
from timing import timed_calls  # this folder (the script's sys.path[0])


def fastest_ms(fn, *args, reps: int = 10) -> float:
    return 1e3 * min(timed_calls(lambda i: fn(*args), reps, warmup=1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--length", type=int, default=320)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=56)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; load {os.getloadavg()}")
    xla = functools.partial(jax.nn.dot_product_attention, implementation="xla")
    impls = {"xla": lambda q, k, v, m: xla(q, k, v, mask=m), "head-major": head_major_attention,
             "per-sample head-major": per_sample_attention}
    print("| batch | implementation | forward ms | forward + backward ms | max |diff| vs xla |")
    print("|---|---|---|---|---|")
    for b in args.batch:
        rs = np.random.RandomState(0)
        q, k, v = (jnp.asarray(rs.randn(b, args.length, args.heads, args.head_dim), jnp.float32)
                   for _ in range(3))
        mask = jnp.asarray(rs.rand(b, 1, 1, args.length) > 0.1)
        want = jax.jit(impls["xla"])(q, k, v, mask)
        for name, fn in impls.items():
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(jnp.sin(fn(q, k, v, m))),
                                    argnums=(0, 1, 2)))
            diff = float(jnp.abs(fwd(q, k, v, mask) - want).max())
            print(f"| {b} | {name} | {fastest_ms(fwd, q, k, v, mask):.1f} | "
                  f"{fastest_ms(grad, q, k, v, mask):.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    use_huge_pages()
    main()
