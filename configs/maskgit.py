"""MaskGIT (Chang et al. 2022) as a row of the unified framework (eMIGM paper, Table 1).

Discrete VQ tokens (16x16 grid over a 1024-code codebook) with a categorical head; exactly
ceil(N * gamma(t)) tokens masked uniformly without replacement with the cosine schedule,
w = 1, a single bidirectional transformer (``model.arch='single'``). Sampling: 8 steps,
confidence order with Gumbel noise annealed linearly from ``choice_temperature`` = 4.5.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "maskgit_256"
    m = c.model
    m.arch, m.head, m.vocab_size = "single", "categorical", 1024
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 768, 12, 12, 12
    m.latent_channels = 1
    m.cfg_mode = "fake_class"
    k = c.mask
    k.distribution, k.schedule, k.weight = "uniform_count", "cosine", "one"
    k.t_min, k.t_per, k.min_masked = 0.0, "sample", 1
    c.train.label_smoothing = 0.1
    c.tokenizer.name, c.tokenizer.scale = "vq", 1.0
    s = c.sample
    s.num_iter, s.schedule, s.order = 8, "cosine", "confidence"
    s.choice_temperature = 4.5
    s.cfg_scale, s.cfg_t_min, s.cfg_t_max = 1.0, 0.0, 1.0
    c.sample_presets = {}
    return c
