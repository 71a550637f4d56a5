"""Discrete Interpolants (Hu et al. 2024) on the discrete digits: the ITM recipe, tiny.

Training (DI paper): each pixel token kept with probability kappa_t (Bernoulli
masking, linear schedule), t ~ U[t_eps, 1 - t_eps] with t_eps = 1e-3, w = 1, no label
smoothing, implicit-timestep model (``model.time_cond='none'``; ``'explicit'`` gives the ETM).
Sampling (DI Alg. 1): 20 fixed steps, a masked token leaves [M] with the first-order
probability dt * gamma'(t) / gamma(t) (``sample.reveal='euler'``, equal to the exact rule for
the linear schedule), draws from p_theta with top-p 0.9, and every token still masked after
the last step takes the argmax (``sample.final_argmax``); CFG mixes probabilities
(``cfg_space='probs'``, DI eq. 5; negative mass clipped to 0 and renormalised).

    python -m emigm_jax.main --config=configs/digits_di.py --workdir=runs/digits_di
"""
from configs.digits_discrete import discrete_digits_config


def get_config():
    c = discrete_digits_config("digits_di")
    c.model.time_cond = "none"
    k = c.mask
    k.distribution, k.schedule, k.weight = "bernoulli", "linear", "one"
    k.t_eps = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 2.0
    s = c.sample
    s.num_iter, s.schedule, s.order, s.reveal = 20, "linear", "random", "euler"
    s.final_argmax = True
    s.top_p = 0.9
    s.cfg_space = "probs"
    return c
