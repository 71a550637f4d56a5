"""Base config: the eMIGM recipe (eMIGM paper, Secs. 3-5) at eMIGM-B-256 size.

Every other config starts from this one and changes only what differs. Field names are the
design-space switches of docs/ARCHITECTURE.md; `emigm_jax.config_validation.validate_config` checks them.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "emigm_b_256"
    c.seed = 0

    # Architecture.
    c.model = ml_collections.ConfigDict(dict(
        arch="mae",                 # mae | single
        head="diffusion",           # diffusion | categorical
        cfg_mode="mask_token",      # mask_token | fake_class
        width=768,
        enc_depth=12,
        dec_depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        buffer_size=64,
        num_classes=1000,
        image_size=256,
        latent_stride=16,           # tokenizer stride; grid = image_size / stride / patch
        patch_size=1,
        latent_channels=16,         # C of the tokenizer latent; token_dim = C * patch^2
        label_drop_prob=0.1,
        attn_dropout=0.1,
        proj_dropout=0.1,
        head_depth=6,
        head_width=1024,
        diffusion_batch_mul=4,
        num_diffusion_steps=1000,
        vocab_size=0,               # codebook size K for the categorical head
        encoder_capacity=0,         # 0 = exact dropping for any mask (buffer + N slots)
        # Work-proportional encoder: capacity rungs buffer + ceil(f * N) (plus the full one);
        # each step runs the smallest rung holding the batch's visible tokens. () = off.
        # Sampling always uses it (train.ladders: training too). Fine at the bottom, where
        # the exp schedule's first steps see a few tokens, and at 1/2, 3/4 for the last steps;
        # each rung is one more compiled encoder (benchmarks/RESULTS.md, issue 17).
        encoder_buckets=(1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4),
        # Training head loss on masked rows only: row rungs ceil(f * N) per sample. () = off.
        # 1 - the encoder's fractions: when the batch shares its count (the reference's
        # masking), each encoder rung's masked range fits the matching loss rung, so training
        # meets one (encoder, loss) rung pair per encoder rung (emigm_jax/step_dispatch.py).
        loss_buckets=(1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 13 / 16, 7 / 8, 15 / 16, 31 / 32),
        loss_capacity=0,            # head-loss rows per sample, 0 = N (exact for every mask)
        single_reference_semantics=False,
        block="vit",                # vit | llama (RMSNorm, SwiGLU, no biases)
        qk_norm=False,
        post_norm=False,
        pos_emb="learned",          # learned | rope2d
        # model.arch='ar' only (LlamaGen checkpoints: 1e-5, interleaved, zero):
        norm_eps=1e-6,              # epsilon of every LayerNorm / RMSNorm
        rope_pairing="half",        # half (j with j + m/2) | interleaved (2j with 2j + 1)
        rope_prefix="identity",     # class token under RoPE: identity | zero (cos = sin = 0)
        head_mlp=True,              # categorical head: MLP before the output table
        time_cond="none",           # none (no time input, eMIGM/ITM) | explicit (DI's ETM)
        dtype="float32",            # compute dtype: float32 | bfloat16 (params stay fp32)
        remat=False,
        scan_layers=False,          # nn.scan over identical blocks (stacked layer axis)
    ))

    # Masking / forward process (reference-code variant as default).
    c.mask = ml_collections.ConfigDict(dict(
        distribution="bernoulli",   # bernoulli | uniform_count
        schedule="exp",
        exp_rate=5.0,
        pow_rho=0.5,
        poly_p=0.5,
        weight="one",               # one | mdm
        t_min=0.2,
        t_eps=0.0,                  # t ~ U[t_eps, 1 - t_eps] before truncation
        p_eps=1e-3,                 # p = (1 - p_eps) t + p_eps
        t_per="batch",              # batch (one t per batch, reference) | sample
        min_masked=2,
        loss_norm="masked",         # masked: mean over masked tokens (reference) | tokens: / N
        coupling_ratio=0.0,         # DI conditional coupling: share of positions never masked
    ))

    # Optimisation.
    c.optim = ml_collections.ConfigDict(dict(
        base_lr=1e-4,               # lr = base_lr * global_batch / 256
        b1=0.9,
        b2=0.95,
        weight_decay=0.02,
        grad_clip=3.0,
        eps=1e-8,
        warmup_epochs=100,
        warmup_steps=-1,            # >= 0 overrides warmup_epochs
        decay="constant",           # after warmup: constant | cosine (to 0 at the last step)
        ema_decay=0.9999,
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=2048,            # global batch
        epochs=800,
        num_steps=-1,               # -1: epochs * steps_per_epoch
        grad_accum=1,
        # Train at the smallest model.encoder_buckets / loss_buckets rung holding each step's
        # mask (drawn on the host; one compiled step per rung met, no lax.switch under grad).
        # False: one full-capacity step (docs/ARCHITECTURE.md, work-proportional).
        ladders=True,
        label_smoothing=0.0,
        max_nonfinite_steps=10,     # non-finite steps in a row that stop a run (0: the first)
        log_every=100,
        sample_every=0,
        progress=True,              # tqdm progress bar
    ))

    c.data = ml_collections.ConfigDict(dict(
        source="cached",            # digits | folder | tfds | cached
        path="",                    # image folder / tfds data_dir / cache dir
        cache_dir="",               # latent cache (source=cached); falls back to path
        labels_file="",             # optional class-dir -> label file for source=folder
        tfds_name="imagenet2012",
        num_train_images=1281167,
        image_size=256,
        num_workers=8,
    ))

    c.tokenizer = ml_collections.ConfigDict(dict(
        name="kl16",                # kl16 | dcae_f32c32 | vq | identity
        path="",                    # weights file (converted .msgpack or official format)
        scale=0.2325,
        arch=None,                  # architecture overrides (tiny test tokenizers)
        random_init=False,          # random weights (tests and benchmarks only)
        seed=0,
        dtype="float32",
    ))

    # Sampling: eMIGM 16-iteration preset.
    c.sample = ml_collections.ConfigDict(dict(
        num_iter=16,
        schedule="exp",
        exp_rate=5.0,
        pow_rho=0.5,
        poly_p=0.5,
        t_end=1e-5,
        order="random",             # random | confidence
        head_sampler="dpm_solver",  # dpm_solver | ddpm
        solver_steps=8,
        solver_order=3,
        solver_method="singlestep",  # singlestep | multistep
        solver_skip="logSNR",
        ddpm_steps=100,
        temperature=1.0,
        cfg_scale=4.0,
        cfg_schedule="constant",    # constant | linear | power | cubic | exp | cosine
        cfg_t_min=0.1,
        cfg_t_max=0.3,
        choice_temperature=4.5,
        top_k=0,
        top_p=1.0,
        batch_size=64,
        num_images=50000,
        head_capacity="auto",       # auto: head runs only on revealed tokens | full: on all N
        head_chunk=16,              # tokens per sample per head call (auto mode)
        # Companion-paper inference switches (DI, BAG, MaskGIL; all off by default).
        reveal="auto",              # auto (count if order=confidence else bernoulli) | bernoulli | euler | count
        final_argmax=False,         # DI: last step takes argmax p_theta for every still-masked token
        cfg_space="auto",           # auto (eps diffusion / logits categorical) | eps | logits | probs
        gumbel_anneal="linear",     # linear | none  (the papers' gumbel_temp = choice_temperature)
        noise_reg="none",           # none | abs_cos | half_abs_cos  (BAG eq. 1)
        noise_reg_scale=1.0,
        diff_frac=0.0,              # BAG differential sampling fraction z in [0, 1]; 0 = off
        argmax_from=-1,             # step from which tokens take the argmax; -1 = off
        z_sampling="none",          # none | masked | random | recover  (BAG Z-sampling)
        z_steps=-1,                 # zig-zag the first z_steps steps; -1 = all
        z_cfg=0.0,                  # masked-Z scoring CFG scale (inversion); 0 = no guidance pass
        mgt_solver="vanilla",       # vanilla | momentum2 (BAG's second-order momentum solver)
        ar_prefix=0.0,              # MaskGIL: share of raster tokens from an AR model (0 = off)
        ar_workdir="",              # that AR model's run directory (model.arch='ar')
    ))
    # Named overrides selectable with --sample_preset.
    c.sample_presets = ml_collections.ConfigDict(dict(
        iter128=dict(num_iter=128, solver_steps=14, cfg_t_min=0.05, cfg_t_max=0.4),
    ))

    # Evaluation: FID Inception weights and reference statistics files.
    c.eval = ml_collections.ConfigDict(dict(
        inception_path="",          # pt_inception-2015-12-05-*.pth or converted .msgpack
        reference_path="",          # ADM batch VIRTUAL_imagenet256_labeled.npz (mu, sigma, mu_s, sigma_s, arr_0)
        fid_stats_path="",          # FID-only stats (mu, sigma), e.g. fid_stats_imagenet256_guided_diffusion.npz
        preprocess="adm",           # adm (TF1 resize, as the published stats) | pytorch_fid
        num_images=0,               # 0 = sample.num_images
        cache_dir="",               # reference pool3 feature cache ('' = next to the file)
        save_npz=False,             # also write the samples as an ADM sample batch
        inception_size=299,         # Inception input size (tests shrink it)
        preview=64,                 # images in the preview PNG
        partial_every_s=300.0,      # save the running statistics this often; a rerun resumes
    ))
    # NFE-vs-FID sweep grid (--mode=sweep).
    c.sweep = ml_collections.ConfigDict(dict(
        num_iters=(4, 8, 16, 32, 64),
        cfg_scales=(),
        cfg_intervals=(),
        num_images=0,
        presets=(),                 # names of sample_presets to cross with the grid
        out_dir="sweep",            # subdirectory of the workdir for this sweep's files
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
    # --mode=plan: compile-only plan for a target slice (emigm_jax.plan).
    c.plan = ml_collections.ConfigDict(dict(
        target="cpu:8",             # tpu:v4|v5p|v5e:<topology> (needs libtpu) | cpu:N
        what="train",               # train | sample | both
        meshes=(),                  # (data, fsdp) pairs to compare; () = every factorisation
        remat=(False, True),        # model.remat settings to compare
        search_batch=True,          # compile-only search for the largest per-chip batch
        max_per_chip=1024,
        sample_per_chip=256,        # sampler plan batch per chip (0: sample.batch_size)
        hbm_gib=0.0,                # memory budget per device; 0: the chip's HBM (cpu:N: 16)
        out_dir="plan",
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, keep_every=0,
                                                  async_save=True))
    return c
