"""Masked diffusion model (MDM: Sahoo et al. / Shi et al. 2024) as a row of eMIGM's Table 1.

Each token masked independently with probability gamma(t) (linear schedule), one t per
sample, loss weight w(t) = gamma'(t) / gamma(t) (the ELBO weight), no truncation, categorical
head over VQ tokens. The paper notes this weight is unstable with the exp schedule.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "mdm_256"
    m = c.model
    m.arch, m.head, m.vocab_size = "single", "categorical", 1024
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 768, 12, 12, 12
    m.latent_channels = 1
    k = c.mask
    k.distribution, k.schedule, k.weight = "bernoulli", "linear", "mdm"
    k.t_min, k.t_per, k.min_masked = 0.0, "sample", 1
    k.loss_norm = "tokens"
    c.tokenizer.name, c.tokenizer.scale = "vq", 1.0
    s = c.sample
    s.num_iter, s.schedule, s.order = 64, "linear", "random"
    s.cfg_scale, s.cfg_t_min, s.cfg_t_max = 1.0, 0.0, 1.0
    c.sample_presets = {}
    return c
