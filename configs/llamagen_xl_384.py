"""LlamaGen-XL class-to-image at 384x384 (sizes and recipe in configs/llamagen_sizes.py)."""
from configs.llamagen_sizes import llamagen_config


def get_config():
    return llamagen_config("xl", 384)
