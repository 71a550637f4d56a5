"""eMIGM-B at 512x512 (SPEC section 2 table, paper Tables 7)."""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "emigm_b_512"
    c.model.width = 768
    c.model.enc_depth = 12
    c.model.dec_depth = 12
    c.model.num_heads = 12
    c.model.head_depth = 8
    c.model.head_width = 1280
    c.model.image_size = 512
    c.model.latent_stride = 32
    c.model.latent_channels = 32
    c.tokenizer.name = "dcae_f32c32"
    c.tokenizer.scale = 0.3189
    c.data.image_size = 512
    c.train.batch_size = 2048
    # Paper preset: 16 iterations, DPM-Solver 8 steps [3,3,2], CFG 4.0 on (0.15, 0.35].
    c.sample.num_iter = 16
    c.sample.solver_steps = 8
    c.sample.cfg_scale = 4.0
    c.sample.cfg_t_min = 0.15
    c.sample.cfg_t_max = 0.35
    c.sample_presets = dict(
        iter64=dict(num_iter=64, solver_steps=14, cfg_t_min=0.25, cfg_t_max=0.5),
    )
    return c
