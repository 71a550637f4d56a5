"""AR decoding cost per token vs position: KV cache vs recomputing the prefix.

Usage:
  python benchmarks/ar_decode.py                 # width 256, 4 LLaMA blocks, 16x16 = 256 tokens
  python benchmarks/ar_decode.py --batch=8 --repeats=20

For positions i in a spread over 0..N-1 it times (random weights, compiled ahead, median of
``--repeats`` calls after a warm-up):
  * cached: one ``ARGenerator.decode`` call at index i (one token through every block,
    attention over the static-size cache): the per-token cost of ``emigm_jax.ar_sampling``;
  * prefix: the causal pass over the i + 1 tokens of sequence indices 0..i (what decoding
    without a cache recomputes for token i; compiled per length).
Then the whole sampler of ``configs/digits_ar.py`` (64 tokens), KV-cached vs uncached
(a full causal pass per step), ``--skip_whole`` to leave it out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from emigm_jax.sampling import ar as ar_sampling  # noqa: E402
from emigm_jax.models import build_model, param_count, random_params  # noqa: E402
from emigm_jax.models.ar import init_cache  # noqa: E402
from timing import timed_calls  # noqa: E402  (this folder, the script's sys.path[1])


def bench_config():
    from configs import digits_ar  # pylint: disable=import-outside-toplevel
    c = digits_ar.get_config()
    m = c.model
    m.width, m.enc_depth, m.num_heads = 256, 4, 4
    m.image_size, m.vocab_size, m.num_classes = 16, 1024, 1000
    c.sample.cfg_scale = 1.0
    return c


def timed(fn, *args, repeats: int) -> float:
    return statistics.median(timed_calls(lambda i: fn(*args), repeats, warmup=1)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip_whole", action="store_true")
    ap.add_argument("--skip_positions", action="store_true")
    args = ap.parse_args()
    c = bench_config()
    model, params = build_model(c), random_params(c)
    n, b = 256, args.batch
    labels = jnp.arange(b, dtype=jnp.int32)
    prev = jnp.zeros((b,), jnp.int32)
    caches = init_cache(model, b)
    decode = jax.jit(lambda p, t, l, i, cc: model.apply({"params": p}, t, l, i, cc,
                                                        method="decode")[0])

    print(f"AR model: {param_count(c):,} params, N={n}, batch {b}, "
          f"{jax.devices()[0].device_kind}")
    print("| position i | cached decode ms/token | prefix recompute ms/token |")
    print("|---|---|---|")
    for i in () if args.skip_positions else (0, 63, 127, 191, 255):
        t_cache = timed(decode, params, prev, labels, jnp.int32(i), caches,
                        repeats=args.repeats)
        toks = jnp.zeros((b, i + 1), jnp.int32)
        pre = jax.jit(lambda p, t, l: model.apply({"params": p}, t, l)[:, -1])
        t_pre = timed(pre, params, toks, labels, repeats=args.repeats)
        print(f"| {i} | {1e3 * t_cache:.2f} | {1e3 * t_pre:.2f} |", flush=True)
    if args.skip_whole:
        return
    from configs import digits_ar  # pylint: disable=import-outside-toplevel
    small = digits_ar.get_config()
    small_params = random_params(small)
    for cached in (True, False):
        fn = ar_sampling.make_ar_sampler(small, cached=cached)
        t = timed(fn, small_params, labels % 10, jax.random.key(0), repeats=3)
        print(f"digits_ar sampler (64 tokens, CFG {small.sample.cfg_scale}), "
              f"{'KV-cached' if cached else 'uncached (full pass per step)'}: {t:.3f} s for "
              f"{b} images", flush=True)


if __name__ == "__main__":
    main()
