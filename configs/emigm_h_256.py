"""eMIGM-H at 256x256 (SPEC section 2 table, paper Tables 6)."""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "emigm_h_256"
    c.model.width = 1280
    c.model.enc_depth = 20
    c.model.dec_depth = 20
    c.model.num_heads = 16
    c.model.head_depth = 12
    c.model.head_width = 1536
    c.model.image_size = 256
    c.model.latent_stride = 16
    c.model.latent_channels = 16
    c.tokenizer.name = "kl16"
    c.tokenizer.scale = 0.2325
    c.data.image_size = 256
    c.train.batch_size = 2048
    # Paper preset: 16 iterations, DPM-Solver 8 steps [3,3,2], CFG 4.0 on (0.2, 0.4].
    c.sample.num_iter = 16
    c.sample.solver_steps = 8
    c.sample.cfg_scale = 4.0
    c.sample.cfg_t_min = 0.2
    c.sample.cfg_t_max = 0.4
    c.sample_presets = dict(
        iter128=dict(num_iter=128, solver_steps=14, cfg_t_min=0.3, cfg_t_max=0.7),
    )
    return c
