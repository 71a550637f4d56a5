"""The embedded default dataset: scikit-learn's 8x8 handwritten digits as tokens.

Why this dataset: it ships inside scikit-learn (no download), is small enough to train a
class-conditional eMIGM on two CPU cores in minutes, and is easy to score (a classifier on
the real images recognises the generated ones; see ``emigm_jax.evaluation.digits_metric``).

Data: 1797 grey images, 8x8, integer pixels 0..16, 10 classes. A fixed, stratified, seeded
split holds out ``test_fraction`` of the images (default 20%: 1437 train / 360 test).

Tokens: the image is cut into ``patch_size`` x ``patch_size`` patches in raster order, one
continuous token per patch with ``patch_size**2`` channels (patch 1: 64 tokens of C=1;
patch 2: 16 tokens of C=4). Pixels are standardised with the dataset-wide pixel mean and
standard deviation, so tokens have about zero mean and unit variance; ``decode`` inverts that
exactly and clips to the 0..16 pixel range.

Discrete tokens (``model.head='categorical'``): the pixels themselves, 64 tokens in raster
order over a 17-symbol vocabulary (token value = pixel value 0..16; the model's mask id is
a separate learned embedding, not a vocabulary entry). Lossless by construction.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SIDE = 8
PIXEL_MAX = 16.0
PIXEL_LEVELS = 17  # vocabulary of the discrete tokenisation: pixel values 0..16
NUM_CLASSES = 10
NUM_IMAGES = 1797
# Mean and standard deviation of all 1797 x 64 pixels (float64, rounded to 1e-3); fixed
# constants (not recomputed per split) so the tokenisation never depends on the split.
PIXEL_MEAN = 4.884
PIXEL_STD = 6.017


@dataclasses.dataclass(frozen=True)
class DigitsSplits:
    """Images [n, 8, 8] float32 in 0..16 and labels [n] int32, for each split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@functools.lru_cache(maxsize=8)
def load_digits_splits(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplits:
    """Fixed stratified train/test split of sklearn's digits (same for every caller).

    The arrays are read-only: the result is cached and shared.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction={test_fraction!r} must lie in (0, 1)")

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # [1797, 8, 8]
    labels = bunch.target.astype(np.int32)  # [1797]
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    arrays = [np.ascontiguousarray(a) for a in (tr_x, tr_y, te_x, te_y)]
    for a in arrays:
        a.setflags(write=False)
    return DigitsSplits(*arrays)


@dataclasses.dataclass(frozen=True)
class DigitsTokenizer:
    """Invertible map between 8x8 pixel images and tokens.

    ``discrete=False``: standardised continuous patch tokens [B, (8/p)^2, p^2] float32.
    ``discrete=True``: the integer pixels as tokens [B, 64] int32 (patch_size must be 1).
    """

    patch_size: int = 1
    mean: float = PIXEL_MEAN
    std: float = PIXEL_STD
    discrete: bool = False

    def __post_init__(self):
        if self.patch_size not in (1, 2, 4, 8):
            raise ValueError(
                f"digits patch_size={self.patch_size!r} must divide the 8x8 image: 1, 2, 4 or 8")
        if self.discrete and self.patch_size != 1:
            raise ValueError(f"discrete digits tokens are single pixels: patch_size must be 1, "
                             f"got {self.patch_size!r}")
        if not self.std > 0:
            raise ValueError(f"digits pixel std={self.std!r} must be > 0")

    @property
    def grid(self) -> int:
        return SIDE // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid ** 2

    @property
    def token_dim(self) -> int:
        """Channels per continuous token (1 for discrete tokens: one pixel each)."""
        return self.patch_size ** 2

    def encode(self, images: np.ndarray) -> np.ndarray:
        """images [B, 8, 8] in 0..16 -> tokens [B, (8/p)^2, p^2] float32 (discrete: [B, 64] int32)."""
        images = np.asarray(images, np.float32)
        if images.ndim != 3 or images.shape[-2:] != (SIDE, SIDE):
            raise ValueError(f"digits images must be [B, 8, 8], got shape {images.shape}")
        b, p, g = images.shape[0], self.patch_size, self.grid
        if self.discrete:
            values = np.rint(images)
            if np.any(np.abs(values - images) > 1e-4) or values.min() < 0 or values.max() > PIXEL_MAX:
                raise ValueError("discrete digits tokens need integer pixels in 0..16, got values "
                                 f"in [{images.min()}, {images.max()}]")
            return values.reshape(b, SIDE * SIDE).astype(np.int32)
        x = (images - self.mean) / self.std
        x = x.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4)  # [B, gy, gx, py, px]
        return x.reshape(b, g * g, p * p).astype(np.float32)

    def decode(self, tokens, clip: bool = True) -> np.ndarray:
        """tokens [B, (8/p)^2, p^2] (discrete: [B, 64] int) -> images [B, 8, 8] float32 in 0..16."""
        if self.discrete:
            tokens = np.asarray(tokens)
            if tokens.ndim != 2 or tokens.shape[1] != SIDE * SIDE:
                raise ValueError(f"discrete digits tokens must be [B, 64], got shape {tokens.shape}")
            if not np.issubdtype(tokens.dtype, np.integer):
                raise ValueError(f"discrete digits tokens must be integers, got {tokens.dtype}")
            images = tokens.reshape(-1, SIDE, SIDE).astype(np.float32)
            return np.clip(images, 0.0, PIXEL_MAX) if clip else images
        tokens = np.asarray(tokens, np.float32)
        b, p, g = tokens.shape[0], self.patch_size, self.grid
        if tokens.shape[1:] != (self.seq_len, self.token_dim):
            raise ValueError(
                f"digits tokens must be [B, {self.seq_len}, {self.token_dim}] for patch_size={p}, "
                f"got shape {tokens.shape}")
        x = tokens.reshape(b, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(b, SIDE, SIDE)
        x = x * self.std + self.mean
        return np.clip(x, 0.0, PIXEL_MAX) if clip else x


def digits_tokenizer(config) -> DigitsTokenizer:
    """The digits tokenizer a config's model expects: discrete pixels for the categorical
    head, continuous patches (size ``model.patch_size``) for the diffusion head."""
    m = config.model
    discrete = m.head == "categorical"
    checks = {"model.image_size": (m.image_size, SIDE),
              "model.latent_stride": (m.latent_stride, 1),
              "model.latent_channels": (m.latent_channels, 1),
              "model.num_classes": (m.num_classes, NUM_CLASSES)}
    if discrete:
        checks["model.patch_size"] = (m.patch_size, 1)
        checks["model.vocab_size"] = (m.vocab_size, PIXEL_LEVELS)
    for name, (got, want) in checks.items():
        if got != want:
            head = " with model.head='categorical'" if discrete else ""
            raise ValueError(f"data.source='digits'{head} needs {name}={want}, got {got!r}")
    return DigitsTokenizer(patch_size=int(m.patch_size), discrete=discrete)


class ArraySource:
    """Random-access source over equally long arrays; item i is {name: array[i]}.

    Satisfies grain's RandomAccessDataSource protocol (``__len__``, ``__getitem__``).
    """

    def __init__(self, **arrays: np.ndarray):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource arrays must have equal length, got {lengths}")
        self._arrays = arrays
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}

    def __repr__(self) -> str:
        shapes = {k: v.shape for k, v in self._arrays.items()}
        return f"ArraySource({shapes})"


def digits_split(config) -> tuple[float, int]:
    """(test_fraction, split_seed) of the digits data (fields only digits configs set)."""
    return float(config.data.get("test_fraction", 0.2)), int(config.data.get("split_seed", 0))


def digits_source(config, split: str = "train") -> ArraySource:
    """Tokenised digits split as a grain source of {'tokens': [N, C] f32 (discrete: [N] int32),
    'label': int32}."""
    if split not in ("train", "test"):
        raise ValueError(f"digits split={split!r}; expected 'train' or 'test'")
    splits = load_digits_splits(*digits_split(config))
    tok = digits_tokenizer(config)
    images = splits.train_images if split == "train" else splits.test_images
    labels = splits.train_labels if split == "train" else splits.test_labels
    return ArraySource(tokens=tok.encode(images), label=labels)
