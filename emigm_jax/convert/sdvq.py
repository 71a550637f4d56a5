"""CompVis latent-diffusion VQ-f8 checkpoint (``vq-f8/model.ckpt``, ``"state_dict"``) -> Flax.

`emigm_jax.tokenizers.sdvq.SDVQModel` mirrors ``ldm.models.autoencoder.VQModel``'s module
tree, so the table is a renaming plus layout transposes:

  {encoder,decoder}.<...>.{norm,norm1,norm2,norm_out}.weight [C]  -> params/<...>/<norm>/scale
  <m>.weight (every conv, incl. 1x1 q/k/v/proj_out/nin_shortcut,
             quant_conv, post_quant_conv)           [O, I, k, k]  -> params/<m>/kernel [k, k, I, O]
  <m>.bias                                          [O]           -> params/<m>/bias
  quantize.embedding.weight                         [16384, 4]    -> params/quantize/embedding
  loss.*  (LPIPS + discriminator, training only)                  -> ignored

ModuleList indices fold into names (``encoder.down.3.attn.1`` -> ``encoder/down_3/attn_1``).
Any other key (e.g. ``model_ema.*``, ``quantize.used`` of a remapped codebook) or any unfilled
Flax leaf is an error listing the offenders (`emigm_jax.convert.common.convert_state_dict`).

CLI: ``python -m emigm_jax.convert.sdvq --src model.ckpt --dst sdvq_f8.msgpack``.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from emigm_jax.convert.common import (Rule, convert_state_dict, load_converted, load_state_dict,
                                      write_variables)
from emigm_jax.tokenizers.sdvq import SD_VQ_F8, SDVQConfig, sdvq_variable_shapes

SDVQ_RULES: tuple[Rule, ...] = (
    Rule(r"loss\..*", None),
    Rule(r"quantize\.embedding\.weight", "params.quantize.embedding"),
    Rule(r"(?P<m>(?:.+\.)?(?:norm|norm1|norm2|norm_out))\.weight", r"params.\g<m>.scale"),
    Rule(r"(?P<m>.+)\.weight", r"params.\g<m>.kernel", "conv2d"),
    Rule(r"(?P<m>.+)\.bias", r"params.\g<m>.bias"),
)


def convert_sdvq(state_dict: Mapping[str, Any], cfg: SDVQConfig = SD_VQ_F8) -> dict:
    """Flat LDM VQModel state dict -> ``{'params': ...}`` for `SDVQModel(cfg)`."""
    return convert_state_dict(state_dict, SDVQ_RULES, sdvq_variable_shapes(cfg),
                              what="latent-diffusion VQ checkpoint (ldm VQModel layout)")


def load_sdvq(path: str, cfg: SDVQConfig = SD_VQ_F8, key: str | None = "state_dict") -> dict:
    """Flax variables from ``model.ckpt`` (torch), a flat ``.safetensors`` or a converted ``.msgpack``."""
    if path.endswith(".msgpack"):
        return load_converted(path, sdvq_variable_shapes(cfg), "SD-VQ")
    sd = load_state_dict(path, key=None if path.endswith(".safetensors") else key)
    return convert_sdvq(sd, cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="vq-f8 model.ckpt (torch) or a flat .safetensors")
    p.add_argument("--dst", required=True, help="output .msgpack of Flax variables")
    p.add_argument("--key", default="state_dict", help="sub-dict holding the state dict")
    args = p.parse_args(argv)
    variables = load_sdvq(args.src, SD_VQ_F8, key=args.key)
    write_variables(variables, args.dst)


if __name__ == "__main__":
    main()
