"""Shared recipe of the discrete digits configs (digits_maskgit / _mdm / _di / _maskgil).

Not a config on its own: each of those files starts here and sets what its method changes.
Tokens are the pixels (64 tokens over the 17 values 0..16, ``emigm_jax.data.digits``), the
per-token conditional is the categorical head, and the data split, classifier score, sample
count, mesh and checkpointing are those of ``configs/digits.py``, so every discrete run
writes the same ``metrics.json`` / ``samples.npz`` as the continuous default.

Size: one bidirectional stack over 64 tokens plus one class prefix token (width 96, 3
blocks, 0.36M parameters) with CFG through a learned fake class (label drop 0.1), 500 steps
of batch 128 (45 epochs). Budget: the main job must train, sample and score in <= 10
minutes on two CPU cores (a width-96 MaskGIT reached 0.97 sample class accuracy after 300
steps while this was tuned).
"""
from configs import digits

PIXEL_LEVELS = 17  # pixel values 0..16; tests/test_digits.py checks it against the data


def discrete_digits_config(name: str):
    c = digits.get_config()
    c.name = name

    m = c.model
    m.arch, m.head, m.vocab_size = "single", "categorical", PIXEL_LEVELS
    m.block, m.pos_emb = "vit", "learned"
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 96, 3, 0, 4
    m.patch_size, m.latent_channels = 1, 1
    m.buffer_size = 1               # the class embedding as one prefix token
    m.cfg_mode = "fake_class"
    m.label_drop_prob = 0.1
    m.head_mlp = True

    k = c.mask
    k.t_min, k.t_per, k.min_masked = 0.0, "sample", 1

    o = c.optim
    o.base_lr = 2e-3                # lr 1e-3 at batch 128
    o.weight_decay = 0.02
    o.warmup_steps = 50
    o.ema_decay = 0.99
    o.decay = "constant"

    t = c.train
    t.batch_size = 128
    t.num_steps = 500
    t.log_every = 50
    c.checkpoint.every_steps = 300
    t.label_smoothing = 0.0

    s = c.sample
    s.num_iter = 8
    s.temperature = 1.0
    s.top_k, s.top_p = 0, 1.0
    s.cfg_scale, s.cfg_schedule, s.cfg_t_min, s.cfg_t_max = 1.0, "constant", 0.0, 1.0
    s.cfg_space = "logits"
    c.sample_presets = SAMPLE_PRESETS
    c.sweep.num_iters = (4, 8, 16)
    c.sweep.cfg_scales = (1.0,)
    return c


# The companion papers' sampler switches as named presets, for --sample_preset and for the
# trend study's sweeps (--config.sweep.presets; benchmarks/RESULTS.md gives the commands).
SAMPLE_PRESETS = {
    # mask schedules at sampling time (MaskGIL Table A.4, BAG Table 2)
    "linear": dict(schedule="linear"),
    "cosine": dict(schedule="cosine"),
    "arccos": dict(schedule="arccos"),
    "pow06": dict(schedule="pow", pow_rho=0.6),
    "root": dict(schedule="root"),
    "square": dict(schedule="square"),
    # token order / reveal rule (DI: confidence sampling vs Euler on the same network)
    "confidence": dict(order="confidence", reveal="count"),
    "euler": dict(order="random", reveal="euler"),
    "final_argmax": dict(final_argmax=True),
    "no_final_argmax": dict(final_argmax=False),
    # Gumbel noise on the confidence (DI, MaskGIT): linear anneal, constant, none
    "gumbel_linear": dict(choice_temperature=4.5, gumbel_anneal="linear"),
    "gumbel_const": dict(choice_temperature=4.5, gumbel_anneal="none"),
    "no_gumbel": dict(choice_temperature=0.0),
    # softmax temperature (DI: best ~0.8 for Euler, ~1.2 for confidence)
    "temp08": dict(temperature=0.8),
    "temp12": dict(temperature=1.2),
    # Bag of design choices (BAG section 2)
    "noise_reg": dict(noise_reg="abs_cos", noise_reg_scale=1.0),
    "differential": dict(diff_frac=0.75),
    "masked_z": dict(z_sampling="masked"),
    "recover_z": dict(z_sampling="recover"),
    "random_z1": dict(z_sampling="random", z_steps=1),
    "random_z2": dict(z_sampling="random", z_steps=2),
    "random_z4": dict(z_sampling="random", z_steps=4),
    "random_z8": dict(z_sampling="random", z_steps=8),
    # guided masked-Z scoring: the inversion CFG scale (0 = masked_z, no guidance pass)
    "masked_z_cfg1": dict(z_sampling="masked", z_cfg=1.0),
    "masked_z_cfg2": dict(z_sampling="masked", z_cfg=2.0),
    "masked_z_cfg3": dict(z_sampling="masked", z_cfg=3.0),
    # BAG's second-order momentum solver (Sec. 4.3)
    "momentum2": dict(mgt_solver="momentum2"),
    # DI trend 5: confidence sampling (count reveal) at softmax temperatures 0.8 / 1.0 / 1.2
    "confidence_temp08": dict(order="confidence", reveal="count", temperature=0.8),
    "confidence_temp12": dict(order="confidence", reveal="count", temperature=1.2),
}
