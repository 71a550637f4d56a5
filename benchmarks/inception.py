"""Throughput of FID feature extraction (resize + Inception-v3 + pool/logits/spatial outputs).

    python benchmarks/inception.py --batch_size=32 --iters=5 [--weights=pt_inception-...pth]

Random weights unless --weights is given (speed does not depend on the values). With more
than one device the batch is sharded over all of them (pass --batch_size as a multiple).
Prints one JSON line: images/s, per-batch seconds, compile seconds, device description.
"""
from __future__ import annotations

import argparse
import json
import os


import jax
import numpy as np

from emigm_jax.evaluation.inception import make_feature_fn, random_variables
from timing import timed_calls  # this folder (the script's sys.path[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--image_size", type=int, default=256, help="input size before the resize")
    ap.add_argument("--preprocess", default="adm", choices=("adm", "pytorch_fid"))
    ap.add_argument("--precision", default="highest", choices=("highest", "default"))
    ap.add_argument("--weights", default="", help="optional .pth / .msgpack")
    args = ap.parse_args()

    if args.weights:
        from emigm_jax.convert.inception import load_inception_variables
        variables = load_inception_variables(args.weights)
    else:
        variables = random_variables(0)
    mesh = None
    if jax.device_count() > 1:
        mesh = jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    fn = make_feature_fn(variables, preprocess=args.preprocess, mesh=mesh,
                         precision=args.precision)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.batch_size, args.image_size, args.image_size, 3),
                          dtype=np.uint8)
    # fn returns host numpy arrays, so each timing includes the transfer
    (compile_s,), _ = timed_calls(lambda i: fn(images), 1)
    times, _ = timed_calls(lambda i: fn(images), args.iters)
    per_batch = float(np.median(times))
    dev = jax.devices()[0]
    print(json.dumps({
        "benchmark": "inception_features", "images_per_s": args.batch_size / per_batch,
        "batch_size": args.batch_size, "input": f"{args.image_size}x{args.image_size}",
        "preprocess": args.preprocess, "precision": args.precision,
        "median_batch_s": per_batch, "compile_s": compile_s,
        "devices": f"{jax.device_count()} x {dev.platform} ({getattr(dev, 'device_kind', '')})",
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
