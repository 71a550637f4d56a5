"""MaskGIL sizes (MaskGIL paper) and the shared recipe.

A bidirectional LLaMA transformer over LlamaGen VQ-16 tokens: a single stack of bias-free
LLaMA blocks (RMSNorm, SwiGLU), 2-D RoPE, the class embedding as one prefix token, untied
16,384-code input/output tables, label smoothing 0.1, class drop 0.1; sampling: 8 steps,
arccos schedule, count-based reveal in confidence order, CFG on logits. QK-norm and post-norm
only at XXL.
"""
from configs import base

# size: (width, depth, heads, qk_norm + post_norm, CFG scale (Table 3), epochs)
SIZES = {
    "b": (768, 12, 12, False, 2.0, 400),
    "l": (1024, 24, 16, False, 2.0, 400),
    "xl": (1280, 36, 20, False, 2.5, 400),
    "xxl": (1536, 48, 24, True, 2.5, 300),
}


def maskgil_config(size: str):
    if size not in SIZES:
        raise ValueError(f"no MaskGIL config for size={size!r}; expected one of {tuple(SIZES)}")
    width, depth, heads, norms, cfg, epochs = SIZES[size]
    c = base.get_config()
    c.name = f"maskgil_{size}"
    m = c.model
    m.arch, m.block, m.pos_emb, m.head, m.head_mlp = "single", "llama", "rope2d", "categorical", False
    m.width, m.enc_depth, m.dec_depth, m.num_heads = width, depth, 0, heads
    m.qk_norm = m.post_norm = norms
    m.buffer_size = 1
    m.vocab_size = 16384
    m.latent_channels = 1
    m.attn_dropout = m.proj_dropout = 0.0
    m.cfg_mode = "fake_class"
    k = c.mask
    k.distribution, k.schedule, k.weight = "uniform_count", "arccos", "one"
    k.t_min, k.t_per, k.min_masked = 0.0, "sample", 1
    c.optim.base_lr = 1e-4  # lr 1e-4 at batch 256
    c.optim.b1, c.optim.b2, c.optim.weight_decay = 0.9, 0.96, 1e-5
    c.train.batch_size, c.train.epochs, c.train.label_smoothing = 256, epochs, 0.1
    c.tokenizer.name, c.tokenizer.scale = "vq", 1.0
    s = c.sample
    s.num_iter, s.schedule, s.order = 8, "arccos", "confidence"
    s.cfg_scale, s.cfg_t_min, s.cfg_t_max = cfg, 0.0, 1.0
    c.sample_presets = {}
    return c
