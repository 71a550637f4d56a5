"""How every benchmark script times a call and measures the attainable matmul peak.

One loop for all of them, so a table's "median of 5" or "fastest of 10" means the same thing
in every script: outputs are waited for inside the timed region (JAX dispatches
asynchronously, and an unwaited call only measures the dispatch), and warm-up calls (compile,
first-touch of buffers) stay outside it. The scripts are run as ``python benchmarks/<name>.py``,
which puts this folder on ``sys.path``; they import this module as ``timing``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def timed_calls(call: Callable[[int], Any], reps: int, warmup: int = 0) -> tuple[list[float], Any]:
    """Wall seconds of each of ``reps`` calls made after ``warmup`` untimed ones, and the last
    call's output.

    ``call(i)`` makes call number ``i`` (0, 1, ..., the warm-ups included), so a script can
    vary the key per call or thread a train state through a closure. Anything the call
    returns is passed to ``jax.block_until_ready`` (host values pass through unchanged).
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"timed_calls needs reps >= 1 and warmup >= 0, got reps={reps}, "
                         f"warmup={warmup}")
    out = None
    for i in range(warmup):
        out = jax.block_until_ready(call(i))
    times = []
    for i in range(warmup, warmup + reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(call(i))
        times.append(time.perf_counter() - t0)
    return times, out


def matmul_peak_flops(n: int = 2048, chain: int = 10, repeats: int = 3) -> float:
    """Attainable float32 matmul FLOP/s on the default device: the fastest of ``repeats``
    programs, each a chain of ``chain`` n x n x n products (one program, so no dispatch gap
    between the products counts against the peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / math.sqrt(n)
    products = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda i, x: x @ b, a))
    times, _ = timed_calls(lambda i: products(a, b), repeats, warmup=1)
    return 2.0 * n ** 3 * chain / min(times)
