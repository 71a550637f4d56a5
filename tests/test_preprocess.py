"""ADM center crop vs a straightforward PIL reference; [-1, 1] scaling vs float64."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from emigm_jax.data.preprocess import (adm_center_crop, from_model_range, load_rgb,
                                       preprocess_image, to_model_range)


def reference_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's recipe written out step by step."""
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    s = size / min(w, h)
    w, h = round(w * s), round(h * s)
    img = img.resize((w, h), Image.BICUBIC)
    arr = np.array(img)
    y0, x0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y0:y0 + size, x0:x0 + size]


def _random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    # smooth-ish content so resampling filters matter
    base = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return Image.fromarray(base, mode=mode)


@pytest.mark.parametrize("w,h,size", [
    (517, 333, 64), (333, 517, 64), (1031, 97, 32), (97, 1031, 32), (64, 64, 64),
    (129, 127, 64), (300, 301, 256), (40, 23, 64), (2049, 1537, 256), (255, 511, 127),
])
def test_adm_center_crop_matches_reference(w, h, size):
    img = _random_image(w, h, seed=w * h)
    out = adm_center_crop(img, size)
    assert out.size == (size, size) and out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), reference_crop(img, size))


def test_grayscale_and_modes():
    img = _random_image(201, 150, mode="L", seed=1)
    np.testing.assert_array_equal(np.asarray(adm_center_crop(img, 48)), reference_crop(img, 48))
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 70, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    arr = preprocess_image(buf.getvalue(), 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, reference_crop(rgba.convert("RGB"), 32))


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive int"):
        adm_center_crop(_random_image(10, 10), 0)
    with pytest.raises(Exception):
        load_rgb(b"this is not an image")
    buf = io.BytesIO()
    _random_image(64, 64).save(buf, format="JPEG")
    with pytest.raises(Exception):
        load_rgb(buf.getvalue()[:200])  # truncated JPEG


def test_model_range_scaling():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    y = to_model_range(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) / 127.5 - 1.0, atol=1e-6, rtol=0)
    assert y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_array_equal(from_model_range(y), x)
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(x.astype(np.float32))
