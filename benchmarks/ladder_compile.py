"""Compile-time cost of the work-proportional ladders on the test suite's tiny config.

    python -m benchmarks.ladder_compile none   # full capacity only
    python -m benchmarks.ladder_compile enc2   # encoder rungs (1/4, 1/2, full), loss off
    python -m benchmarks.ladder_compile enc    # default encoder ladder, loss off
    python -m benchmarks.ladder_compile loss   # encoder off, default loss ladder
    python -m benchmarks.ladder_compile both   # the shipped defaults

Run from the repository root (the test suite's tiny config comes from ``tests.conftest``).
Prints trace and compile seconds of ``jax.jit(jax.value_and_grad(loss_fn))``.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp

from emigm_jax import losses
from emigm_jax.models import init_params
from tests.conftest import tiny_config


def main(variant: str) -> None:
    c = tiny_config(ladders=True)
    if variant in ("none", "loss", "enc2"):
        c.model.encoder_buckets = (0.25, 0.5) if variant == "enc2" else ()
    if variant in ("none", "enc", "enc2"):
        c.model.loss_buckets = ()
    params = init_params(c, jax.random.key(0))
    batch = {"tokens": jnp.zeros((4, 16, 3)), "label": jnp.zeros((4,), jnp.int32)}
    f = jax.jit(jax.value_and_grad(lambda p, r: losses.loss_fn(p, batch, r, c)[0]))
    t0 = time.perf_counter()
    lowered = f.lower(params, jax.random.key(0))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    print(f"{variant}: encoder_buckets={tuple(c.model.encoder_buckets)} "
          f"loss_buckets={tuple(c.model.loss_buckets)} trace {t1 - t0:.1f}s "
          f"compile {t2 - t1:.1f}s; load {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "both")
