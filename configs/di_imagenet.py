"""Discrete Interpolants (Hu et al. 2024) on ImageNet 256: the shared recipe of di_itm / di_etm.

Facts (DI paper, Table S7 ImageNet256 column): 32 x 32 VQ-F8 tokens over a
16,384-code codebook (the paper's 16,385 includes [M]; here [M] is the model's separate mask
embedding), 546M parameters, AdamW with weight decay 0 and gradient-norm clip 2, lr 2e-4 at
batch 1,024 with 5K warmup steps, 500K iterations, no label smoothing, class drop 0.1, the
linear schedule in training and sampling, t ~ U[1e-3, 1 - 1e-3], w = 1. Sampling: 20 steps
(ITM; 1,000 for the ETM), first-order reveal, final argmax, top-p 0.9, softmax temperature
1.3, CFG 2 mixing probabilities (DI eq. 5).

Project choices (the paper leaves them open):
  * Tokenizer: the paper's SD-VQ-F8 (latent-diffusion's ``vq-f8/model.ckpt``: f8, 16,384
    codes, 4-dim plain-L2 codebook; ``tokenizer.name='sdvq_f8'``, converter
    ``emigm_jax.convert.sdvq``). The alternative with the same token grid and vocabulary is
    LlamaGen's VQ-8 (``vq_ds8_c2i.pt``, 8-dim l2-normalised codebook):
    ``--config.tokenizer.name=vq8 --config.tokenizer.path=vq_ds8_c2i.pt``.
  * Architecture (unstated in the paper): one bidirectional ViT stack (MaskGIT layout,
    ``model.arch='single'``), width 1024, 40 blocks, 16 heads, learned positions, class as
    one prefix token, MLP token head: 541.6M parameters (546M in the paper; within 1%).
"""
from configs import base


def di_config(time_cond: str):
    c = base.get_config()
    c.name = f"di_{'itm' if time_cond == 'none' else 'etm'}_256"
    m = c.model
    m.arch, m.block, m.pos_emb, m.head, m.head_mlp = "single", "vit", "learned", "categorical", True
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 1024, 40, 0, 16
    m.buffer_size = 1
    m.vocab_size = 16384
    m.image_size, m.latent_stride, m.patch_size, m.latent_channels = 256, 8, 1, 1
    m.cfg_mode = "fake_class"
    m.label_drop_prob = 0.1
    m.attn_dropout = m.proj_dropout = 0.0
    m.time_cond = time_cond
    k = c.mask
    k.distribution, k.schedule, k.weight = "bernoulli", "linear", "one"
    k.t_min, k.t_eps, k.t_per, k.min_masked = 0.0, 1e-3, "sample", 1
    o = c.optim
    o.base_lr = 5e-5            # 2e-4 at batch 1,024
    o.weight_decay, o.grad_clip = 0.0, 2.0
    o.warmup_steps = 5000
    t = c.train
    t.batch_size, t.num_steps, t.label_smoothing = 1024, 500_000, 0.0
    c.tokenizer.name, c.tokenizer.scale = "sdvq_f8", 1.0
    s = c.sample
    s.num_iter = 20 if time_cond == "none" else 1000
    s.schedule, s.order, s.reveal = "linear", "random", "euler"
    s.final_argmax = True
    s.temperature, s.top_p = 1.3, 0.9
    s.cfg_scale, s.cfg_space, s.cfg_t_min, s.cfg_t_max = 2.0, "probs", 0.0, 1.0
    s.choice_temperature, s.gumbel_anneal = 4.5, "linear"  # used with sample.order=confidence
    c.sample_presets = {
        # DI's confidence sampler on the same network (Fig. 2/S5: 20 steps, CFG 3.0).
        "confidence": dict(order="confidence", reveal="count", cfg_scale=3.0, num_iter=20),
    }
    c.sweep.num_iters = (5, 10, 20, 50, 100)
    return c
