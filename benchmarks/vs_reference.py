"""Side by side with the official PyTorch eMIGM code: same config, weights, threads, process.

    python benchmarks/vs_reference.py --reference_dir=/path/to/ML-GSAI/eMIGM [--iter128]
    python benchmarks/vs_reference.py --reference_dir=... --separate   # one process per side

Needs torch and timm (the reference's ``models/emigm.py`` imports timm's ``Block``; e.g.
``pip install timm`` or ``--extra_path`` to a folder holding it). The reference checkout is
imported, never copied: only its GPU-only calls are stubbed (``Tensor.cuda`` and
``device='cuda'`` become the CPU). Both run fp32 with the same thread count (CPU affinity of
the process, ``torch.set_num_threads``). Random weights are drawn for the reference model
(N(0, 0.02) on every tensor, so the zero-initialised head layers do real work) and converted
to ours with ``emigm_jax.convert.emigm.convert_weights``.

Timed, in one process, the two sides taking turns (``--reps`` runs each, the fastest kept):
the train step at batch 8 (loss, backward, clip, AdamW, EMA) and the 16-iteration preset on 8
images (``--iter128``: the 128-iteration preset once more). Printed:
both times and their ratio (ours / reference), executed FLOPs per image and achieved FLOP/s
next to a 2048^3 XLA matmul measured in the same run. Both train steps see the same mask: the
recipe's expected masked count per image (``--train_masked``), in the same positions (the
reference's ``random_masking`` is replaced by that mask; ours takes it as the host's draw), so
the time of one step stands for the mean step: both sides' work is linear in the count.

FLOP accounting. Reference: forward hooks on every ``nn.Linear`` (2 * rows * in * out) and on
every transformer block (attention matmuls 4 * B * T^2 * D), i.e. the token counts its calls
actually saw. Ours: the matmul FLOPs (``plan.hlo.matmul_flops`` of the lowered HLO: dots
only, as the hooks count) of each branch the run took (encoder rung, last-block query rung
and batch of each step, head rows of each call), lowered one by one, multiplied by how often the
run took it (a compiled scan or switch is counted once by XLA, so the whole program's count
would not be the executed work). Training FLOPs are 3x the forward count (backward = 2x).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference_dir", required=True, help="checkout of ML-GSAI/eMIGM")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "emigm_xs_256.py"))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--batch", type=int, default=8, help="train batch")
    ap.add_argument("--images", type=int, default=8, help="images sampled per preset")
    ap.add_argument("--iter128", action="store_true", help="also the many-step preset, once")
    ap.add_argument("--extra_path", default="", help="folder prepended to sys.path (timm)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: train,sample")
    ap.add_argument("--side", default="both", choices=("both", "ours", "reference"),
                    help="time one side only (with --json: its rows for --separate)")
    ap.add_argument("--separate", action="store_true",
                    help="run each side in its own process, one after the other")
    ap.add_argument("--json", default="", help="write this process's rows here")
    ap.add_argument("--reps", type=int, default=2,
                    help="timed runs of each side, taking turns (the 128-iteration preset: 1)")
    ap.add_argument("--train_masked", type=int, default=0,
                    help="masked tokens per image in the timed train steps (both sides); "
                         "0: the recipe's expected count")
    return ap.parse_args()


ARGS = parse_args()
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])  # before any pool
if ARGS.extra_path:
    sys.path.insert(0, ARGS.extra_path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from timing import matmul_peak_flops, timed_calls  # noqa: E402  (this folder)
from train_step import expected_masked, fixed_mask, with_host_mask  # noqa: E402  (a script)
from emigm_jax.config_files import load_config  # noqa: E402
from emigm_jax import sampling, train  # noqa: E402
from emigm_jax import sharding as shd  # noqa: E402
from emigm_jax.buckets import rung_at  # noqa: E402
from emigm_jax.convert.emigm import convert_weights  # noqa: E402
from emigm_jax.diffusion import dpm_solver  # noqa: E402
from emigm_jax.host_memory import use_huge_pages  # noqa: E402
from emigm_jax.models import (build_model, encoder_ladder, init_params, loss_ladder,  # noqa: E402
                              seq_len, token_dim)
from emigm_jax.models.transformer import ReadRows  # noqa: E402
from emigm_jax.plan.hlo import matmul_flops  # noqa: E402

torch.set_num_threads(ARGS.threads)


# ------------------------------------------------------------------ reference (imported)
def import_reference(ref_dir: str):
    """The reference's ``models.emigm`` module with its CUDA calls pointed at the CPU."""
    sys.path.insert(0, ref_dir)
    torch.Tensor.cuda = lambda self, *a, **k: self
    linspace = torch.linspace

    def cpu_linspace(*a, **k):
        k.pop("device", None)
        return linspace(*a, **k)

    torch.linspace = cpu_linspace
    from models import emigm  # pylint: disable=import-outside-toplevel
    return emigm


def reference_model(emigm, config, num_iter_steps: int):
    m, s = config.model, config.sample
    model = emigm.eMIGM(
        img_size=m.image_size, vae_stride=m.latent_stride, patch_size=m.patch_size,
        encoder_embed_dim=m.width, encoder_depth=m.enc_depth, encoder_num_heads=m.num_heads,
        decoder_embed_dim=m.width, decoder_depth=m.dec_depth, decoder_num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, vae_embed_dim=m.latent_channels, label_drop_prob=m.label_drop_prob,
        use_unsup_cfg=True, cfg_t_min=s.cfg_t_min, cfg_t_max=s.cfg_t_max,
        class_num=m.num_classes, attn_dropout=m.attn_dropout, proj_dropout=m.proj_dropout,
        buffer_size=m.buffer_size, diffloss_d=m.head_depth, diffloss_w=m.head_width,
        mask_strategy=config.mask.schedule, clamp_t_min=config.mask.t_min,
        num_sampling_steps=str(num_iter_steps), sampling_algo="dpm-solver",
        diffusion_batch_mul=m.diffusion_batch_mul)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 or p.numel() > 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model


class FlopCounter:
    """Matmul FLOPs the reference's calls executed, from their actual shapes."""

    def __init__(self, model, blocks):
        self.flops = 0.0
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.register_forward_hook(self._linear)
        for blk in blocks:
            blk.register_forward_hook(self._attention)

    def _linear(self, mod, inp, _out):
        rows = inp[0].numel() // mod.in_features
        self.flops += 2.0 * rows * mod.in_features * mod.out_features

    def _attention(self, _mod, inp, _out):
        b, t, d = inp[0].shape
        self.flops += 4.0 * b * t * t * d


def reference_train_step(model, config, batch: int):
    """Returns a closure doing one step as the reference's engine does (fp32, no scaler)."""
    from util.misc import add_weight_decay  # pylint: disable=import-outside-toplevel
    o = config.optim
    opt = torch.optim.AdamW(add_weight_decay(model, o.weight_decay), lr=1e-4, betas=(o.b1, o.b2))
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(1)
    m = config.model
    side = m.image_size // m.latent_stride
    x = torch.randn((batch, m.latent_channels, side, side), generator=gen)
    labels = torch.randint(0, m.num_classes, (batch,), generator=gen)

    def step():
        model.train()
        loss = model(x, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(o.ema_decay).add_(p, alpha=1 - o.ema_decay)
        return float(loss)
    return step


def interleaved(ref_fn, ours_fn, reps: int):
    """(reference's last output, ours, reference's fastest s, ours fastest s): the two run
    turn about, ``reps`` times each, so a slow spell of the shared machine hits both; the
    fastest run of each is the least disturbed one. A side given as None is not run (nan)."""
    t_ref, t_ours, out_ref, out_ours = [], [], None, None
    for _ in range(reps):
        if ref_fn is not None:
            (t,), out_ref = timed_calls(lambda i: ref_fn(), 1)
            t_ref.append(t)
        if ours_fn is not None:
            (t,), out_ours = timed_calls(lambda i: ours_fn(), 1)
            t_ours.append(t)
    print(f"  reference runs {[round(t, 2) for t in t_ref]} s; ours {[round(t, 2) for t in t_ours]} s")
    return out_ref, out_ours, min(t_ref, default=math.nan), min(t_ours, default=math.nan)


def run_sides_apart(args) -> None:
    """``--separate``: each side in its own process, one after the other, then one table.

    Why: on the development VM, our XLA step right after the reference's torch step in the
    same process runs ~1.5-2x slower (its page faults cost 4-5x more system time: the memory
    torch just freed is handed back to the host and faulted in again), so in one process the
    order of the calls would decide the result."""
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        parts = {}
        for side in ("reference", "ours"):
            out = os.path.join(tmp, side + ".json")
            subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                            f"--side={side}", f"--json={out}"], check=True)
            with open(out, encoding="utf-8") as f:
                parts[side] = json.load(f)
    ref_rows = {r[0]: r for r in parts["reference"]["rows"]}
    rows = [(name, ref_rows[name][1], t_ours, ref_rows[name][3], f_ours)
            for name, _, t_ours, _, f_ours in parts["ours"]["rows"]]
    report(rows, parts["ours"]["peak"])


# ------------------------------------------------------------------------------- ours
def cost_flops(fn, *args) -> float:
    """Matmul FLOPs of one call (dots in the lowered HLO, no compile): the same quantity the
    reference's hooks count; XLA's ``cost_analysis`` would add ~3% of elementwise work."""
    return matmul_flops(jax.jit(fn).lower(*args).as_text(dialect="hlo"))


@functools.lru_cache(maxsize=None)
def _transformer_flops(cfg_json: str, cap: int, batch: int, read: int = 0) -> float:
    """One transformer pass with the encoder at ``cap`` slots and, when ``read`` > 0, the
    last decoder block on ``read`` query rows (``ReadRows``)."""
    config = _CONFIGS[cfg_json]
    c = config.copy_and_resolve_references()
    c.model.encoder_capacity, c.model.encoder_buckets = cap, ()
    c.model.scan_layers = False  # XLA counts a scanned layer once; same FLOPs unrolled
    model = build_model(c)
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
    n, ch = seq_len(c), token_dim(c)
    rows = None
    if read:
        rows = ReadRows(jnp.zeros((batch, read), jnp.int32), jnp.int32(read), (read,))
    return cost_flops(lambda p, t, k, l: model.apply({"params": p}, t, k, l, read=rows,
                                                     method="transformer"),
                      shapes, jnp.zeros((batch, n, ch)), jnp.ones((batch, n), bool),
                      jnp.zeros((batch,), jnp.int32))


@functools.lru_cache(maxsize=None)
def _head_eval_flops(cfg_json: str, rows: int, shared_t: bool = True) -> float:
    """One head evaluation on ``rows`` rows: at one shared solver time (the sampler) or at a
    time per row (the training loss)."""
    config = _CONFIGS[cfg_json]
    model, ch, d = build_model(config), token_dim(config), config.model.width
    return cost_flops(lambda p, x, t, z: model.apply({"params": p}, x, t, z, method="head"),
                      _PARAMS[cfg_json], jnp.zeros((rows, ch)),
                      jnp.zeros((1 if shared_t else rows,)), jnp.zeros((rows, d)))


_CONFIGS, _PARAMS = {}, {}


def ours_sampling_flops(config, params, counts: np.ndarray, images: int) -> float:
    """Executed FLOPs per image of one sampler run with these per-step reveal counts."""
    key = config.to_json()
    _CONFIGS[key], _PARAMS[key] = config, params
    sc, n = config.sample, seq_len(config)
    guided = sampling.guided_steps(sc)
    rungs, read_rungs = encoder_ladder(config), sampling.read_ladder(sc, n)
    chunk, head_rungs = sampling.head_chunk(sc, n), sampling.head_ladder(sc, n)
    evals = dpm_solver.num_model_evals(int(sc.solver_steps), int(sc.solver_order),
                                       sc.solver_method)
    total, visible = 0.0, 0
    for k, count in enumerate(int(c) for c in counts):
        g = 2 if guided[k] else 1
        cap = rung_at(rungs, config.model.buffer_size + visible)
        read = rung_at(read_rungs, count) if read_rungs else 0
        total += _transformer_flops(key, cap, images * g, read)
        full = max(count - 1, 0) // chunk  # head calls: full chunks, then the remainder's rung
        last = rung_at(head_rungs, count - full * chunk)
        total += evals * (full * _head_eval_flops(key, images * chunk * g)
                          + _head_eval_flops(key, images * last * g))
        visible += count
    return total / images


def ours_train_flops(config, params, masked: int, batch: int) -> float:
    """Executed FLOPs per image of one train step (3x forward) that masked ``masked`` tokens:
    the rung ``train.StepDispatch`` runs (full capacity with ``train.ladders`` off)."""
    key = config.to_json()
    _CONFIGS[key], _PARAMS[key] = config, params
    m, n = config.model, seq_len(config)
    cap, rows = encoder_ladder(config)[-1], loss_ladder(config)[-1]
    if config.train.ladders:
        cap = rung_at(encoder_ladder(config), m.buffer_size + n - masked)
        rows = rung_at(loss_ladder(config), masked)
    fwd = (_transformer_flops(key, cap, batch)
           + _head_eval_flops(key, batch * rows * m.diffusion_batch_mul, False))
    return 3.0 * fwd / batch


def ours_train(config, params, batch: int, mask: np.ndarray):
    """A closure running our train step on ``mask`` (handed in as the host's draw would be),
    at the rung ``StepDispatch`` picks for it."""
    config.train.batch_size = batch
    config.optim.warmup_steps = 0
    mesh = shd.make_mesh(config.mesh)
    sched = train.lr_schedule(config, 1_000_000)
    opt = train.make_optimizer(config, sched)
    state, _, shardings = train.create_sharded_state(config, mesh, opt, lambda r: params)
    dispatch = train.make_step_dispatch(config, opt, sched, mesh, shardings,
                                        shd.to_host(state.rng))
    rng = np.random.default_rng(1)
    n, c = seq_len(config), token_dim(config)
    local = {"tokens": rng.normal(size=(batch, n, c)).astype(np.float32),
             "label": rng.integers(0, 10, batch).astype(np.int32)}
    rung = with_host_mask(dispatch, local, mask)
    step = dispatch.step_for(rung)
    data = shd.global_batch(local, mesh)
    box = [state]

    def run():
        box[0], mets = step(box[0], data)
        return jax.block_until_ready(mets)
    (first,), _ = timed_calls(lambda i: run(), 1)
    return run, first, rung


def reference_fixed_masking(model, mask: np.ndarray):
    """Makes the reference's ``random_masking`` return ``mask`` (its count, our positions)."""
    m = torch.from_numpy(mask.astype(np.float32))
    p = torch.full(m.shape, 0.5)
    model.random_masking = lambda x: (m, p, model.mask_strategy)


def main() -> None:
    args = ARGS
    if args.separate and args.side == "both":
        run_sides_apart(args)
        return
    ours_side, ref_side = args.side in ("both", "ours"), args.side in ("both", "reference")
    skip = set(filter(None, args.skip.split(",")))
    config = load_config(args.config)
    config.mesh.data, config.mesh.fsdp = -1, 1
    emigm = import_reference(args.reference_dir)
    print(f"threads {args.threads}; load {os.getloadavg()}; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    ref = reference_model(emigm, config, int(config.sample.solver_steps))
    params = jax.tree_util.tree_map(jnp.asarray, convert_weights(
        {k: v.detach().numpy() for k, v in ref.state_dict().items()}, config))
    counter = FlopCounter(ref, list(ref.encoder_blocks) + list(ref.decoder_blocks))
    peak = matmul_peak_flops()
    print(f"XLA 2048^3 fp32 matmul: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    if "train" not in skip:
        masked = args.train_masked or expected_masked(config)
        mask = fixed_mask(args.batch, seq_len(config), masked)
        print(f"train steps mask {masked} of {seq_len(config)} tokens per image (both sides)")
        step_ref, run, f_ours = None, None, math.nan
        if ref_side:
            reference_fixed_masking(ref, mask)
            step_ref = reference_train_step(ref, config, args.batch)
            step_ref()  # warm-up
        if ours_side:
            run, first, rung = ours_train(config.copy_and_resolve_references(), params,
                                          args.batch, mask)
            run()
            print(f"ours: first step incl. compile {first:.1f}s at {rung}")
            f_ours = ours_train_flops(config, params, masked, args.batch)
        counter.flops = 0.0
        _, _, t_ref, t_ours = interleaved(step_ref, run, args.reps)
        f_ref = 3.0 * counter.flops / args.batch / args.reps if ref_side else math.nan
        print(f"reference train step {t_ref:.2f}s, {f_ref / 1e9:.1f} GFLOP/image; load "
              f"{os.getloadavg()}", flush=True)
        print(f"train: reference {t_ref:.2f}s ours {t_ours:.2f}s", flush=True)
        rows.append(("train step, batch %d" % args.batch, t_ref, t_ours, f_ref, f_ours))
    presets = [("16-iteration preset", {})]
    if args.iter128:
        name, over = next(iter(config.sample_presets.items()))
        presets.append((f"{name} preset", dict(over)))
    if "sample" not in skip:
        for title, over in presets:
            rows.append(sample_row(ref, counter, config, params, title, over, args.images,
                                   1 if over else args.reps, ours_side, ref_side))
    if args.json:
        import json
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "peak": peak}, f)
    report(rows, peak)


def sample_row(ref, counter, config, params, title, over, images, reps, ours_side=True,
               ref_side=True):
    c = config.copy_and_resolve_references()
    for k, v in over.items():
        c.sample[k] = v
    s = c.sample
    ref.cfg_t_min, ref.cfg_t_max = s.cfg_t_min, s.cfg_t_max
    ref.diffloss.num_sampling_steps = str(s.solver_steps)
    ref.eval()
    labels = torch.arange(images) % c.model.num_classes
    jl = jnp.asarray(labels.numpy(), jnp.int32)
    fn = sampling.make_sampler(c)
    if ours_side:
        (first,), (_, info) = timed_calls(lambda i: fn(params, jl, jax.random.key(0)), 1)
        print(f"ours {title}: first call incl. compile {first:.1f}s; reveal "
              f"counts {np.asarray(info['reveal_counts']).tolist()}")

    def ref_call():
        with torch.no_grad():
            return ref.sample_tokens(images, num_iter=s.num_iter, cfg=s.cfg_scale,
                                     cfg_schedule=s.cfg_schedule, labels=labels)

    counter.flops = 0.0
    _, out, t_ref, t_ours = interleaved(
        ref_call if ref_side else None,
        (lambda: jax.block_until_ready(fn(params, jl, jax.random.key(1)))) if ours_side else None,
        reps)
    f_ref = counter.flops / images / reps if ref_side else math.nan
    print(f"reference {title}: {t_ref / images:.2f} s/image, {f_ref / 1e9:.1f} GFLOP/image",
          flush=True)
    print(f"{title}: reference {t_ref / images:.2f} s/image ours {t_ours / images:.2f} s/image",
          flush=True)
    f_ours = (ours_sampling_flops(c, params, np.asarray(out[1]["reveal_counts"]), images)
              if ours_side else math.nan)
    return (f"{title}, {images} images (per image)", t_ref / images, t_ours / images, f_ref,
            f_ours)


def report(rows, peak):
    print(f"\nload {os.getloadavg()}")
    print("| work | reference s | ours s | ours/ref | ref GFLOP/img | ours GFLOP/img "
          "| ref GFLOP/s | ours GFLOP/s (% of XLA matmul) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t_ref, t_ours, f_ref, f_ours in rows:
        per = 1.0 if "per image" in name else ARGS.batch
        ach_o = f_ours * per / t_ours
        print(f"| {name} | {t_ref:.2f} | {t_ours:.2f} | {t_ours / t_ref:.2f}x | "
              f"{f_ref / 1e9:.1f} | {f_ours / 1e9:.1f} | {f_ref * per / t_ref / 1e9:.1f} | "
              f"{ach_o / 1e9:.1f} ({100 * ach_o / peak:.0f}%) |")


if __name__ == "__main__":
    use_huge_pages()  # as the main job runs (EMIGM_JAX_HUGE_PAGES=0: without)
    main()
