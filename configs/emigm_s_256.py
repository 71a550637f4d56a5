"""eMIGM-S at 256x256 (sizes and presets in configs/emigm_sizes.py)."""
from configs.emigm_sizes import emigm_config


def get_config():
    return emigm_config("s", 256)
