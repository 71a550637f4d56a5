"""eMIGM-L at 512x512 (sizes and presets in configs/emigm_sizes.py)."""
from configs.emigm_sizes import emigm_config


def get_config():
    return emigm_config("l", 512)
