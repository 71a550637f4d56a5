"""MaskGIT (Chang et al. 2022) on the discrete digits: eMIGM paper Table 1's MaskGIT row, tiny.

Training: exactly ceil(N * gamma(t)) of the 64 pixel tokens masked, uniformly without
replacement, cosine gamma, w = 1, one t per sample. Sampling: confidence order with Gumbel
noise on the log-confidence annealed linearly from ``choice_temperature`` to 0, count reveal
(ceil(gamma N) tokens stay masked after each step), CFG on logits.

    python -m emigm_jax.main --config=configs/digits_maskgit.py --workdir=runs/digits_maskgit
"""
from configs.digits_discrete import discrete_digits_config


def get_config():
    c = discrete_digits_config("digits_maskgit")
    k = c.mask
    k.distribution, k.schedule, k.weight = "uniform_count", "cosine", "one"
    s = c.sample
    s.schedule, s.order, s.reveal = "cosine", "confidence", "count"
    s.choice_temperature, s.gumbel_anneal = 4.5, "linear"
    return c
