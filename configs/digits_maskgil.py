"""MaskGIL (Xin et al. 2025) on the discrete digits: the MaskGIL-B recipe, tiny.

Architecture (MaskGIL paper): one bidirectional stack of bias-free LLaMA blocks
(RMSNorm, SwiGLU), 2-D RoPE over the 8 x 8 pixel grid (first half of each head rotates with
the row, second half with the column; the class prefix token is not rotated), the class
embedding as one prefix token, the output table alone as the head. Training: uniform-count
masking with the arccos schedule, label smoothing 0.1, class drop 0.1. Sampling: 8 steps,
arccos, confidence order with count reveal, CFG on logits.

    python -m emigm_jax.main --config=configs/digits_maskgil.py --workdir=runs/digits_maskgil
"""
from configs.digits_discrete import discrete_digits_config


def get_config():
    c = discrete_digits_config("digits_maskgil")
    m = c.model
    m.block, m.pos_emb, m.head_mlp = "llama", "rope2d", False
    k = c.mask
    k.distribution, k.schedule, k.weight = "uniform_count", "arccos", "one"
    c.train.label_smoothing = 0.1
    s = c.sample
    s.schedule, s.order, s.reveal = "arccos", "confidence", "count"
    s.cfg_scale = 2.0
    return c
