"""Sampling speed: images/s, seconds per NFE, per-step times, achieved GFLOP/s vs matmul peak.

Usage:
  python benchmarks/sample.py                          # small16, small64, xs
  python benchmarks/sample.py --cases=small16,small64  # small config only (fast)
  python benchmarks/sample.py --cases=xs --batch=8     # the reference case below

Cases (random weights; the numbers do not depend on the values):
  small16  width 256, 4+4 blocks, head 3 x 256; 16 steps, DPM-Solver 8 steps [3,3,2],
           CFG 4.0 on (0.1, 0.3] (NFE 19): the eMIGM 16-step preset on a small model
  small64  same model; 64 steps, DPM-Solver 14 steps, CFG 4.0 on (0.25, 0.5] (NFE 80)
  xs       eMIGM-XS-256 (configs/emigm_xs_256.py), 8 images, its 16-step preset, fp32

Timing excludes compilation (the program is compiled ahead of time with
``jax.jit(...).lower(...).compile()``; its compile time is printed separately). Seconds per
NFE = seconds per batch / NFE, NFE being network forward passes per image.

FLOPs are counted, not estimated from wall time: XLA's ``cost_analysis()`` of the two
networks as compiled (the transformer at batch 1, the head per token row), multiplied by the
calls the run made: the transformer once per step at batch B (2B on CFG steps), the head
``solver evals x rows`` per step, rows = B x ``sampling.head_rows(count)`` (full chunks, then
the remainder's rung; x 2 on CFG steps) with the per-step counts the run returned. (A
``cost_analysis()`` of the whole sampler would count each ``lax.scan`` / loop body once.)
The transformer count is taken at full capacity (buffer + N encoder slots, every row of the
last decoder block), an upper bound: the work-proportional encoder and the last block's
read rows run smaller rungs on most steps; ``benchmarks/vs_reference.py`` counts the rungs a
run actually took.

Peak: a 2048 x 2048 float32 matmul chain in the same process, measured at the start and right
after each case's timed runs (on a shared CPU the available throughput drifts).

Per-step times come from a second compile of the same sampler whose transformer call is
bracketed by ordered ``io_callback`` time stamps: "transformer" is the network pass (incl.
the unconditional half on CFG steps), "rest" is the head, reveal and bookkeeping until the
next step's transformer starts.
"""
from __future__ import annotations

import argparse
import os
import time


import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from emigm_jax import sampling
from emigm_jax.diffusion import dpm_solver
from emigm_jax.config_files import load_config
from emigm_jax.host_memory import use_huge_pages
from emigm_jax.models import (build_model, dummy_inputs, param_count, random_params,
                              seq_len, token_dim)
from timing import matmul_peak_flops, timed_calls  # this folder (the script's sys.path[0])


def small_config():
    c = load_config("base")
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 256, 4, 4, 4
    m.head_depth, m.head_width = 3, 256
    m.attn_dropout = m.proj_dropout = 0.0
    return c


def case_config(name: str):
    if name == "small16":
        return small_config()
    if name == "small64":
        c = small_config()
        c.sample.update(dict(num_iter=64, solver_steps=14, cfg_t_min=0.25, cfg_t_max=0.5))
        return c
    if name == "xs":
        return load_config("emigm_xs_256")
    raise ValueError(f"unknown case {name!r}; expected small16, small64 or xs")


def flops_per_call(config, params):
    """(transformer FLOPs per image, head FLOPs per token row) from XLA's cost_analysis."""
    config = config.copy_and_resolve_references()
    config.model.encoder_buckets = ()  # full capacity: one branch, an upper bound
    model = build_model(config)
    tokens, mask, labels = dummy_inputs(config, 1)
    tr = jax.jit(lambda p, t, m, l: model.apply({"params": p}, t, m, l, method="transformer"))
    t_flops = tr.lower(params, tokens, mask, labels).compile().cost_analysis()["flops"]
    rows = 256
    x = jnp.zeros((rows, token_dim(config)), jnp.float32)
    z = jnp.zeros((rows, config.model.width), jnp.float32)
    hd = jax.jit(lambda p, x, t, z: model.apply({"params": p}, x, t, z, method="head"))
    h_flops = hd.lower(params, x, jnp.zeros((rows,)), z).compile().cost_analysis()["flops"]
    return float(t_flops), float(h_flops) / rows


def run_flops(config, batch: int, counts, t_flops: float, h_row: float) -> float:
    sc = config.sample
    guided = sampling.guided_steps(sc).astype(np.float64)
    n = seq_len(config)
    per_sample = np.asarray([sampling.head_rows(sc, n, int(k)) for k in counts], np.float64)
    evals = dpm_solver.num_model_evals(int(sc.solver_steps), int(sc.solver_order),
                                       sc.solver_method)
    rows = batch * per_sample * (1.0 + guided)
    return float(batch * (1.0 + guided).sum() * t_flops + evals * rows.sum() * h_row)


def per_step_times(config, params, labels, key):
    """Runs an instrumented copy once: (transformer s [K], rest s [K], compile s, counts)."""
    model = build_model(config)
    stamps = []

    def stamp(tag, _):
        stamps.append((int(tag), time.perf_counter()))
        return np.int32(0)

    def timed_transformer(p, tokens, mask, lab):
        spec = jax.ShapeDtypeStruct((), jnp.int32)
        d = io_callback(lambda x: stamp(0, x), spec, tokens.reshape(-1)[0], ordered=True)
        tokens = jnp.where(d == 12345, tokens + 1, tokens)  # data dependence on the stamp
        z = model.apply({"params": p}, tokens, mask, lab, method="transformer")
        d = io_callback(lambda x: stamp(1, x), spec, z.reshape(-1)[0], ordered=True)
        return jnp.where(d == 12345, z + 1, z)

    fn = sampling.make_sampler(config, timed_transformer)
    t0 = time.perf_counter()
    compiled = fn.lower(params, labels, key).compile()
    compile_s = time.perf_counter() - t0
    stamps.clear()
    out = compiled(params, labels, key)
    jax.block_until_ready(out)
    jax.effects_barrier()
    end = time.perf_counter()
    starts = np.array([t for tag, t in stamps if tag == 0])
    afters = np.array([t for tag, t in stamps if tag == 1])
    transformer = afters - starts
    rest = np.append(starts[1:], end) - afters
    return transformer, rest, compile_s, np.asarray(out[1]["reveal_counts"])


def bench_case(name: str, batch: int, repeats: int):
    config = case_config(name)
    sc = config.sample
    params = random_params(config)
    labels = jnp.arange(batch, dtype=jnp.int32) % config.model.num_classes
    key = jax.random.key(0)
    nfe = sampling.expected_nfe(sc)
    print(f"\n== {name}: params={param_count(config) / 1e6:.1f}M N={seq_len(config)} "
          f"batch={batch} steps={sc.num_iter} solver={sc.head_sampler}:{sc.solver_steps}x"
          f"{sc.solver_order} cfg={sc.cfg_scale} on ({sc.cfg_t_min}, {sc.cfg_t_max}] "
          f"NFE={nfe} head_chunk={sampling.head_chunk(sc, seq_len(config))} "
          f"dtype={config.model.dtype}", flush=True)

    t0 = time.perf_counter()
    compiled = sampling.make_sampler(config).lower(params, labels, key).compile()
    compile_s = time.perf_counter() - t0
    times, (_, info) = timed_calls(
        lambda i: compiled(params, labels, jax.random.fold_in(key, i)), repeats)
    sec = float(np.median(times))
    peak = matmul_peak_flops() / 1e9  # the CPU may be shared: measure it next to the timing
    assert int(info["nfe"]) == nfe and int(info["masked_left"]) == 0
    t_flops, h_row = flops_per_call(config, params)
    flops = run_flops(config, batch, info["reveal_counts"], t_flops, h_row)
    head_share = 1.0 - batch * (1.0 + sampling.guided_steps(sc)).sum() * t_flops / flops
    print(f"compile_s={compile_s:.1f} s_per_batch={sec:.2f} (median of {repeats}: "
          f"{', '.join(f'{t:.2f}' for t in times)}) images_per_s={batch / sec:.3f} "
          f"s_per_image={sec / batch:.3f} s_per_NFE={sec / nfe:.3f}")
    print(f"flops_per_image={flops / batch / 1e9:.1f}G (transformer {t_flops / 1e9:.2f}G per "
          f"pass, head {h_row / 1e6:.2f}M per token row; head share {100 * head_share:.0f}%) "
          f"achieved_GFLOP/s={flops / sec / 1e9:.1f} = {100 * flops / sec / 1e9 / peak:.0f}% "
          f"of the matmul peak measured right after ({peak:.1f})", flush=True)

    tr, rest, compile2, counts = per_step_times(config, params, labels, key)
    guided = sampling.guided_steps(sc)
    s_grid = sampling.time_grid(sc)[1:]
    k_all = len(tr)
    show = list(range(min(3, k_all))) + list(range(max(3, k_all - 3), k_all))
    print(f"per-step times (instrumented copy, compile {compile2:.1f}s):")
    print("  step      s  cfg  revealed  transformer_s  rest_s")
    for k in show:
        print(f"  {k:4d}  {s_grid[k]:.3f}  {'yes' if guided[k] else ' no'}  {counts[k]:8d}  "
              f"{tr[k]:13.3f}  {rest[k]:6.3f}")
    plain = ~guided
    print(f"  transformer_s on non-CFG steps: first {tr[plain][0]:.3f} last {tr[plain][-1]:.3f} "
          f"min {tr[plain].min():.3f} median {np.median(tr[plain]):.3f} max "
          f"{tr[plain].max():.3f}; on CFG steps median "
          f"{np.median(tr[guided]) if guided.any() else float('nan'):.3f}; "
          f"sum of steps {tr.sum() + rest.sum():.2f}s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="small16,small64,xs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"jax {jax.__version__} device={jax.devices()[0].device_kind} "
          f"cpus={os.cpu_count()} loadavg_before={os.getloadavg()}", flush=True)
    print(f"matmul_peak_GFLOP/s={matmul_peak_flops() / 1e9:.1f} (2048^2 f32, best of 3 chains "
          "of 10; measured again after each case's timing)", flush=True)
    for name in args.cases.split(","):
        bench_case(name, args.batch, args.repeats)
    print(f"\nloadavg_after={os.getloadavg()}")


if __name__ == "__main__":
    use_huge_pages()  # as the main job runs (EMIGM_JAX_HUGE_PAGES=0: without)
    main()
