"""MaskGIL-XL (recipe and sizes in configs/maskgil_sizes.py)."""
from configs.maskgil_sizes import maskgil_config


def get_config():
    return maskgil_config("xl")
