"""eMIGM model sizes and evaluation presets (eMIGM paper, Tables 6-7).

One table, one builder: each ``configs/emigm_<size>_<res>.py`` is a one-line call to
``emigm_config``, so a number lives in exactly one place.
"""
from configs import base

# size: (width, encoder/decoder depth, heads, head @256 (blocks, width), head @512, batch)
SIZES = {
    "xs": (448, 10, 8, (3, 1024), (6, 1280), 1024),
    "s": (512, 12, 8, (3, 1024), (6, 1280), 1024),
    "b": (768, 12, 12, (6, 1024), (8, 1280), 2048),
    "l": (1024, 16, 16, (8, 1280), (8, 1280), 2048),
    "h": (1280, 20, 16, (12, 1536), None, 2048),
}
# CFG intervals of the reference evaluation scripts: 16-iteration preset and the many-step one.
INTERVAL_16 = {256: {"xs": (0.1, 0.3), "s": (0.1, 0.3), "b": (0.1, 0.3), "l": (0.1, 0.3),
                     "h": (0.2, 0.4)},
               512: {k: (0.15, 0.35) for k in ("xs", "s", "b", "l")}}
MANY_STEPS = {256: (128, {"xs": (0.18, 0.6), "s": (0.18, 0.6), "b": (0.05, 0.4),
                          "l": (0.18, 0.6), "h": (0.3, 0.7)}),
              512: (64, {k: (0.25, 0.5) for k in ("xs", "s", "b", "l")})}
TOKENIZERS = {256: ("kl16", 16, 16, 0.2325), 512: ("dcae_f32c32", 32, 32, 0.3189)}


def emigm_config(size: str, resolution: int):
    if size not in SIZES or (resolution == 512 and SIZES[size][4] is None) or \
            resolution not in TOKENIZERS:
        raise ValueError(f"no eMIGM config for size={size!r} at {resolution}px")
    width, depth, heads, head256, head512, batch = SIZES[size]
    c = base.get_config()
    c.name = f"emigm_{size}_{resolution}"
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = width, depth, depth, heads
    m.head_depth, m.head_width = head256 if resolution == 256 else head512
    m.image_size = c.data.image_size = resolution
    tok, m.latent_stride, m.latent_channels, scale = TOKENIZERS[resolution]
    c.tokenizer.name, c.tokenizer.scale = tok, scale
    c.train.batch_size = batch
    # Layers as one nn.scan: compile time independent of depth, and no slower to run (XS-256
    # train step, batch 8, CPU: 44.9 CPU-s per step scanned vs 46.7 unrolled, compile 37.5 vs
    # 60.6 CPU-s; benchmarks/RESULTS.md). Checkpoints of either layout load into the other.
    m.scan_layers = True
    # Paper preset: 16 iterations, DPM-Solver++ 8 steps [3,3,2], constant CFG 4.0 on an interval.
    s = c.sample
    s.num_iter, s.solver_steps, s.cfg_scale, s.cfg_schedule = 16, 8, 4.0, "constant"
    s.cfg_t_min, s.cfg_t_max = INTERVAL_16[resolution][size]
    iters, intervals = MANY_STEPS[resolution]
    lo, hi = intervals[size]
    c.sample_presets = {f"iter{iters}": dict(num_iter=iters, solver_steps=14, cfg_t_min=lo,
                                              cfg_t_max=hi)}
    return c
