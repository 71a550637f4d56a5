"""MaskGIL-XL (775M): a bidirectional LLaMA transformer over LlamaGen VQ-16 tokens.

COMPANION.md section 3: single stack of bias-free LLaMA blocks (RMSNorm, SwiGLU), 2-D RoPE,
the class embedding as one prefix token, untied 16,384-code input/output tables,
label smoothing 0.1, class drop 0.1; sampling: 8 steps, arccos schedule, count-based reveal
in confidence order, CFG 2.5 on logits. QK-norm and post-norm only at XXL.
"""
from configs import base


def get_config():
    c = base.get_config()
    c.name = "maskgil_xl"
    m = c.model
    m.arch, m.block, m.pos_emb, m.head, m.head_mlp = "single", "llama", "rope2d", "categorical", False
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 1280, 36, 0, 20
    m.qk_norm = m.post_norm = False
    m.buffer_size = 1
    m.vocab_size = 16384
    m.latent_channels = 1
    m.attn_dropout = m.proj_dropout = 0.0
    m.cfg_mode = "fake_class"
    k = c.mask
    k.distribution, k.schedule, k.weight = "uniform_count", "arccos", "one"
    k.t_min, k.t_per, k.min_masked = 0.0, "sample", 1
    c.optim.base_lr = 1e-4 * 256 / 256  # lr 1e-4 at batch 256
    c.optim.b1, c.optim.b2, c.optim.weight_decay = 0.9, 0.96, 1e-5
    c.train.batch_size = 256
    c.train.epochs = 400
    c.train.label_smoothing = 0.1
    c.tokenizer.name, c.tokenizer.scale = "vq", 1.0
    s = c.sample
    s.num_iter, s.schedule, s.order = 8, "arccos", "confidence"
    s.cfg_scale, s.cfg_t_min, s.cfg_t_max = 2.5, 0.0, 1.0
    c.sample_presets = {}
    return c
