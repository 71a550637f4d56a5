"""Mask-prediction sampling: ``plan`` (host side: options, step grid, NFE), ``draws`` (pure
random draws and logit transforms), ``head_draw`` (the diffusion head's chunked draw),
``sampler`` (the scan and its state) and ``generate`` (the batched generation loop). The
public names are re-exported here."""
from emigm_jax.sampling.draws import (CFG_SCHEDULES, cfg_probs_logits, cfg_weight,
                                      differential_draw, filter_logits, gumbel_scale,
                                      log_or_min, momentum_probs, noise_reg_strength)
from emigm_jax.sampling.plan import (HEAD_CAPACITIES, MGT_SOLVERS, Z_SAMPLINGS,
                                     Z_SCORE_PASSES, CompanionOptions, StepPlan,
                                     ar_prefix_length, companion_options, expected_nfe,
                                     guided_steps, head_chunk, head_ladder, head_rows,
                                     make_plan, momentum_coefficients, read_ladder,
                                     reveal_probabilities, step_nfe, time_grid,
                                     z_sampling_steps, z_score_passes)
from emigm_jax.sampling.generate import (GeneratedBatch, GenerationTimes, generate,
                                        generate_batches, sample_batch_size)
from emigm_jax.sampling.sampler import SamplerState, make_sampler, sample

__all__ = [
    "CFG_SCHEDULES", "HEAD_CAPACITIES", "MGT_SOLVERS", "Z_SAMPLINGS", "Z_SCORE_PASSES",
    "CompanionOptions", "GeneratedBatch", "GenerationTimes", "generate", "generate_batches",
    "sample_batch_size", "SamplerState", "StepPlan", "ar_prefix_length", "cfg_probs_logits",
    "cfg_weight", "companion_options", "differential_draw", "expected_nfe", "filter_logits",
    "guided_steps", "gumbel_scale", "head_chunk", "head_ladder", "head_rows", "log_or_min",
    "make_plan", "read_ladder",
    "make_sampler", "momentum_coefficients", "momentum_probs", "noise_reg_strength",
    "reveal_probabilities", "sample", "step_nfe", "time_grid", "z_sampling_steps",
    "z_score_passes",
]
