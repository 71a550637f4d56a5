"""The embedded default: eMIGM on scikit-learn's 8x8 digits, tiny enough for 2 CPU cores.

The recipe is eMIGM's (eMIGM paper, Secs. 3-5): Bernoulli masking with the exp schedule and
t_min = 0.2, the MAE encoder-decoder, a per-token diffusion head (iDDPM hybrid loss), CFG with
the mask token as the unconditional class, interval CFG at sampling with DPM-Solver++.
What changes is the size (README command 1 must train, sample and score in minutes on two
CPU cores): one 4-channel token per 2x2 patch (16 tokens), width 64, 2+2 blocks, a 3x64
head (0.31M parameters), no dropout, 3600 steps of batch 128 (321 epochs), a larger peak lr
(2e-3; small models and batches tolerate it) with a short warmup and a cosine decay to 0, and
a faster EMA (0.99: 0.9999 would average over far more steps than the run has).
The step is sized for 2 cores: one head noise draw per token (diffusion_batch_mul 1; the
head's rows are most of this model's work, and 2 draws cost 1.2-1.3x the step without a
better FD at 2400 steps, where 1.5x the steps at one draw gain 0.04) and no capacity ladders
(with 16 tokens their branches cost more than they save).
Sampling: 16 mask-prediction steps, DPM-Solver++ (8 solver steps), CFG 1.25 with the mask
token as the unconditional class on the interval (0.1, 0.6] -> NFE 24 (CFG 1.5 gives ~0.03
more FD and ~0.005 more class accuracy).
Measured: benchmarks/RESULTS.md, "Main job on the embedded default" (real images: accuracy
0.972, FD floor 0.46).

    python -m emigm_jax.main --config=configs/digits.py --workdir=runs/digits
"""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "digits"
    c.seed = 0

    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 64, 2, 2, 4
    m.mlp_ratio = 4.0
    m.buffer_size = 4
    m.num_classes = 10
    m.image_size, m.latent_stride, m.patch_size, m.latent_channels = 8, 1, 2, 1
    m.attn_dropout = m.proj_dropout = 0.0
    m.head_depth, m.head_width = 3, 64
    m.diffusion_batch_mul = 1
    m.encoder_buckets = m.loss_buckets = ()  # 16 tokens: the ladders cost more than they save
    m.dtype = "float32"

    # Masking: the eMIGM defaults of base.py (bernoulli, exp, t_min 0.2, w = 1).

    o = c.optim
    o.base_lr = 4e-3            # peak lr = base_lr * 128 / 256 = 2e-3
    o.warmup_epochs = 0
    o.warmup_steps = 50         # overrides warmup_epochs when >= 0
    o.decay = "cosine"          # to 0 at the last step
    o.ema_decay = 0.99

    t = c.train
    t.batch_size = 128
    t.num_steps = 3600
    t.log_every = 100
    t.sample_every = 0
    t.progress = True

    d = c.data
    d.source = "digits"
    d.path = ""
    d.image_size = 8
    d.num_train_images = 1437   # 80% of 1797 (the split below)
    d.test_fraction = 0.2
    d.split_seed = 0
    d.num_workers = 0

    c.tokenizer.name = "identity"
    c.tokenizer.path = ""
    c.tokenizer.scale = 1.0

    s = c.sample
    s.num_iter = 16
    s.head_sampler = "dpm_solver"
    s.solver_steps = 8
    s.solver_order = 3
    s.cfg_scale = 1.25
    s.cfg_schedule = "constant"
    s.cfg_t_min = 0.1
    s.cfg_t_max = 0.6
    s.batch_size = 500
    s.num_images = 500          # 50 per class for samples.npz and the score
    c.sample_presets = {}

    c.mesh.data, c.mesh.fsdp = -1, 1
    c.checkpoint.every_steps = 600
    c.checkpoint.keep = 2
    c.checkpoint.keep_every = 0
    c.checkpoint.async_save = True
    c.sweep.num_iters = (1, 2, 4, 8, 16)
    c.sweep.cfg_scales = (1.0, 3.0)
    return c
