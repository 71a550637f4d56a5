"""ImageNet preprocessing of ADM / MAR / eMIGM: center crop and scaling to [-1, 1].

The ADM crop (guided-diffusion ``center_crop_arr``) matters for FID comparability: it
halves the image with BOX filtering while the short side is at least twice the target (cheap
anti-aliasing), then BICUBIC-resizes so the short side equals the target exactly, then crops
the center (offset rounded down). eMIGM caches latents of exactly this crop.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM center crop of a PIL image to ``size`` x ``size`` (mode preserved)."""
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"crop size must be a positive int, got {size!r}")
    if min(image.size) == 0:
        raise ValueError(f"cannot crop an empty image of size {image.size}")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return (images.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def from_model_range(images: np.ndarray) -> np.ndarray:
    """float in ~[-1, 1] -> uint8 (clipped, rounded), for saving decoded samples."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def load_rgb(data: bytes | str) -> Image.Image:
    """Decodes an image file (path or bytes) fully into an RGB PIL image.

    Raises on truncated or non-image data (PIL decodes lazily; ``convert`` forces it).
    """
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(f) as im:
        return im.convert("RGB")


def preprocess_image(data: bytes | str | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """File path / encoded bytes / PIL image / decoded uint8 array -> ADM-cropped uint8 [size, size, 3]."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim not in (2, 3):
            raise ValueError(f"decoded image must be uint8 [H, W(, C)], got {data.dtype} {data.shape}")
        data = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
    im = data if isinstance(data, Image.Image) else load_rgb(data)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(adm_center_crop(im, size), dtype=np.uint8)
