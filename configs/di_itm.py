"""Discrete Interpolants, implicit-timestep model (ITM; FID 3.21 in the paper's Table 3):
the network is not told t (``model.time_cond='none'``), as in eMIGM. See configs/di_imagenet.py.

    python -m emigm_jax.main --config=configs/di_itm.py --workdir=gs://bucket/di_itm \
        --config.data.cache_dir=gs://bucket/imagenet_sdvq_f8_cache --config.tokenizer.path=model.ckpt
"""
from configs.di_imagenet import di_config


def get_config():
    return di_config("none")
