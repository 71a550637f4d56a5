"""LlamaGen-B class-to-image at 256x256 (sizes and recipe in configs/llamagen_sizes.py)."""
from configs.llamagen_sizes import llamagen_config


def get_config():
    return llamagen_config("b", 256)
