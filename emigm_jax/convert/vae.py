"""MAR's KL-16 VAE checkpoint (``kl16.ckpt``, state dict under ``"model"``) -> Flax variables.

The Flax module (`emigm_jax.tokenizers.vae.AutoencoderKL`) mirrors MAR's torch module tree,
so the table below is a renaming plus layout transposes:

  <m>.{norm,norm1,norm2,norm_out}.weight  [C]            -> params/<m>/<norm>/scale
  <m>.weight (every conv, incl. 1x1 q/k/v) [O, I, k, k]  -> params/<m>/kernel [k, k, I, O]
  <m>.bias                                [O]            -> params/<m>/bias
  loss.*  (LDM training-only LPIPS/discriminator, if present)  -> ignored

with ModuleList indices folded into names (``down.4.attn.1`` -> ``down_4/attn_1``). Any other
key, or any unfilled Flax leaf, is an error listing the offenders (`convert.common`).

CLI: ``python -m emigm_jax.convert.vae --src kl16.ckpt --dst kl16.msgpack`` writes Flax
variables that load without torch.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping


from emigm_jax.convert.common import (Rule, convert_state_dict, load_converted, load_state_dict,
                                      run_converter, write_variables)
from emigm_jax.tokenizers.vae import KL16, AutoencoderKL, KLVAEConfig, abstract_variables

KL16_RULES: tuple[Rule, ...] = (
    Rule(r"loss\..*", None),
    Rule(r"(?P<m>(?:.+\.)?(?:norm|norm1|norm2|norm_out))\.weight", r"params.\g<m>.scale"),
    Rule(r"(?P<m>.+)\.weight", r"params.\g<m>.kernel", "conv2d"),
    Rule(r"(?P<m>.+)\.bias", r"params.\g<m>.bias"),
)


def variable_shapes(cfg: KLVAEConfig = KL16) -> Mapping[str, Any]:
    """Shapes/dtypes of the Flax variables (no allocation)."""
    return abstract_variables(AutoencoderKL(cfg), cfg.stride, cfg.in_channels)


def convert_kl_vae(state_dict: Mapping[str, Any], cfg: KLVAEConfig = KL16) -> dict:
    """Flat MAR/LDM AutoencoderKL state dict -> ``{'params': ...}`` for `AutoencoderKL(cfg)`."""
    return convert_state_dict(state_dict, KL16_RULES, variable_shapes(cfg),
                              what="KL VAE checkpoint (MAR vae.py layout)")


def load_kl_vae(path: str, cfg: KLVAEConfig = KL16, key: str | None = "model") -> dict:
    """Flax variables from ``kl16.ckpt`` (torch), a ``.safetensors`` file or a converted ``.msgpack``."""
    if path.endswith(".msgpack"):
        return load_converted(path, variable_shapes(cfg), "KL VAE")
    sd = load_state_dict(path, key=None if path.endswith(".safetensors") else key)
    return convert_kl_vae(sd, cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="kl16.ckpt (torch) or .safetensors")
    p.add_argument("--dst", required=True, help="output .msgpack of Flax variables")
    p.add_argument("--key", default="model", help="sub-dict holding the state dict")
    args = p.parse_args(argv)
    write_variables(load_kl_vae(args.src, KL16, key=args.key), args.dst)


if __name__ == "__main__":
    run_converter(main)
