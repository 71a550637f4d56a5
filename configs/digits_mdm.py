"""Masked diffusion model (MDM) on the discrete digits: eMIGM paper Table 1's MDM row, tiny.

Training: each pixel token masked independently with probability gamma(t) (linear), one t
per sample, no truncation, the ELBO weight w(t) = gamma'(t) / gamma(t) and the unbiased
normaliser B*N (``mask.loss_norm='tokens'``). Sampling: random order, each masked token
revealed with probability (gamma(a) - gamma(b)) / gamma(a) per step (the MDM reverse
process), 16 steps, CFG on logits.

    python -m emigm_jax.main --config=configs/digits_mdm.py --workdir=runs/digits_mdm
"""
from configs.digits_discrete import discrete_digits_config


def get_config():
    c = discrete_digits_config("digits_mdm")
    k = c.mask
    k.distribution, k.schedule, k.weight = "bernoulli", "linear", "mdm"
    k.loss_norm = "tokens"
    s = c.sample
    s.num_iter, s.schedule, s.order, s.reveal = 16, "linear", "random", "bernoulli"
    return c
