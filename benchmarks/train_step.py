"""Train-step throughput and model FLOPs utilisation (MFU).

Times the full jitted train step of ``emigm_jax.train`` (loss, backward, global-norm clip,
AdamW, EMA, non-finite guard) on random tokens with the config's shapes, on all local
devices (batch sharded over them). Reference case (``--preset=reference``):
eMIGM-XS-256, global batch 8, fp32, CPU.

    python benchmarks/train_step.py                          # the reference case
    python benchmarks/train_step.py --config=configs/digits.py --batch=128
    python benchmarks/train_step.py --config=configs/emigm_b_256.py --batch=256 \
        --dtype=bfloat16 --peak_tflops=989   # e.g. one H100 (dense bf16)

FLOP count (model FLOPs at full capacity, matmuls only, 2 per multiply-add; forward per
image, x3 for forward + backward; the work-proportional encoder and head loss execute less:
by default the step runs the full-capacity program these formulas describe; ``--ladders``
times the rung ``train.ladders`` runs for the recipe's mean mask, and the MFU then counts the
full-capacity FLOPs, i.e. it is an effective MFU):
  transformer block on T tokens of width D (MLP ratio r): 2*T*D^2*(4 + 2r) + 4*T^2*D
  encoder: enc_depth blocks on T_e = encoder_capacity (0 -> buffer + N) tokens
  decoder: dec_depth blocks on T_d = buffer + N tokens; z_proj 2*N*C*D; decoder_embed 2*T_e*D^2
  head, per row (N * diffusion_batch_mul rows): 2*C*W input + 2*(256*W + W^2) time MLP
      + 2*D*W cond + depth * 2*(3W^2 + 2W^2) res blocks + 2*(2W^2 + 2C*W) final layer
MFU = (3 * batch * forward FLOPs per image / step time) / peak FLOP/s. Peak is
``--peak_tflops`` when given, else the measured throughput of a 2048^3 float32 matmul on the
same devices (an attainable, not a datasheet, peak). XLA's own FLOP count of the compiled
step is printed next to the formula as a cross-check.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax import sharding as shd
from emigm_jax import train
from emigm_jax.config_files import load_config
from emigm_jax.host_memory import use_huge_pages
from emigm_jax.models import init_params, param_count, seq_len, token_dim
from emigm_jax.schedules import schedule_from_config
from timing import matmul_peak_flops, timed_calls  # this folder (the script's sys.path[0])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    return 2.0 * tokens * width ** 2 * (4 + 2 * mlp_ratio) + 4.0 * tokens ** 2 * width


def forward_flops_per_image(config) -> dict[str, float]:
    """Model FLOPs of one forward pass for one image, by component (formula above)."""
    m = config.model
    n, c, d, w = seq_len(config), token_dim(config), m.width, m.head_width
    t_d = m.buffer_size + n
    t_e = (m.encoder_capacity or t_d) if m.arch == "mae" else t_d
    rows = n * m.diffusion_batch_mul
    head_row = (2 * c * w + 2 * (256 * w + w * w) + 2 * d * w + m.head_depth * 2 * (3 * w * w + 2 * w * w)
                + 2 * (2 * w * w + 2 * c * w))
    return {
        "encoder": m.enc_depth * block_flops(t_e, d, m.mlp_ratio) + 2.0 * n * c * d,
        "decoder": m.dec_depth * block_flops(t_d, d, m.mlp_ratio) + 2.0 * t_e * d * d,
        "head": float(rows * head_row) if m.head == "diffusion" else 2.0 * n * d * m.vocab_size,
    }


def expected_masked(config, draws: int = 1_000_000) -> int:
    """E[masked tokens] of one training draw (the recipe's t law and mask schedule)."""
    mc = config.mask
    t = np.random.default_rng(0).uniform(mc.t_eps, 1.0 - mc.t_eps, draws)
    p = (1.0 - mc.p_eps) * np.maximum(t, mc.t_min) + mc.p_eps
    gamma = np.asarray(schedule_from_config(mc).gamma(jnp.asarray(p, jnp.float32)))
    return int(round(float(gamma.mean()) * seq_len(config)))


def fixed_mask(batch: int, n: int, masked: int, seed: int = 1) -> np.ndarray:
    """[B, N] bool: ``masked`` positions per row, each row its own random arrangement (the
    reference's batch-shared count)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) < masked for _ in range(batch)])


def with_host_mask(dispatch, batch: dict, mask: np.ndarray) -> "train.StepRung":
    """Puts ``mask`` into ``batch`` as the host's draw of the step would be and returns the
    rung ``dispatch`` runs for it (the full-capacity rung when the step draws its own)."""
    if dispatch.key_data is None:
        return train.StepRung()
    batch.update(mask=mask, mask_p=np.full((mask.shape[0],), 0.5, np.float32))
    return dispatch.rung(mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "emigm_xs_256.py"))
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--ladders", action="store_true",
                    help="time the rung train.ladders runs for a mask with the recipe's "
                         "expected masked count (model.encoder_buckets / loss_buckets); "
                         "default the full-capacity step")
    ap.add_argument("--peak_tflops", type=float, default=None,
                    help="device peak in TFLOP/s for MFU (default: measured matmul peak)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    config = load_config(args.config)
    config.train.batch_size = args.batch
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    config.train.ladders = args.ladders
    config.mesh.data, config.mesh.fsdp = -1, 1
    config.optim.warmup_steps = 0  # a non-zero lr, so the update is real work

    mesh = shd.make_mesh(config.mesh)
    shd.check_batch_size(args.batch, mesh)
    n, c = seq_len(config), token_dim(config)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.normal(size=(args.batch, n, c)).astype(np.float32),
             "label": rng.integers(0, config.model.num_classes, args.batch).astype(np.int32)}
    sched = train.lr_schedule(config, 1_000_000)
    opt = train.make_optimizer(config, sched)
    state, _, shardings = train.create_sharded_state(
        config, mesh, opt, lambda r: init_params(config, r))
    dispatch = train.make_step_dispatch(config, opt, sched, mesh, shardings,
                                        shd.to_host(state.rng))
    rung = train.StepRung()
    if args.ladders:
        masked = expected_masked(config)
        rung = with_host_mask(dispatch, batch, fixed_mask(args.batch, n, masked))
        print(f"mask {masked} of {n} tokens: {rung}")
    step = dispatch.step_for(rung)
    gbatch = shd.global_batch(batch, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float((cost or {}).get("flops", float("nan")))

    box = [state]  # the state threads through the calls; the first is the warm-up

    def call(_):
        box[0], metrics = step(box[0], gbatch)
        return metrics
    times, metrics = timed_calls(call, args.steps, warmup=1)
    step_s = float(np.median(times))

    parts = forward_flops_per_image(config)
    model_flops = 3.0 * args.batch * sum(parts.values())
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops()
    peak_src = "given" if args.peak_tflops else "measured fp32 matmul"
    dev = jax.devices()[0]
    result = {
        "config": os.path.relpath(args.config, ROOT), "params": param_count(config),
        "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
        "devices": f"{jax.device_count()} x {dev.device_kind} ({dev.platform})",
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "compile_s": compile_s, "step_s": step_s, "step_s_all": times,
        "examples_per_s": args.batch / step_s,
        "model_tflops_per_step": model_flops / 1e12,
        "flops_by_part_fwd_per_image": parts,
        "xla_tflops_per_step": xla_flops / 1e12,
        "achieved_tflops": model_flops / step_s / 1e12,
        "peak_tflops": peak / 1e12, "peak_source": peak_src,
        "mfu": model_flops / step_s / peak,
        "loss": float(metrics["loss"]),
    }
    print(f"{result['config']}: {result['params'] / 1e6:.2f}M params, batch {args.batch}, "
          f"{args.dtype}, {result['devices']}")
    print(f"  compile {compile_s:.1f}s; step {step_s * 1e3:.1f} ms (median of {args.steps}); "
          f"{result['examples_per_s']:.2f} examples/s")
    print(f"  model FLOPs/step {model_flops / 1e12:.3f} T (XLA count {xla_flops / 1e12:.3f} T); "
          f"achieved {result['achieved_tflops'] * 1e3:.1f} GFLOP/s")
    print(f"  peak {peak / 1e12 * 1e3:.1f} GFLOP/s ({peak_src}); MFU {100 * result['mfu']:.1f}%")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    use_huge_pages()  # as the main job runs (EMIGM_JAX_HUGE_PAGES=0: without)
    main()
