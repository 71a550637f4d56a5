"""Gaussian diffusion of the per-token head: training loss, DDPM and DPM-Solver++ sampling.

See ``gaussian.py`` (schedule, loss, respacing), ``ddpm.py`` (ancestral sampling with
temperature) ``vp_schedule.py`` (the truncated 996-step schedule) and ``dpm_solver.py`` (DPM-Solver++) for the
conventions the sampler relies on.
"""
from emigm_jax.diffusion.ddpm import ddpm_sample, default_ddpm_diffusion, p_sample
from emigm_jax.diffusion.dpm_solver import (dpm_solver_sample, make_plan, num_model_evals,
                                            singlestep_orders)
from emigm_jax.diffusion.gaussian import (GaussianDiffusion, create_diffusion,
                                          get_named_beta_schedule, space_timesteps)
from emigm_jax.diffusion.vp_schedule import (DiscreteVPSchedule, LinearVPSchedule,
                                             NoiseScheduleVP, default_schedule)

__all__ = [
    "GaussianDiffusion", "create_diffusion", "get_named_beta_schedule", "space_timesteps",
    "ddpm_sample", "p_sample", "default_ddpm_diffusion",
    "NoiseScheduleVP", "DiscreteVPSchedule", "LinearVPSchedule", "default_schedule",
    "dpm_solver_sample", "make_plan", "num_model_evals", "singlestep_orders",
]
