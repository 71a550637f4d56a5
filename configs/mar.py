"""MAR (Li et al. 2024) as a row of the unified framework (eMIGM paper, Table 1), MAR-B size.

Masking: exactly ceil(N * gamma(t)) tokens uniformly without replacement, one t per sample,
no truncation; w = 1; diffusion head; a separate learned fake class for CFG (MAR keeps
``fake_latent`` and ``mask_token`` apart). Sampling: 64 iterations, cosine schedule, DDPM head
sampler with temperature, linear CFG schedule over the whole trajectory (MAR's defaults).
MAR draws its training mask ratio from a truncated normal; in this framework that choice is
expressed as the schedule gamma(t) with t uniform (paper Sec. 3 / App. A).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "mar_b_256"
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 768, 12, 12, 12
    m.head_depth, m.head_width = 6, 1024
    m.cfg_mode = "fake_class"
    k = c.mask
    k.distribution, k.schedule, k.weight = "uniform_count", "cosine", "one"
    k.t_min, k.t_per, k.min_masked = 0.0, "sample", 1
    c.train.batch_size = 2048
    s = c.sample
    s.num_iter, s.schedule = 64, "cosine"
    s.head_sampler, s.ddpm_steps, s.temperature = "ddpm", 100, 1.0
    s.cfg_scale, s.cfg_schedule, s.cfg_t_min, s.cfg_t_max = 2.9, "linear", 0.0, 1.0
    c.sample_presets = {}
    return c
