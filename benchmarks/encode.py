r"""Tokenizer encoding throughput (images/s), the cost of building a latent cache.

  python benchmarks/encode.py                       # KL-16, 256px, CPU: batch 8 fp32
  python benchmarks/encode.py --batch_size=256 --dtype=bfloat16   # GPU setting
  python benchmarks/encode.py --tokenizer=dcae_f32c32 --image_size=512

Random weights (throughput does not depend on their values). Defaults depend on the backend:
CPU batch 8 float32, accelerators batch 256 bfloat16. The batch is sharded over all local
devices as in `emigm_jax.data.cache_latents`. ``--with_flip`` times what caching does (image
and flip per image). Prints one JSON line.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from emigm_jax.tokenizers import build_tokenizer
from timing import timed_calls  # this folder (the script's sys.path[0])

flags.DEFINE_enum("tokenizer", "kl16", ["kl16", "dcae_f32c32"], "tokenizer")
flags.DEFINE_integer("image_size", 0, "0: 256 for kl16, 512 for dcae_f32c32")
flags.DEFINE_integer("batch_size", 0, "global batch; 0: 8 on CPU, 256 otherwise")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default by backend)")
flags.DEFINE_integer("steps", 5, "timed steps")
flags.DEFINE_integer("warmup", 1, "untimed steps after compilation")
flags.DEFINE_bool("with_flip", False, "encode image and flip (as the cache does)")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    size = FLAGS.image_size or (256 if FLAGS.tokenizer == "kl16" else 512)
    batch = FLAGS.batch_size or (8 if on_cpu else 256)
    dtype = FLAGS.dtype or ("float32" if on_cpu else "bfloat16")
    devices = jax.local_devices()
    if batch % len(devices):
        raise ValueError(f"batch {batch} not divisible by {len(devices)} devices")
    tok = build_tokenizer(FLAGS.tokenizer, dtype=jnp.dtype(dtype))
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(tok.random_variables(0), repl)

    def encode(v, x):
        if FLAGS.with_flip:
            x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
        return tok.encode_moments(v, x)

    fn = jax.jit(encode, in_shardings=(repl, data), out_shardings=data)
    x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3))
                       .astype(np.float32), data)
    (compile_s,), _ = timed_calls(lambda i: fn(variables, x), 1)
    times, _ = timed_calls(lambda i: fn(variables, x), FLAGS.steps, warmup=FLAGS.warmup)
    step = float(np.median(times))
    print(json.dumps(dict(
        benchmark="encode", tokenizer=FLAGS.tokenizer, image_size=size, batch=batch, dtype=dtype,
        with_flip=FLAGS.with_flip, backend=backend, device=devices[0].device_kind,
        num_devices=len(devices), images_per_s=round(batch / step, 2),
        step_ms_median=round(1000 * step, 1), step_ms_min=round(1000 * min(times), 1),
        compile_s=round(compile_s, 1), steps=FLAGS.steps, jax=jax.__version__)))


if __name__ == "__main__":
    app.run(main)
