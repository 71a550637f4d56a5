"""Inception-v3 as used for FID (the TF 2015 `classify_image_graph_def.pb` network) in Flax.

Why a dedicated network: FID/sFID/IS numbers are only comparable when every paper uses the same
Inception weights *and* the same quirks of the 2015 TF graph. pytorch-fid reproduces the graph
with torchvision's Inception3 plus four patched blocks (FIDInceptionA/C/E_1/E_2): the 3x3 average
pools inside the blocks ignore padded zeros (TF `avg_pool` semantics), and the last block
(Mixed_7c) max-pools its pool branch. This module builds the same graph; parameter names follow
the torchvision/pytorch-fid state dict (`Mixed_6d.branch1x1.conv.weight` -> `Mixed_6d/branch1x1/
conv/kernel`), which keeps the converter in `emigm_jax.convert.inception` a renaming.

Outputs (all float32):
  pool            [B, 2048]  TF `pool_3`: FID features and precision/recall features.
  logits          [B, 1008]  `softmax/logits` with bias (pytorch-fid's `fc`).
  logits_unbiased [B, 1008]  pool @ W without bias. The ADM evaluator builds its softmax from the
                             `softmax/logits/MatMul` weight only and torch-fidelity's IS uses
                             `logits_unbiased` too, so the Inception Score uses this one.
  spatial         [B, 2023]  sFID features. The ADM evaluator reads `mixed_6/conv:0`, keeps the
                             first 7 channels and flattens row-major in NHWC. In the TF graph the
                             blocks are named mixed, mixed_1, ... mixed_10 = Mixed_5b, 5c, 5d, 6a,
                             6b, 6c, 6d, 6e, 7a, 7b, 7c, so `mixed_6` is **Mixed_6d** (not 6e), and
                             `mixed_6/conv` is that block's 1x1 branch after BN+ReLU (the op named
                             after the scope is the ReLU): Mixed_6d.branch1x1 output, 17x17x192,
                             channels [:7], flattened as (h, w, c) -> 17*17*7 = 2023 values. This
                             ordering matches the mu_s/sigma_s stored in ADM reference batches.

Preprocessing (images come in as [B, H, W, 3] with values in [0, 255], uint8 or float):
  'adm'         TF1 `ResizeBilinear` to 299x299 (align_corners=False, *no* half-pixel centres:
                src = dst * in/out) then (x - 128) / 128. This is what the ADM evaluator's graph
                does after `ExpandDims`, and what torch-fidelity (used by the eMIGM reference
                code for FID/IS) reproduces with `interpolate_bilinear_2d_like_tensorflow1x`.
                Use it to compare against the published reference statistics.
  'pytorch_fid' F.interpolate(bilinear, align_corners=False) (half-pixel centres, no antialias,
                including PyTorch's float32 rounding of the source coordinates) then
                2 * (x / 255) - 1, exactly pytorch-fid's InceptionV3 wrapper. Used for the
                numerical parity test; it gives slightly different features from 'adm' for
                256px inputs (grid shifted by half a pixel, and a 127.5 vs 128 centre), so FIDs
                against the published reference statistics should use 'adm'.
  'none'        input is already the network input in [-1, 1] at `image_size`.
Both resizes are written as two small dense interpolation matrices (exact, shape-static, and a
plain matmul on any accelerator).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emigm_jax import sharding as shd

PREPROCESS_MODES = ("adm", "pytorch_fid", "none")
INCEPTION_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3


# ----------------------------------------------------------------------------- preprocessing
def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """Dense [out, in] bilinear interpolation matrix for one axis (float64).

    'adm' = TF1 legacy resize (src = dst * in/out); 'pytorch_fid' = half-pixel centres with the
    source index clamped at 0 (PyTorch's align_corners=False rule). Both clamp the upper
    neighbour to in-1.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got in={in_size}, out={out_size}")
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    if mode == "adm":
        src = dst * scale
    elif mode == "pytorch_fid":
        # PyTorch's float32 CPU kernel: scale = float32(in / out), then one fused multiply-add
        # rounded to float32. Reproducing that rounding makes 'pytorch_fid' match
        # F.interpolate on float32 inputs to ~1e-7 (exact coordinates differ by up to ~7e-5).
        scale32 = np.float64(np.float32(in_size) / np.float32(out_size))
        src = (scale32 * (dst + 0.5) - 0.5).astype(np.float32).astype(np.float64)
        src = np.maximum(src, 0.0)
    else:
        raise ValueError(f"resize mode must be 'adm' or 'pytorch_fid', got {mode!r}")
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    if mode == "pytorch_fid":
        frac = frac.astype(np.float32).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def preprocess_images(images: jax.Array, mode: str = "adm",
                      size: int = INCEPTION_SIZE) -> jax.Array:
    """[B, H, W, 3] in [0, 255] -> [B, size, size, 3] in [-1, 1] (see module docstring)."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess mode must be one of {PREPROCESS_MODES}, got {mode!r}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    if mode == "none":
        if images.shape[1:3] != (size, size):
            raise ValueError(f"preprocess='none' needs {size}x{size} inputs, got "
                             f"{images.shape[1]}x{images.shape[2]}")
        return x
    _, h, w, _ = images.shape
    if (h, w) != (size, size):
        rh = jnp.asarray(resize_matrix(h, size, mode), jnp.float32)  # [S, H]
        rw = jnp.asarray(resize_matrix(w, size, mode), jnp.float32)  # [S, W]
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", rh, x, precision=hp)
        x = jnp.einsum("pw,bowc->bopc", rw, x, precision=hp)
    if mode == "adm":
        return (x - 128.0) / 128.0
    return x * (2.0 / 255.0) - 1.0


# ----------------------------------------------------------------------------- network
class ConvBN(nn.Module):
    """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU: torchvision's BasicConv2d."""
    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TF avg_pool: padded positions are not counted in the average.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(ConvBN, precision=self.precision)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(48, (1, 1), name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(ConvBN, precision=self.precision)
        b3 = c(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), (2, 2), "VALID")
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """Returns (block output, 1x1-branch output): the latter is TF's `mixed_N/conv`."""
    channels_7x7: int
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(ConvBN, precision=self.precision)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(ConvBN, precision=self.precision)
        b3 = c(192, (1, 1), name="branch3x3_1")(x)
        b3 = c(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), (2, 2), "VALID")
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """pool='avg' is FIDInceptionE_1 (Mixed_7b); pool='max' is FIDInceptionE_2 (Mixed_7c)."""
    pool: str = "avg"
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(ConvBN, precision=self.precision)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception graph. Variables: {'params', 'batch_stats'} (inference-only BN).

    `image_size` is the network input size after resizing (299 for real use; tests may shrink
    it to >= 75 to run fast, which changes the spatial grid of the sFID features).
    """
    preprocess: str = "adm"
    image_size: int = INCEPTION_SIZE
    precision: Any = "highest"

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """images [B, H, W, 3] in [0, 255] -> dict of features (see module docstring)."""
        if self.image_size < 75:
            raise ValueError(f"image_size must be >= 75 for Inception-v3, got {self.image_size}")
        x = preprocess_images(images, self.preprocess, self.image_size)   # [B, 299, 299, 3]
        c = functools.partial(ConvBN, precision=self.precision)
        pr = self.precision
        x = c(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)       # [B, 149, 149, 32]
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)                        # [B, 147, 147, 32]
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)        # [B, 147, 147, 64]
        x = nn.max_pool(x, (3, 3), (2, 2), "VALID")                       # [B, 73, 73, 64]
        x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)                        # [B, 73, 73, 80]
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)                       # [B, 71, 71, 192]
        x = nn.max_pool(x, (3, 3), (2, 2), "VALID")                       # [B, 35, 35, 192]
        x = InceptionA(32, pr, name="Mixed_5b")(x)                        # [B, 35, 35, 256]
        x = InceptionA(64, pr, name="Mixed_5c")(x)                        # [B, 35, 35, 288]
        x = InceptionA(64, pr, name="Mixed_5d")(x)                        # [B, 35, 35, 288]
        x = InceptionB(pr, name="Mixed_6a")(x)                            # [B, 17, 17, 768]
        x, _ = InceptionC(128, pr, name="Mixed_6b")(x)
        x, _ = InceptionC(160, pr, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, pr, name="Mixed_6d")(x)         # [B, 17, 17, 192]
        x, _ = InceptionC(192, pr, name="Mixed_6e")(x)                    # [B, 17, 17, 768]
        x = InceptionD(pr, name="Mixed_7a")(x)                            # [B, 8, 8, 1280]
        x = InceptionE("avg", pr, name="Mixed_7b")(x)                     # [B, 8, 8, 2048]
        x = InceptionE("max", pr, name="Mixed_7c")(x)                     # [B, 8, 8, 2048]
        pool = jnp.mean(x, axis=(1, 2))                                   # [B, 2048]
        kernel = self.param("fc_kernel", nn.initializers.lecun_normal(),
                            (POOL_DIM, NUM_LOGITS), jnp.float32)          # torch fc.weight.T
        bias = self.param("fc_bias", nn.initializers.zeros, (NUM_LOGITS,), jnp.float32)
        logits_unbiased = jnp.matmul(pool, kernel, precision=self.precision)  # [B, 1008]
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]                    # [B, 17, 17, 7]
        return {
            "pool": pool,
            "logits": logits_unbiased + bias,
            "logits_unbiased": logits_unbiased,
            "spatial": spatial.reshape(spatial.shape[0], -1),             # [B, 2023]
        }


def random_variables(seed: int = 0, model: FIDInceptionV3 | None = None) -> dict:
    """Random variables in the converter's layout, for tests and benchmarks.

    Drawn with numpy (fan-in scaled normals, identity BatchNorm): `model.init` spends about a
    minute on a CPU generating 24M truncated normals, this takes a second.
    """
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name in ("kernel", "fc_kernel"):
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in)).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, variable_shapes(model))


def variable_shapes(model: FIDInceptionV3 | None = None) -> dict:
    """Shape/dtype tree of the variables without allocating them."""
    model = model or FIDInceptionV3()
    size = model.image_size
    dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), dummy)


# ----------------------------------------------------------------------------- feature fn
FeatureFn = Callable[[Any], dict[str, np.ndarray]]


def make_feature_fn(variables: Mapping[str, Any], *, preprocess: str = "adm",
                    image_size: int = INCEPTION_SIZE, mesh: Mesh | None = None,
                    batch_axes: str | tuple[str, ...] | None = None,
                    outputs: tuple[str, ...] = ("pool", "logits_unbiased", "spatial"),
                    precision: Any = "highest") -> FeatureFn:
    """Jitted `images [B, H, W, 3] in [0, 255] -> {name: np.ndarray [B, D]}`.

    With a mesh the batch is sharded over `batch_axes` (default: all mesh axes) and the
    parameters are replicated; B must then be a multiple of the number of batch shards (use
    `pad_batch`). Variables are passed as jit arguments, not closed over, so compilation does
    not embed 24M constants.
    """
    bad = [o for o in outputs if o not in ("pool", "logits", "logits_unbiased", "spatial")]
    if bad:
        raise ValueError(f"unknown Inception outputs {bad}; expected a subset of "
                         "('pool', 'logits', 'logits_unbiased', 'spatial')")
    if mesh is None:
        num_shards, batch_sharding = 1, None
        v = jax.device_put(variables)
    else:
        axes = tuple(mesh.axis_names) if batch_axes is None else batch_axes
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        num_shards = int(np.prod([mesh.shape[a] for a in axes]))
        batch_sharding = NamedSharding(mesh, P(axes))
        v = jax.device_put(variables, NamedSharding(mesh, P()))
    fn = _jitted_forward(preprocess, image_size, precision, tuple(outputs), mesh,
                         None if mesh is None else axes)

    def feature_fn(images) -> dict[str, np.ndarray]:
        """Single process: the whole batch. Multi-process: this host's rows (numpy) or a
        global jax.Array; the result always holds the global batch."""
        if mesh is not None and jax.process_count() > 1 and not isinstance(images, jax.Array):
            local = np.asarray(images)
            shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
            images = jax.make_array_from_process_local_data(batch_sharding, local, shape)
        elif (mesh is not None and isinstance(images, jax.Array)
              and not images.sharding.is_equivalent_to(batch_sharding, images.ndim)):
            images = jax.device_put(images, batch_sharding)  # e.g. a decoder's output layout
        if images.shape[0] % num_shards:
            raise ValueError(f"batch size {images.shape[0]} is not a multiple of the "
                             f"{num_shards} batch shards; pad it with pad_batch()")
        out = fn(v, images)
        return {k: shd.to_host(a) for k, a in out.items()}

    feature_fn.num_shards = num_shards  # type: ignore[attr-defined]
    return feature_fn


@functools.lru_cache(maxsize=32)
def _jitted_forward(preprocess, image_size, precision, outputs, mesh, axes):
    """One jitted forward per setup, shared by every feature fn built with it, so evaluation
    and sweeps that rebuild feature fns do not recompile Inception."""
    model = FIDInceptionV3(preprocess=preprocess, image_size=image_size, precision=precision)

    def forward(v, images):
        out = model.apply(v, images)
        return {k: out[k] for k in outputs}

    if mesh is None:
        return jax.jit(forward)
    batch = NamedSharding(mesh, P(axes))
    return jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)


def pad_batch(images: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pads the batch dim (repeating the last image) to a multiple; returns (padded, n_valid)."""
    n = images.shape[0]
    if n == 0:
        raise ValueError("cannot pad an empty batch")
    rem = (-n) % multiple
    if rem:
        images = np.concatenate([images, np.repeat(images[-1:], rem, axis=0)], axis=0)
    return images, n
