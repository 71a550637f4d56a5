"""Mask-prediction sampling: ``plan`` (host side: options, step grid, NFE), ``draws`` (pure
random draws and logit transforms), ``head_draw`` (the diffusion head's chunked draw) and
``sampler`` (the scan and its state). The public names are re-exported here."""
from emigm_jax.sampling.draws import (cfg_probs_logits, cfg_weight, differential_draw,
                                      filter_logits, gumbel_scale, log_or_min,
                                      momentum_probs, noise_reg_strength)
from emigm_jax.sampling.plan import (CFG_SCHEDULES, HEAD_CAPACITIES, MGT_SOLVERS,
                                     Z_SAMPLINGS, Z_SCORE_PASSES, CompanionOptions, StepPlan,
                                     ar_prefix_length, companion_options, expected_nfe,
                                     guided_steps, head_chunk, make_plan,
                                     momentum_coefficients, reveal_probabilities, step_nfe,
                                     time_grid, z_sampling_steps, z_score_passes)
from emigm_jax.sampling.sampler import SamplerState, make_sampler, sample

__all__ = [
    "CFG_SCHEDULES", "HEAD_CAPACITIES", "MGT_SOLVERS", "Z_SAMPLINGS", "Z_SCORE_PASSES",
    "CompanionOptions", "SamplerState", "StepPlan", "ar_prefix_length", "cfg_probs_logits",
    "cfg_weight", "companion_options", "differential_draw", "expected_nfe", "filter_logits",
    "guided_steps", "gumbel_scale", "head_chunk", "log_or_min", "make_plan", "make_sampler",
    "momentum_coefficients", "momentum_probs", "noise_reg_strength", "reveal_probabilities",
    "sample", "step_nfe", "time_grid", "z_sampling_steps", "z_score_passes",
]
