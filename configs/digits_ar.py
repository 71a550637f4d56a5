"""An autoregressive model on the discrete digits (``model.arch='ar'``): LlamaGen's recipe, tiny.

The AR half of MaskGIL's AR-prefix sampling (``sample.ar_prefix`` with ``sample.ar_workdir``
pointing at this run). One causal stack of bias-free LLaMA blocks (RMSNorm, SwiGLU) with
2-D RoPE over the 8 x 8 pixel grid, the class embedding as the first token (label drop 0.1
for CFG), the output table as the head, next-token cross-entropy over the 64 raster pixel
tokens (``emigm_jax.losses.next_token_loss``). Sampling: 64 single-token passes with a KV
cache (``emigm_jax.sampling.ar``), temperature 1, no top-k / top-p, CFG on logits.

    python -m emigm_jax.main --config=configs/digits_ar.py --workdir=runs/digits_ar
"""
from configs.digits_discrete import discrete_digits_config


def get_config():
    c = discrete_digits_config("digits_ar")
    m = c.model
    m.arch, m.block, m.pos_emb, m.head_mlp = "ar", "llama", "rope2d", False
    m.buffer_size = 0                # no masked-model buffers: the class is the first token
    c.train.num_steps = 400          # every token is a target at every step: fewer steps
    s = c.sample
    s.cfg_scale = 1.5
    s.temperature, s.top_k, s.top_p = 1.0, 0, 1.0
    return c
