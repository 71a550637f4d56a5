"""pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> Flax variables of FIDInceptionV3.

The public file is a flat torch state dict in torchvision's Inception3 naming (94 BasicConv2d
blocks + `fc`, 1008 classes, no AuxLogits). Conversion is a renaming plus transposes:

  <mod>.conv.weight        [O, I, kh, kw] -> params/<mod>/conv/kernel     [kh, kw, I, O]
  <mod>.bn.weight / .bias  [O]            -> params/<mod>/bn/scale, bias
  <mod>.bn.running_mean/var[O]            -> batch_stats/<mod>/bn/mean, var
  <mod>.bn.num_batches_tracked            -> (ignored; optional)
  fc.weight [1008, 2048] / fc.bias [1008] -> params/fc_kernel [2048, 1008], params/fc_bias

where <mod> is a dotted path (`Mixed_6d.branch1x1`) that becomes nested dict keys. The table
goes through `convert.common.convert_state_dict`, which refuses to return unless every source
tensor was used and every Flax leaf was filled with the expected shape.

Usage: `python -m emigm_jax.convert.inception --src pt_inception-2015-12-05-6726825d.pth
--dst inception_fid.msgpack`; `load_inception_variables` accepts either file, so machines
without torch can use the converted msgpack.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

from flax import traverse_util

from emigm_jax.convert.common import (Rule, convert_state_dict, load_converted, load_state_dict,
                                      run_converter, write_variables)
from emigm_jax.evaluation.inception import FIDInceptionV3, variable_shapes

RULES: tuple[Rule, ...] = (
    Rule(r"fc\.weight", "params.fc_kernel", "linear"),
    Rule(r"fc\.bias", "params.fc_bias"),
    Rule(r"(.+)\.conv\.weight", r"params.\1.conv.kernel", "conv2d"),
    Rule(r"(.+)\.bn\.weight", r"params.\1.bn.scale"),
    Rule(r"(.+)\.bn\.bias", r"params.\1.bn.bias"),
    Rule(r"(.+)\.bn\.running_mean", r"batch_stats.\1.bn.mean"),
    Rule(r"(.+)\.bn\.running_var", r"batch_stats.\1.bn.var"),
    Rule(r"(.+)\.bn\.num_batches_tracked", None),
)
_BN_MAP = {"weight": ("params", "scale"), "bias": ("params", "bias"),
           "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def torch_to_flax(state_dict: Mapping[str, Any],
                  model: FIDInceptionV3 | None = None) -> dict:
    """Flat torch state dict (tensors or arrays) -> {'params': ..., 'batch_stats': ...}.

    Raises convert.common.ConversionError unless the coverage is exact.
    """
    return convert_state_dict(state_dict, RULES, variable_shapes(model),
                              what="FID Inception state dict")


def expected_torch_layout(model: FIDInceptionV3 | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the public weight file (without num_batches_tracked), from the Flax tree.

    Lets tests build a state dict of the right layout when torch is not installed.
    """
    flat = traverse_util.flatten_dict(variable_shapes(model))
    out = {}
    inv = {v: k for k, v in _BN_MAP.items()}
    for path, s in flat.items():
        col, *mod, leaf = path
        if path == ("params", "fc_kernel"):
            out["fc.weight"] = tuple(s.shape[::-1])
        elif path == ("params", "fc_bias"):
            out["fc.bias"] = tuple(s.shape)
        elif leaf == "kernel":
            kh, kw, i, o = s.shape
            out[".".join(mod[:-1]) + ".conv.weight"] = (o, i, kh, kw)
        else:
            out[".".join(mod[:-1]) + ".bn." + inv[(col, leaf)]] = tuple(s.shape)
    return out


def load_inception_variables(path: str) -> dict:
    """Loads Flax Inception variables from a .pth (converted on the fly) or a .msgpack."""
    if not path:
        raise ValueError("no Inception weight path given: set the config's eval.inception_path "
                         "to pt_inception-2015-12-05-6726825d.pth or a converted .msgpack")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Inception weights not found at {path!r} (expected pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth or a converted .msgpack)")
    if path.endswith((".pth", ".pt", ".bin")):
        return torch_to_flax(load_state_dict(path))
    return load_converted(path, variable_shapes(), "FID Inception")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="pt_inception-2015-12-05-*.pth")
    ap.add_argument("--dst", required=True, help="output .msgpack")
    args = ap.parse_args(argv)
    write_variables(torch_to_flax(load_state_dict(args.src)), args.dst)


if __name__ == "__main__":
    run_converter(main)
