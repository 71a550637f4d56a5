"""LlamaGen VQ-16 checkpoint (``vq_ds16_c2i.pt``, state dict under ``"model"``) -> Flax variables.

LlamaGen's module tree (``tokenizer/tokenizer_image/vq_model.py``) and where each part lands in
`emigm_jax.tokenizers.vq.VQModel` (whose blocks are the KL VAE's, hence KL-style names):

  encoder.conv_blocks.<i>.res.<j>.*        -> encoder/down_<i>/block_<j>/*
  encoder.conv_blocks.<i>.attn.<j>.*       -> encoder/down_<i>/attn_<j>/*     (last level only)
  encoder.conv_blocks.<i>.downsample.conv  -> encoder/down_<i>/downsample/conv
  decoder.conv_blocks.<k>.res.<j>.*        -> decoder/up_<n-1-k>/block_<j>/*  (k = 0 is the
  decoder.conv_blocks.<k>.attn.<j>.*       -> decoder/up_<n-1-k>/attn_<j>/*    lowest resolution;
  decoder.conv_blocks.<k>.upsample.conv    -> decoder/up_<n-1-k>/upsample/conv  Flax indexes levels)
  {encoder,decoder}.mid.{0,1,2}            -> .../mid/{block_1,attn_1,block_2}
  {encoder,decoder}.{conv_in,norm_out,conv_out}, quant_conv, post_quant_conv: same names
  quantize.embedding.weight [K, D]         -> quantize/embedding (raw; normalised at use)
  quantize.codebook_used [65536]           -> ignored (training-time usage statistics buffer)

Leaves: GroupNorm ``weight`` -> ``scale``, ``bias`` -> ``bias``; every conv (incl. the 1x1
q/k/v/proj_out/nin_shortcut/quant convs) ``weight`` [O, I, k, k] -> ``kernel`` [k, k, I, O].
Coverage is checked by `emigm_jax.convert.common.convert_state_dict`: any unmatched key or
unfilled Flax leaf raises `ConversionError` listing all of them.

CLI: ``python -m emigm_jax.convert.vq --src vq_ds16_c2i.pt --dst vq16.msgpack`` writes Flax
variables that load without torch.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from emigm_jax.convert.common import (Rule, convert_state_dict, load_converted,
                                      load_state_dict, run_converter, select_entry, to_numpy,
                                      write_variables)
from emigm_jax.convert.torch_io import load_pth
from emigm_jax.tokenizers.vq import VQ8, VQ16, VQConfig, vq_variable_shapes

_NORMS = r"norm|norm1|norm2|norm_out"


def _module_rules(src: str, dst: str) -> tuple[Rule, ...]:
    """Rules for the direct parameters of the leaf modules under ``src`` (regex) -> ``dst``."""
    pre_s = f"{src}\\." if src else ""
    pre_d = f"{dst}." if dst else ""
    return (
        Rule(rf"{pre_s}(?P<leaf>{_NORMS})\.weight", rf"params.{pre_d}\g<leaf>.scale"),
        Rule(rf"{pre_s}(?P<leaf>{_NORMS})\.bias", rf"params.{pre_d}\g<leaf>.bias"),
        Rule(rf"{pre_s}(?P<leaf>\w+)\.weight", rf"params.{pre_d}\g<leaf>.kernel", "conv2d"),
        Rule(rf"{pre_s}(?P<leaf>\w+)\.bias", rf"params.{pre_d}\g<leaf>.bias"),
    )


def vq_rules(cfg: VQConfig = VQ16) -> tuple[Rule, ...]:
    """The LlamaGen -> Flax mapping table for ``cfg`` (the decoder's level count fixes k -> n-1-k)."""
    n = len(cfg.decoder_ch_mult)
    groups: list[tuple[str, str]] = [
        (r"encoder\.conv_blocks\.(?P<i>\d+)\.res\.(?P<j>\d+)", r"encoder.down.\g<i>.block.\g<j>"),
        (r"encoder\.conv_blocks\.(?P<i>\d+)\.attn\.(?P<j>\d+)", r"encoder.down.\g<i>.attn.\g<j>"),
        (r"encoder\.conv_blocks\.(?P<i>\d+)\.downsample", r"encoder.down.\g<i>.downsample"),
    ]
    for k in range(n):
        lvl = n - 1 - k
        groups += [
            (rf"decoder\.conv_blocks\.{k}\.res\.(?P<j>\d+)", rf"decoder.up.{lvl}.block.\g<j>"),
            (rf"decoder\.conv_blocks\.{k}\.attn\.(?P<j>\d+)", rf"decoder.up.{lvl}.attn.\g<j>"),
            (rf"decoder\.conv_blocks\.{k}\.upsample", rf"decoder.up.{lvl}.upsample"),
        ]
    for idx, name in enumerate(("block_1", "attn_1", "block_2")):
        groups.append((rf"(?P<part>encoder|decoder)\.mid\.{idx}", rf"\g<part>.mid.{name}"))
    groups.append((r"(?P<part>encoder|decoder)", r"\g<part>"))  # conv_in, norm_out, conv_out
    groups.append(("", ""))                                     # quant_conv, post_quant_conv
    rules: list[Rule] = [
        Rule(r"quantize\.codebook_used", None),
        Rule(r"quantize\.embedding\.weight", "params.quantize.embedding"),
    ]
    for src, dst in groups:
        rules.extend(_module_rules(src, dst))
    return tuple(rules)


VQ16_RULES = vq_rules(VQ16)


def convert_vq(state_dict: Mapping[str, Any], cfg: VQConfig = VQ16) -> dict:
    """Flat LlamaGen VQModel state dict -> ``{'params': ...}`` for `VQModel(cfg)`."""
    return convert_state_dict(state_dict, vq_rules(cfg), vq_variable_shapes(cfg),
                              what="LlamaGen VQ checkpoint (vq_model.py layout)")


def load_vq(path: str, cfg: VQConfig = VQ16, key: str | None = "model", *,
            trusted_pickle: bool = False) -> dict:
    """Flax variables from ``vq_ds16_c2i.pt`` (torch), a flat ``.safetensors`` or a converted ``.msgpack``.

    ``key`` picks the state dict inside a torch checkpoint (LlamaGen's samplers use
    ``"model"``; training snapshots also hold ``"ema"``). Training snapshots pickle an
    ``argparse.Namespace`` (``args``), which `emigm_jax.convert.torch_io.load_pth` allows
    without ``trusted_pickle``.
    """
    if path.endswith(".msgpack"):
        return load_converted(path, vq_variable_shapes(cfg), "VQ")
    if path.endswith(".safetensors"):
        return convert_vq(load_state_dict(path), cfg)
    return convert_vq({k: to_numpy(v) for k, v in select_entry(
        load_pth(path, trusted_pickle=trusted_pickle), key, path).items()}, cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True,
                   help="vq_ds16_c2i.pt / vq_ds8_c2i.pt (torch) or a flat .safetensors")
    p.add_argument("--arch", default="vq16", choices=("vq16", "vq8"),
                   help="LlamaGen VQ-16 (f16) or VQ-8 (f8)")
    p.add_argument("--dst", required=True, help="output .msgpack of Flax variables")
    p.add_argument("--key", default="model", help="sub-dict holding the state dict ('model', 'ema')")
    p.add_argument("--trusted_pickle", action="store_true",
                   help="torch.load(weights_only=False): runs code from the file")
    args = p.parse_args(argv)
    cfg = {"vq16": VQ16, "vq8": VQ8}[args.arch]
    variables = load_vq(args.src, cfg, key=args.key, trusted_pickle=args.trusted_pickle)
    write_variables(variables, args.dst)


if __name__ == "__main__":
    run_converter(main)
