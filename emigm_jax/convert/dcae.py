"""DC-AE weights in diffusers format (``AutoencoderDC`` safetensors) -> Flax variables.

Target format: the diffusers release ``mit-han-lab/dc-ae-f32c32-in-1.0-diffusers``
(``config.json`` + ``diffusion_pytorch_model.safetensors``). Read with numpy only (no torch).
The original efficientvit release (``mit-han-lab/dc-ae-f32c32-in-1.0``, keys like
``encoder.stages.1.op_list.0.main...``) is detected and refused with instructions: diffusers'
``AutoencoderDC.from_single_file(...).save_pretrained(...)`` converts it.

Mapping table (list indices fold into names: ``down_blocks.3.1`` -> ``down_blocks_3_1``):

  *.num_batches_tracked                      -> ignored (BatchNorm counter)
  <m>.running_mean / .running_var            -> batch_stats/<m>/mean, var
  <m>.{norm,norm_out}.weight                 -> params/<m>/<norm>/scale   (RMSNorm, BatchNorm)
  <m>.to_{q,k,v,out}.weight  [out, in]       -> params/<m>/kernel [in, out]
  <m>.weight (conv, incl. grouped/depthwise) -> params/<m>/kernel [k, k, I/g, O]
  <m>.bias                                   -> params/<m>/bias

CLI: ``python -m emigm_jax.convert.dcae --src <dir with config.json + safetensors> --dst
dcae.msgpack``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Mapping


from emigm_jax.convert.common import (Rule, convert_state_dict, load_converted, load_state_dict,
                                      run_converter, write_variables)
from emigm_jax.tokenizers.dcae import DC_AE_F32C32_IN, AutoencoderDC, DCAEConfig
from emigm_jax.tokenizers.vae import abstract_variables

DCAE_RULES: tuple[Rule, ...] = (
    Rule(r".+\.num_batches_tracked", None),
    Rule(r"(?P<m>.+)\.running_mean", r"batch_stats.\g<m>.mean"),
    Rule(r"(?P<m>.+)\.running_var", r"batch_stats.\g<m>.var"),
    Rule(r"(?P<m>(?:.+\.)?(?:norm|norm_out))\.weight", r"params.\g<m>.scale"),
    Rule(r"(?P<m>.+\.to_(?:q|k|v|out))\.weight", r"params.\g<m>.kernel", "linear"),
    Rule(r"(?P<m>.+)\.weight", r"params.\g<m>.kernel", "conv2d"),
    Rule(r"(?P<m>.+)\.bias", r"params.\g<m>.bias"),
)

_ORIGINAL_FORMAT_MARKERS = (".stages.", ".op_list.", "project_in.", "context_module")


def variable_shapes(cfg: DCAEConfig = DC_AE_F32C32_IN) -> Mapping[str, Any]:
    return abstract_variables(AutoencoderDC(cfg), cfg.stride, cfg.in_channels)


def convert_dcae(state_dict: Mapping[str, Any], cfg: DCAEConfig = DC_AE_F32C32_IN) -> dict:
    """Flat diffusers AutoencoderDC state dict -> ``{'params', 'batch_stats'}``."""
    original = [k for k in state_dict if any(m in k for m in _ORIGINAL_FORMAT_MARKERS)]
    if original:
        raise ValueError(
            f"this looks like the original efficientvit DC-AE format (e.g. {original[0]!r}); "
            "expected the diffusers format. Convert it once with diffusers: "
            "AutoencoderDC.from_single_file(path, config='mit-han-lab/dc-ae-f32c32-in-1.0-"
            "diffusers').save_pretrained(out_dir), or download the '-diffusers' release")
    return convert_state_dict(state_dict, DCAE_RULES, variable_shapes(cfg),
                              what="DC-AE checkpoint (diffusers AutoencoderDC layout)")


def read_config(path: str) -> DCAEConfig | None:
    """DCAEConfig from ``config.json`` next to (or inside) ``path``; None if there is none."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    f = os.path.join(d, "config.json")
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        return DCAEConfig.from_diffusers_config(json.load(fh))


def _weights_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if len(files) == 1:
            return files[0]
        raise FileNotFoundError(f"{path!r} should hold exactly one .safetensors file, found {files}")
    raise FileNotFoundError(f"DC-AE weights not found: {path!r}")


def load_dcae(path: str, cfg: DCAEConfig | None = None) -> tuple[dict, DCAEConfig]:
    """(Flax variables, config) from a diffusers DC-AE directory/safetensors or a ``.msgpack``.

    The config comes from ``cfg``, else ``config.json`` beside the weights, else f32c32-in-1.0;
    a ``config.json`` that disagrees with ``cfg`` is an error.
    """
    file_cfg = read_config(path)
    if cfg is None:
        cfg = file_cfg or DC_AE_F32C32_IN
    elif file_cfg is not None and file_cfg != cfg:
        diff = {f: (getattr(cfg, f), getattr(file_cfg, f)) for f in cfg.__dataclass_fields__
                if getattr(cfg, f) != getattr(file_cfg, f) and f != "scaling_factor"}
        if diff:
            raise ValueError(f"{path!r}: config.json differs from the requested config: {diff}")
    wf = _weights_file(path)
    if wf.endswith(".msgpack"):
        return load_converted(wf, variable_shapes(cfg), "DC-AE"), cfg
    return convert_dcae(load_state_dict(wf), cfg), cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="diffusers DC-AE dir or .safetensors")
    p.add_argument("--dst", required=True, help="output .msgpack of Flax variables")
    args = p.parse_args(argv)
    variables, cfg = load_dcae(args.src)
    write_variables(variables, args.dst)
    print(f"config {cfg}")


if __name__ == "__main__":
    run_converter(main)
