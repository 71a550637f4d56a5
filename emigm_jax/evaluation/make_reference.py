"""Writes an ADM-format reference batch (mu, sigma, mu_s, sigma_s, arr_0) for an image folder.

    python -m emigm_jax.evaluation.make_reference --images=DIR --out=my_ref.npz \
        --inception=pt_inception-2015-12-05-6726825d.pth --image_size=256

Images are ADM-center-cropped to --image_size (the training-data preprocessing); the result
loads with `load_reference_stats` and serves `--mode=evaluate` as config.eval.reference_path.
"""
from __future__ import annotations

import argparse

from emigm_jax.convert.inception import load_inception_variables
from emigm_jax.evaluation.inception import make_feature_fn
from emigm_jax.evaluation.reference import iter_image_folder, write_adm_reference


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write an ADM-format reference batch for a folder")
    ap.add_argument("--images", required=True, help="folder of images (recursive)")
    ap.add_argument("--inception", required=True, help="pt_inception-*.pth or converted .msgpack")
    ap.add_argument("--out", required=True, help="output .npz")
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--limit", type=int, default=0, help="use the first N images (0: all)")
    ap.add_argument("--preprocess", default="adm", choices=("adm", "pytorch_fid"))
    ap.add_argument("--no_images", action="store_true", help="do not store arr_0")
    args = ap.parse_args(argv)
    fn = make_feature_fn(load_inception_variables(args.inception), preprocess=args.preprocess)
    ref = write_adm_reference(args.out, iter_image_folder(args.images, args.image_size,
                                                          args.batch_size, args.limit or None),
                              fn, store_images=not args.no_images)
    print(f"wrote {ref.path}: kind={ref.kind}, images stored={ref.num_images}")


if __name__ == "__main__":
    main()
