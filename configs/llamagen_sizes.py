"""LlamaGen class-to-image GPT sizes (LlamaGen paper, Table 1; its ``gpt.py`` size table).

A causal stack of bias-free LLaMA blocks (RMSNorm eps 1e-5, SwiGLU) over LlamaGen VQ-16
tokens (codebook 16,384; 16 x 16 tokens at 256 px, 24 x 24 at 384 px) with the class
embedding as the single prefix token (``cls_token_num=1``), 2-D RoPE in LlamaGen's layout
(interleaved channel pairs, class position multiplied by cos = sin = 0), an untied bias-free
output table, label drop 0.1 for classifier-free guidance. These are exactly the shapes and
semantics of the released ``c2i_*.pt`` files, which ``python -m emigm_jax.convert.llamagen``
converts. Sampling: guidance on logits at every step with the scale of the released
evaluation commands, temperature 1, no top-k / top-p (the FID setting). Training follows the
released c2i recipe: AdamW lr 1e-4 at batch 256, betas (0.9, 0.95), weight decay 0.05,
gradient clip 1.0, no warmup, 300 epochs, residual/FFN dropout 0.1.

One table, one builder: each ``configs/llamagen_<size>_<res>.py`` is a one-line call.
"""
from configs import base

# size: (width, depth, heads, CFG scale of the released evaluation commands)
SIZES = {
    "b": (768, 12, 12, 2.0),
    "l": (1024, 24, 16, 2.0),
    "xl": (1280, 36, 20, 1.75),
    "xxl": (1536, 48, 24, 1.75),
}
RESOLUTIONS = (256, 384)   # VQ-16 grids 16 x 16 and 24 x 24
CODEBOOK = 16384


def llamagen_config(size: str, resolution: int = 256):
    if size not in SIZES or resolution not in RESOLUTIONS:
        raise ValueError(f"no LlamaGen config for size={size!r} at {resolution}px; expected a "
                         f"size in {tuple(SIZES)} and a resolution in {RESOLUTIONS}")
    width, depth, heads, cfg = SIZES[size]
    c = base.get_config()
    c.name = f"llamagen_{size}_{resolution}"
    m = c.model
    m.arch, m.head, m.head_mlp, m.block, m.pos_emb = "ar", "categorical", False, "llama", "rope2d"
    m.width, m.enc_depth, m.dec_depth, m.num_heads = width, depth, 0, heads
    m.norm_eps, m.rope_pairing, m.rope_prefix = 1e-5, "interleaved", "zero"
    m.vocab_size, m.latent_channels, m.patch_size, m.buffer_size = CODEBOOK, 1, 1, 0
    m.image_size = c.data.image_size = resolution
    m.latent_stride = 16
    m.label_drop_prob, m.attn_dropout, m.proj_dropout = 0.1, 0.0, 0.1
    m.encoder_buckets = m.loss_buckets = ()
    o = c.optim
    o.base_lr, o.b1, o.b2, o.weight_decay, o.grad_clip = 1e-4, 0.9, 0.95, 0.05, 1.0
    o.warmup_steps = 0
    c.train.batch_size, c.train.epochs, c.train.label_smoothing = 256, 300, 0.0
    c.tokenizer.name, c.tokenizer.scale = "vq", 1.0
    s = c.sample
    s.cfg_scale, s.cfg_schedule, s.cfg_t_min, s.cfg_t_max = cfg, "constant", 0.0, 1.0
    s.temperature, s.top_k, s.top_p = 1.0, 0, 1.0
    c.sample_presets = {}
    return c
