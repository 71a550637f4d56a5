"""Configs for official eMIGM/MAR checkpoints: from the training ``args`` and their shapes.

``config_from_args`` picks ``configs/emigm_<size>_<res>.py`` (or ``configs/mar.py``) for a
checkpoint's ``args`` and overrides what the args change; ``check_args_against_config``
rejects a config whose semantics (heads, arch) differ where shapes cannot tell;
``shape_signature`` reads the model sizes off a state dict for ``suggest_configs``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from emigm_jax.config_files import config_names, load_config
from emigm_jax.convert.common import ConversionError
from emigm_jax.models import seq_len, token_dim

# args.model of the reference scripts -> size tag of configs/emigm_<size>_<res>.py
ARGS_MODEL_SIZES = {
    "emigm_xsmall": "xs", "emigm_small": "s", "emigm_base": "b", "emigm_large": "l",
    "emigm_huge": "h", "mar_base": "b", "mar_large": "l", "mar_huge": "h",
}
# args.mask_strategy -> mask.schedule
MASK_STRATEGY_TO_SCHEDULE = {"cosine": "cosine", "linear": "linear", "poly-0.5": "sqrt",
                             "exp": "exp", "log": "log_exp"}



class CheckpointMismatchError(ConversionError):
    """The checkpoint does not fit the requested config (names the first offending tensor)."""


def available_configs() -> list[str]:
    """Config names under configs/ that describe a diffusion-head model (not base)."""
    return [n for n in config_names() if n != "base"]


def _args_overrides(args: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields (dotted) implied by a training run's args; only keys args actually has."""
    o: dict[str, Any] = {}
    model = str(args.get("model", ""))
    mar = model.startswith("mar_")

    def put(field, key, fn=lambda v: v):
        if key in args and args[key] is not None:
            o[field] = fn(args[key])

    put("model.image_size", "img_size", int)
    put("model.latent_channels", "vae_embed_dim", int)
    put("model.latent_stride", "vae_stride", int)
    put("model.patch_size", "patch_size", int)
    put("model.head_depth", "diffloss_d", int)
    put("model.head_width", "diffloss_w", int)
    put("model.buffer_size", "buffer_size", int)
    put("model.num_classes", "class_num", int)
    put("model.attn_dropout", "attn_dropout", float)
    put("model.proj_dropout", "proj_dropout", float)
    put("model.label_drop_prob", "label_drop_prob", float)
    put("model.diffusion_batch_mul", "diffusion_batch_mul", int)
    o["model.cfg_mode"] = "mask_token" if bool(args.get("use_unsup_cfg", False)) else "fake_class"
    if not bool(args.get("use_mae", True)):
        o["model.arch"] = "single"
        o["model.single_reference_semantics"] = True
    else:
        o["model.arch"] = "mae"
    if not mar:  # MAR's masking and sampling recipe comes from configs/mar.py as is
        put("mask.schedule", "mask_strategy", lambda v: MASK_STRATEGY_TO_SCHEDULE.get(v, v))
        put("mask.t_min", "clamp_t_min", float)
        if "use_weighted_loss" in args:
            o["mask.weight"] = "mdm" if args["use_weighted_loss"] else "one"
    return o


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    with config.unlocked():
        node[leaf] = value


def config_from_args(args: Mapping[str, Any]):
    """The config file for ``args.model`` / ``args.img_size`` with model fields from ``args``.

    eMIGM: ``configs/emigm_<size>_<img_size>.py``. MAR (``mar_base/large/huge``):
    ``configs/mar.py`` (MAR's masking and sampling recipe, MAR-B size) with the transformer
    size of ``emigm_<size>_256`` (MAR and eMIGM share the B/L/H sizes).
    Returns (config, config file name, ["field=value" overrides that differ from the file]).
    """
    model = args.get("model")
    if model not in ARGS_MODEL_SIZES:
        raise ValueError(f"checkpoint args.model={model!r} is not a known eMIGM/MAR model "
                         f"({', '.join(ARGS_MODEL_SIZES)}); pass --config")
    img = int(args.get("img_size", 256))
    size_name = f"emigm_{ARGS_MODEL_SIZES[model]}_{img}"
    name = "mar" if model.startswith("mar_") else size_name
    try:
        config = load_config(name)
        size = load_config(size_name) if name != size_name else config
    except ValueError as e:
        raise ValueError(f"checkpoint args.model={model!r}, img_size={img} would use "
                         f"configs/{name}.py and configs/{size_name}.py; one does not exist; "
                         f"pass --config (available: {', '.join(available_configs())})") from e
    fields = {f"model.{k}": size.model[k] for k in
              ("width", "enc_depth", "dec_depth", "num_heads", "head_depth", "head_width")}
    fields.update(_args_overrides(args))
    changed = []
    for field, value in fields.items():
        if _get(config, field) != value:
            _set(config, field, value)
            changed.append(f"{field}={value}")
    if name != size_name:
        with config.unlocked():
            config.name = f"{model}_{img}"
    return config, name, changed


def check_args_against_config(args: Mapping[str, Any], config) -> list[str]:
    """Errors for model semantics that shapes cannot reveal; returns notes on the rest.

    Heads and arch change the function without changing any tensor shape, so they must match
    ``args``; training-only fields (mask schedule, t_min...) only produce notes.
    """
    model = args.get("model")
    if model in ARGS_MODEL_SIZES:
        ref = load_config(f"emigm_{ARGS_MODEL_SIZES[model]}_256")
        if int(config.model.num_heads) != int(ref.model.num_heads):
            raise CheckpointMismatchError(
                f"checkpoint args.model={model!r} has {ref.model.num_heads} attention heads but "
                f"config.model.num_heads={config.model.num_heads} (heads do not show in tensor "
                f"shapes); set --config.model.num_heads={ref.model.num_heads}")
    notes = []
    for field, value in _args_overrides(args).items():
        have = _get(config, field)
        if have == value:
            continue
        if field in ("model.arch", "model.single_reference_semantics"):
            raise CheckpointMismatchError(
                f"checkpoint args.use_mae={args.get('use_mae')} implies {field}={value!r} but the "
                f"config has {have!r}; set --config.{field}={value}")
        if field == "model.cfg_mode" and value == "mask_token":
            notes.append("checkpoint shares mask token and fake class (use_unsup_cfg) but "
                         "config.model.cfg_mode='fake_class': both Flax vectors get the shared "
                         "value (same function; training would untie them)")
            continue
        notes.append(f"config {field}={have!r} differs from the checkpoint's training args "
                     f"({value!r})")
    return notes


def shape_signature(sd: Mapping[str, np.ndarray]) -> dict[str, int] | None:
    """Model sizes readable from tensor shapes (None if the state dict is not eMIGM-like)."""
    try:
        count = lambda rx: len({k.split(".")[1] for k in sd if re.fullmatch(rx, k)})  # noqa: E731
        return dict(
            width=int(sd["class_emb.weight"].shape[1]),
            num_classes=int(sd["class_emb.weight"].shape[0]),
            token_dim=int(sd["z_proj.weight"].shape[1]),
            seq_len=int(sd["diffusion_pos_embed_learned"].shape[1]),
            total=int(sd["encoder_pos_embed_learned"].shape[1]),
            enc_depth=count(r"encoder_blocks\.\d+\.norm1\.weight"),
            dec_depth=count(r"decoder_blocks\.\d+\.norm1\.weight"),
            head_width=int(sd["diffloss.net.cond_embed.weight"].shape[0]),
            head_depth=len({k.split(".")[3] for k in sd
                            if re.fullmatch(r"diffloss\.net\.res_blocks\.\d+\.in_ln\.weight", k)}),
        )
    except (KeyError, IndexError, AttributeError):
        return None


def config_signature(config) -> dict[str, int]:
    m = config.model
    n = seq_len(config)
    return dict(width=m.width, num_classes=m.num_classes, token_dim=token_dim(config), seq_len=n,
                total=m.buffer_size + n, enc_depth=m.enc_depth, dec_depth=m.dec_depth,
                head_width=m.head_width, head_depth=m.head_depth)
