"""LlamaGen class-to-image GPT checkpoints (``c2i_*.pt``) -> Flax parameters of ``model.arch='ar'``.

LlamaGen's module tree (``autoregressive/models/gpt.py``, ``model_type='c2i'``) and where each
tensor lands in `emigm_jax.models.ar.ARGenerator`:

  cls_embedding.embedding_table.weight [C+1, D] -> class_emb/embedding [C, D] (rows 0..C-1)
                                                   + fake_latent [1, D] (row C: the CFG class)
  tok_embeddings.weight [V, D]                  -> token_emb/embedding
  layers.<i>.attention_norm.weight              -> blocks/block_<i>/norm1/scale
  layers.<i>.attention.wqkv.weight [3D, D]      -> blocks/block_<i>/attn/qkv/kernel [D, 3D]
  layers.<i>.attention.wo.weight                -> blocks/block_<i>/attn/proj/kernel
  layers.<i>.ffn_norm.weight                    -> blocks/block_<i>/norm2/scale
  layers.<i>.feed_forward.w{1,2,3}.weight       -> blocks/block_<i>/mlp/w{1,2,3}/kernel
  norm.weight                                   -> norm/scale
  output.weight [V, D]                          -> out/kernel [D, V]
  freqs_cis, layers.<i>.attention.kv_cache.*    -> ignored (recomputed / inference buffers)

Every ``nn.Linear`` is bias-free; its weight [out, in] is transposed. The fused ``wqkv``
output is [q | k | v], heads contiguous inside each (``n_kv_head = n_head`` in every c2i
size), which is our Attention's split, so it is copied as is. The released checkpoints store
``{"model": state_dict}`` (DDP runs; LlamaGen's samplers also accept ``"module"`` and
``"state_dict"``) or, for FSDP runs (XXL, 3B), the bare state dict; `pick_state_dict`
follows the same order.

The config must compute LlamaGen's function, not just hold its shapes: ``model.arch='ar'``,
``norm_eps=1e-5``, ``rope_pairing='interleaved'``, ``rope_prefix='zero'`` (what
``configs/llamagen_sizes.py`` sets); anything else is refused with the field named.
Coverage both ways is checked by `emigm_jax.convert.common.convert_state_dict`.

CLI (writes an Orbax run directory that ``--mode=sample`` restores):

  python -m emigm_jax.convert.llamagen --src c2i_L_256.pt --config configs/llamagen_l_256.py \\
      --workdir runs/llamagen_l_256
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

import numpy as np

from emigm_jax.config_files import load_config
from emigm_jax.convert.common import (ConversionError, Rule, convert_state_dict, run_converter,
                                      to_numpy)
from emigm_jax.convert.emigm import (Converted, parameter_count, sample_command, save_orbax,
                                     target_shapes)
from emigm_jax.convert.torch_io import load_pth

CLASS_TABLE = "cls_embedding.embedding_table.weight"
_LAYER = r"layers\.(?P<i>\d+)"
_BLOCK = r"params.blocks.block.\g<i>"
LLAMAGEN_RULES: tuple[Rule, ...] = (
    Rule(r"freqs_cis", None),
    Rule(rf"{_LAYER}\.attention\.kv_cache\.[kv]_cache", None),
    Rule(r"class_rows", "params.class_emb.embedding"),
    Rule(r"cfg_row", "params.fake_latent"),
    Rule(r"tok_embeddings\.weight", "params.token_emb.embedding"),
    Rule(rf"{_LAYER}\.attention_norm\.weight", rf"{_BLOCK}.norm1.scale"),
    Rule(rf"{_LAYER}\.ffn_norm\.weight", rf"{_BLOCK}.norm2.scale"),
    Rule(rf"{_LAYER}\.attention\.wqkv\.weight", rf"{_BLOCK}.attn.qkv.kernel", "linear"),
    Rule(rf"{_LAYER}\.attention\.wo\.weight", rf"{_BLOCK}.attn.proj.kernel", "linear"),
    Rule(rf"{_LAYER}\.feed_forward\.(?P<w>w[123])\.weight", rf"{_BLOCK}.mlp.\g<w>.kernel",
         "linear"),
    Rule(r"norm\.weight", "params.norm.scale"),
    Rule(r"output\.weight", "params.out.kernel", "linear"),
)
# (field, value LlamaGen's forward needs) for the config check.
LLAMAGEN_MODEL = (("arch", "ar"), ("block", "llama"), ("pos_emb", "rope2d"),
                  ("head", "categorical"), ("norm_eps", 1e-5), ("rope_pairing", "interleaved"),
                  ("rope_prefix", "zero"))
STATE_DICT_KEYS = ("model", "module", "state_dict")


def check_config(config) -> None:
    """Raises ValueError naming the first model field that would not compute LlamaGen's GPT."""
    for field, value in LLAMAGEN_MODEL:
        have = config.model.get(field, None)
        if have != value:
            raise ValueError(f"config.model.{field}={have!r} does not compute LlamaGen's GPT: "
                             f"expected {value!r} (see configs/llamagen_sizes.py)")


def pick_state_dict(obj: Any, path: str = "checkpoint") -> dict[str, Any]:
    """The GPT state dict inside a loaded ``.pt``: ``model``, ``module``, ``state_dict``, or
    the object itself when every value is a tensor (FSDP files)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, expected a dict")
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    bad = [k for k, v in obj.items() if not hasattr(v, "shape")]
    if bad:
        raise ValueError(f"{path!r} has none of {STATE_DICT_KEYS} and is not a flat state dict "
                         f"(entry {bad[0]!r} is a {type(obj[bad[0]]).__name__})")
    return dict(obj)


def split_class_table(sd: Mapping[str, Any], num_classes: int) -> dict[str, np.ndarray]:
    """Replaces the [C+1, D] class table by ``class_rows`` [C, D] and ``cfg_row`` [1, D]."""
    out = {k: to_numpy(v) for k, v in sd.items()}
    if CLASS_TABLE not in out:
        return out  # reported as missing class_emb / fake_latent by the coverage check
    table = out.pop(CLASS_TABLE)
    if table.ndim != 2 or table.shape[0] != num_classes + 1:
        raise ConversionError(f"LlamaGen checkpoint: {CLASS_TABLE} has shape {table.shape}; "
                              f"expected [num_classes + 1 = {num_classes + 1}, width] (the "
                              f"last row is the CFG class, trained with class dropout > 0)")
    out["class_rows"], out["cfg_row"] = table[:num_classes], table[num_classes:]
    return out


def convert_llamagen(sd: Mapping[str, Any], config) -> dict:
    """Flat LlamaGen GPT state dict -> Flax ``params`` tree (numpy float32) for ``config``."""
    check_config(config)
    variables = convert_state_dict(split_class_table(sd, int(config.model.num_classes)),
                                   LLAMAGEN_RULES, target_shapes(config),
                                   what="LlamaGen GPT checkpoint (gpt.py c2i layout)")
    return variables["params"]


def convert_file(path: str, config: Any, *, trusted_pickle: bool = False) -> Converted:
    """Reads ``c2i_*.pt`` and converts it for ``config`` (ConfigDict, name or file path)."""
    config = load_config(config)
    sd = pick_state_dict(load_pth(path, trusted_pickle=trusted_pickle), path)
    params = convert_llamagen(sd, config)
    return Converted(params=params, raw_params=None, config=config,
                     config_name=str(config.get("name", "?")), overrides=[], notes=[],
                     args=None, weights="model")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="LlamaGen c2i_*.pt (torch)")
    p.add_argument("--config", required=True,
                   help="config name or file, e.g. configs/llamagen_l_256.py")
    p.add_argument("--workdir", required=True, help="output run directory (no checkpoint yet)")
    p.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
    p.add_argument("--trusted_pickle", action="store_true",
                   help="torch.load(weights_only=False): runs code from the file")
    args = p.parse_args(argv)
    converted = convert_file(args.src, args.config, trusted_pickle=args.trusted_pickle)
    directory = save_orbax(args.workdir, converted, step=args.step)
    config_path = args.config if os.path.isfile(args.config) else None
    print(f"converted {args.src} ({parameter_count(converted.params):,} parameters); wrote "
          f"{directory}; sample with:\n  "
          f"{sample_command(converted, args.workdir, config_path, [])}")
    print("note: decoding needs --config.tokenizer.path=<VQ-16 weights> "
          "(python -m emigm_jax.convert.vq)")


if __name__ == "__main__":
    run_converter(main)
