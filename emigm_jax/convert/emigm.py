"""Official eMIGM (and MAR) PyTorch checkpoints -> Flax parameters and an Orbax checkpoint.

Layout of an official ``.pth`` (the reference code's checkpoints): ``{'model', 'model_ema',
'optimizer', 'epoch', 'scaler', 'args'}``; ``model``/``model_ema`` are flat state dicts in the module tree
of the reference ``models/emigm.py`` (timm ``Block``s, MAR's ``SimpleMLPAdaLN``), ``args`` the
training ``argparse.Namespace``. Our Flax tree keeps the same names, so the mapping is a rule
table (`emigm_rules`) applied by `emigm_jax.convert.common.convert_state_dict`, which refuses
to return unless every tensor is used and every Flax leaf is filled with the right shape.
Layout facts the table relies on (checked against the reference code and by the parity test
in tests/test_convert_emigm.py, which runs an independent torch forward):

  * ``nn.Linear.weight`` [out, in] -> Dense ``kernel`` [in, out]; LayerNorm weight/bias ->
    scale/bias; ``class_emb.weight`` -> Embed ``embedding``.
  * timm's fused ``attn.qkv`` reshapes its output as (B, N, 3, heads, head_dim): [q | k | v]
    along the output dim, heads contiguous inside each; our Attention splits the same way,
    so the fused kernel is copied as is (transposed).
  * the head's timestep embedding is [cos | sin] (GLIDE order) in both; the head's output
    is [eps | variance value] (``th.split(model_output, C, dim=1)`` in the iDDPM code).
  * ``time_embed.mlp.{0,2}``, ``res_blocks.i.mlp.{0,2}``, ``adaLN_modulation.1`` keep their
    Sequential indices (``mlp_0``, ``adaLN_modulation_1``); ``norm_final`` has no params.

The shared mask / fake-class vector (``--use_unsup_cfg True``, our ``cfg_mode='mask_token'``).
The reference assigns ``self.mask_token = self.fake_latent``: one Parameter registered under
two names. ``state_dict()`` lists it twice (hence 292 tensors for XS but 448 fewer unique
values), while ``named_parameters()`` lists it once, as ``fake_latent`` (first registered).
What the reference evaluation (``main_emigm.py --resume ... --evaluate``) actually runs:

  1. ``model.load_state_dict(ckpt['model'])``: the shared vector <- the online value.
  2. ``ema_params = [ckpt['model_ema'][name] for name in named_parameters()]``: for the shared
     vector this reads ``model_ema['fake_latent']``, its true EMA.
  3. ``evaluate(use_ema=True)`` builds ``sd = deepcopy(model.state_dict())`` (both names
     alias the online value), overwrites ``sd[name] = ema_params[i]`` for each named parameter
     (so ``sd['fake_latent']`` = EMA, ``sd['mask_token']`` still = online), then
     ``load_state_dict(sd)``. ``_load_from_state_dict`` copies the root module's parameters in
     registration order, ``fake_latent`` before ``mask_token``, into the same tensor: the last
     copy wins, so **evaluation runs every parameter at its EMA value except the shared vector,
     which holds the online value ``ckpt['model']['mask_token']``**. (``save_model`` builds
     ``model_ema`` the same way, which is why ``model_ema['mask_token']`` is the online value
     too; a file with only ``model_ema`` loads it directly and ends with the same vector.)

``weights='ema'`` (default) reproduces exactly that; ``weights='raw'`` takes every tensor from
``model``; ``weights='ema_all'`` takes every tensor from ``model_ema`` and the shared vector
from its true EMA (``model_ema['fake_latent']``), which the reference never evaluates.

MAR checkpoints (``LTH14/mar``) have the same module names but a separate ``mask_token``
[1, 1, D] next to ``fake_latent`` [1, D]: they convert with ``cfg_mode='fake_class'``.

Config choice (``emigm_jax.convert.emigm_configs``): from ``args``, or a given config checked
tensor by tensor, naming the first misfit and the configs whose shapes do fit.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from emigm_jax.checkpoint import Checkpointer
from emigm_jax.config_files import load_config
from emigm_jax.convert.common import (TRANSFORMS, ConversionError, Rule, convert_state_dict,
                                      dotted_to_path, first_match, flatten, load_state_dict,
                                      to_numpy)
from emigm_jax.convert.emigm_configs import (CheckpointMismatchError, available_configs,
                                             check_args_against_config, config_from_args,
                                             config_signature, shape_signature)
from emigm_jax.convert.torch_io import load_pth, namespace_to_dict
from emigm_jax.models import param_shapes
from emigm_jax.models.layout import to_layout

WEIGHTS = ("ema", "raw", "ema_all")

# ---------------------------------------------------------------------------------------------
# The mapping table.

_BLOCK = r"(?P<s>encoder|decoder)_blocks\.(?P<i>\d+)"
_NET = r"diffloss\.net"
_HEAD_LINEAR = (r"time_embed\.mlp\.[02]|cond_embed|input_proj|"
                r"res_blocks\.\d+\.(?:mlp\.[02]|adaLN_modulation\.1)|"
                r"final_layer\.(?:linear|adaLN_modulation\.1)")


def emigm_rules(cfg_mode: str = "mask_token") -> tuple[Rule, ...]:
    """Torch name regex -> Flax path template (see `convert.common`), per ``cfg_mode``.

    In ``mask_token`` mode ``fake_latent`` is consumed without a target: the single Flax
    vector ``mask_token`` is the shared parameter (`select_weights` has already put the value
    the reference evaluates under both torch names).
    """
    if cfg_mode not in ("mask_token", "fake_class"):
        raise ValueError(f"cfg_mode={cfg_mode!r}; expected 'mask_token' or 'fake_class'")
    fake = None if cfg_mode == "mask_token" else "params.fake_latent"
    return (
        Rule(r"class_emb\.weight", "params.class_emb.embedding"),
        Rule(r"mask_token", "params.mask_token"),
        Rule(r"fake_latent", fake),
        Rule(r"(?P<p>(?:encoder|decoder|diffusion)_pos_embed_learned)", r"params.backbone.\g<p>"),
        Rule(r"(?P<m>z_proj|decoder_embed)\.weight", r"params.backbone.\g<m>.kernel", "linear"),
        Rule(r"(?P<m>z_proj|decoder_embed)\.bias", r"params.backbone.\g<m>.bias"),
        Rule(r"(?P<m>z_proj_ln|encoder_norm|decoder_norm)\.weight", r"params.backbone.\g<m>.scale"),
        Rule(r"(?P<m>z_proj_ln|encoder_norm|decoder_norm)\.bias", r"params.backbone.\g<m>.bias"),
        Rule(_BLOCK + r"\.(?P<n>norm1|norm2)\.weight",
             r"params.backbone.\g<s>_blocks.block.\g<i>.\g<n>.scale"),
        Rule(_BLOCK + r"\.(?P<n>norm1|norm2)\.bias",
             r"params.backbone.\g<s>_blocks.block.\g<i>.\g<n>.bias"),
        Rule(_BLOCK + r"\.(?P<l>attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight",
             r"params.backbone.\g<s>_blocks.block.\g<i>.\g<l>.kernel", "linear"),
        Rule(_BLOCK + r"\.(?P<l>attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias",
             r"params.backbone.\g<s>_blocks.block.\g<i>.\g<l>.bias"),
        Rule(_NET + r"\.res_blocks\.(?P<i>\d+)\.in_ln\.weight",
             r"params.diffloss.net.res_blocks.\g<i>.in_ln.scale"),
        Rule(_NET + r"\.res_blocks\.(?P<i>\d+)\.in_ln\.bias",
             r"params.diffloss.net.res_blocks.\g<i>.in_ln.bias"),
        Rule(_NET + rf"\.(?P<l>{_HEAD_LINEAR})\.weight", r"params.diffloss.net.\g<l>.kernel",
             "linear"),
        Rule(_NET + rf"\.(?P<l>{_HEAD_LINEAR})\.bias", r"params.diffloss.net.\g<l>.bias"),
    )


EMIGM_RULES = emigm_rules("mask_token")
MAR_RULES = emigm_rules("fake_class")


# ---------------------------------------------------------------------------------------------
# Reading and weight selection.

@dataclasses.dataclass
class OfficialCheckpoint:
    """The parts of a training checkpoint a conversion needs (flat torch-named state dicts)."""
    model: dict[str, Any] | None      # online weights ('model')
    model_ema: dict[str, Any] | None  # EMA weights as saved ('model_ema')
    args: dict[str, Any] | None       # vars(args) of the training run
    epoch: int | None = None


def split_checkpoint(obj: Any) -> OfficialCheckpoint:
    """A loaded ``.pth`` object (training dict or a bare state dict) -> its parts.

    A bare state dict (every value a tensor) is treated as ``model_ema``-like weights with no
    ``args``: ``weights='ema'`` takes it as is.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}; expected a dict with "
                         f"'model'/'model_ema' or a flat state dict")
    if "model" in obj or "model_ema" in obj:
        epoch = obj.get("epoch")
        return OfficialCheckpoint(model=obj.get("model"), model_ema=obj.get("model_ema"),
                                  args=namespace_to_dict(obj.get("args")),
                                  epoch=int(epoch) if isinstance(epoch, (int, np.integer))
                                  else None)
    bad = [k for k, v in obj.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if bad:
        raise ValueError(f"checkpoint has neither 'model' nor 'model_ema' and is not a flat "
                         f"state dict (entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}); "
                         f"top-level keys: {sorted(map(str, obj))[:20]}")
    return OfficialCheckpoint(model=None, model_ema=dict(obj), args=None)


def read_checkpoint(path: str | os.PathLike, *,
                    trusted_pickle: bool = False) -> OfficialCheckpoint:
    """Reads a ``.pth`` (needs torch) or ``.safetensors`` (a flat state dict) file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return split_checkpoint(load_state_dict(path))
    return split_checkpoint(load_pth(path, trusted_pickle=trusted_pickle))


def is_shared(ckpt: OfficialCheckpoint) -> bool:
    """Whether mask token and fake class are one parameter (``use_unsup_cfg``).

    The layout decides: the shared vector is stored as [1, D] under both names, a separate
    mask token is [1, 1, D]. ``args.use_unsup_cfg``, when present, must agree.
    """
    sd = ckpt.model if ckpt.model is not None else ckpt.model_ema
    if sd is None or "mask_token" not in sd:
        raise ValueError("checkpoint has no 'mask_token' tensor: not an eMIGM/MAR state dict")
    shared = len(tuple(sd["mask_token"].shape)) == 2
    if ckpt.args is not None and "use_unsup_cfg" in ckpt.args:
        if bool(ckpt.args["use_unsup_cfg"]) != shared:
            raise ValueError(
                f"checkpoint args.use_unsup_cfg={ckpt.args['use_unsup_cfg']} but mask_token has "
                f"shape {tuple(sd['mask_token'].shape)} (shared vector: [1, D]; separate: "
                f"[1, 1, D]); the file is inconsistent")
    return shared


def select_weights(ckpt: OfficialCheckpoint, weights: str = "ema") -> dict[str, np.ndarray]:
    """The flat state dict (numpy) whose values a conversion uses; see the module docstring.

    For a shared-vector checkpoint both ``mask_token`` and ``fake_latent`` of the result hold
    the value chosen for the shared vector, so either cfg_mode converts it consistently.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; expected one of {WEIGHTS}")
    if weights == "raw":
        if ckpt.model is None:
            raise ValueError("weights='raw' needs the checkpoint's 'model' (online) weights, "
                             "which this file does not have; use weights='ema'")
        src = ckpt.model
    else:
        if ckpt.model_ema is None:
            raise ValueError("this checkpoint has no 'model_ema' (it is None or absent); use "
                             "weights='raw' for the online weights")
        src = ckpt.model_ema
    out = {k: to_numpy(v) for k, v in src.items()}
    if is_shared(ckpt) and "fake_latent" in out:
        if weights == "ema":
            holder = ckpt.model if ckpt.model is not None else ckpt.model_ema
            shared = to_numpy(holder["mask_token"])
        elif weights == "ema_all":
            shared = out["fake_latent"]
        else:
            shared = out["mask_token"]
            if not np.array_equal(shared, out["fake_latent"]):
                logging.warning("model['mask_token'] and model['fake_latent'] differ although "
                                "they are one parameter in the reference; using mask_token")
        out["mask_token"] = out["fake_latent"] = np.array(shared)
    return out


# ---------------------------------------------------------------------------------------------
# Shape checks and suggestions.

def target_shapes(config) -> dict:
    """``{'params': ShapeDtypeStruct tree}`` of ``config``'s model, unrolled blocks (no allocation)."""
    model = dict(config.model.to_dict(), scan_layers=False)  # convert_weights stacks if asked
    return {"params": _param_shapes_cached(json.dumps(model, sort_keys=True))}


@functools.lru_cache(maxsize=16)
def _param_shapes_cached(model_json: str):
    # Shapes depend on config.model only; tracing a large model takes seconds, and the
    # mismatch path checks several candidates, so memoise on the model section.
    model = ml_collections.ConfigDict(json.loads(model_json))
    return param_shapes(ml_collections.ConfigDict({"model": model}))


def prepare_state_dict(sd: Mapping[str, np.ndarray], cfg_mode: str) -> dict[str, np.ndarray]:
    """MAR's [1, 1, D] mask token -> [1, D] when it becomes a separate Flax vector."""
    out = dict(sd)
    mt = out.get("mask_token")
    if cfg_mode == "fake_class" and mt is not None and mt.ndim == 3 and mt.shape[:2] == (1, 1):
        out["mask_token"] = mt.reshape(1, -1)
    return out


def first_mismatch(sd: Mapping[str, np.ndarray], config, shapes=None) -> str | None:
    """Description of the first tensor (in checkpoint order) that does not fit ``config``."""
    cfg_mode = config.model.cfg_mode
    rules = [(re.compile(r.pattern), r) for r in emigm_rules(cfg_mode)]
    tflat = flatten(shapes if shapes is not None else target_shapes(config))
    sd = prepare_state_dict(sd, cfg_mode)
    for key, value in sd.items():
        src = tuple(value.shape)
        rule, m = first_match(rules, key)
        if rule is None:
            return f"checkpoint tensor {key!r} {src} has no counterpart in the model"
        if rule.target is None:
            if key == "fake_latent" and "mask_token" in sd and src != tuple(sd["mask_token"].shape):
                return (f"checkpoint tensor 'mask_token' has shape "
                        f"{tuple(sd['mask_token'].shape)} next to 'fake_latent' {src}: a "
                        f"separate mask token (MAR, or use_unsup_cfg=False), but config "
                        f"{config.name!r} has cfg_mode='mask_token' (one shared "
                        f"vector); set --config.model.cfg_mode=fake_class")
            continue
        path = dotted_to_path(m.expand(rule.target))
        if path not in tflat:
            return (f"checkpoint tensor {key!r} {src} has no counterpart in the model "
                    f"(no Flax parameter {'/'.join(path[1:])})")
        try:
            got = tuple(TRANSFORMS[rule.transform](value).shape)
        except ValueError as e:
            return f"checkpoint tensor {key!r} {src}: {e}"
        want = tuple(tflat[path].shape)
        if got != want:
            torch_want = want[::-1] if rule.transform == "linear" else want
            return (f"checkpoint tensor {key!r} has shape {src}, but config "
                    f"{config.name!r} expects {torch_want} (Flax "
                    f"{'/'.join(path[1:])} {want})")
    return None


def suggest_configs(sd: Mapping[str, np.ndarray]) -> list[str]:
    """Configs under configs/ (with a cfg_mode override if needed) whose shapes fit ``sd``."""
    sig = shape_signature(sd)
    if sig is None:
        return []
    found = []
    for name in available_configs():
        try:
            config = load_config(name)
        except Exception:  # pylint: disable=broad-except
            continue
        if config.model.head != "diffusion" or config_signature(config) != sig:
            continue
        for mode in ("mask_token", "fake_class") if config.model.cfg_mode == "mask_token" \
                else ("fake_class", "mask_token"):
            c = config.copy_and_resolve_references()
            with c.unlocked():
                c.model.cfg_mode = mode
            if first_mismatch(sd, c) is None:
                same = mode == config.model.cfg_mode
                found.append(name if same else f"{name} with --config.model.cfg_mode={mode}")
                break
    return found


# ---------------------------------------------------------------------------------------------
# Conversion.

def convert_weights(sd: Mapping[str, Any], config, *, shapes=None) -> dict:
    """Flat official state dict -> Flax ``params`` tree (numpy float32) for ``config``.

    Raises CheckpointMismatchError naming the first tensor that does not fit, with the
    configs whose shapes do fit, before the full coverage check of `convert_state_dict`.
    """
    sd = {k: to_numpy(v) for k, v in sd.items()}
    shapes = shapes if shapes is not None else target_shapes(config)
    problem = first_mismatch(sd, config, shapes)
    if problem is not None:
        suggestions = suggest_configs(sd)
        hint = (f"configs whose shapes match this checkpoint: {', '.join(suggestions)}"
                if suggestions else
                f"no config under configs/ matches; the checkpoint has {shape_signature(sd)}")
        raise CheckpointMismatchError(f"{problem}.\n  {hint}")
    cfg_mode = config.model.cfg_mode
    variables = convert_state_dict(prepare_state_dict(sd, cfg_mode), emigm_rules(cfg_mode),
                                   shapes, what="eMIGM checkpoint")
    return to_layout(variables["params"], bool(config.model.scan_layers))


@dataclasses.dataclass
class Converted:
    params: dict                 # the selected weights (``weights=``), Flax tree
    raw_params: dict | None      # online weights ('model'), if the file has them
    config: Any                  # ml_collections config the params fit
    config_name: str             # configs/<name>.py the config starts from
    overrides: list[str]         # "field=value" applied on top of that file (from args)
    notes: list[str]
    args: dict | None
    weights: str


def convert_checkpoint(path: str | os.PathLike, config: Any = None, *, weights: str = "ema",
                       trusted_pickle: bool = False) -> Converted:
    """Reads an official ``.pth`` and converts it; picks the config from ``args`` if None.

    ``config``: None, a ConfigDict, a config name or a config file path.
    """
    ckpt = read_checkpoint(path, trusted_pickle=trusted_pickle)
    sd = select_weights(ckpt, weights)
    notes: list[str] = []
    if config is None:
        if ckpt.args is None:
            suggestions = suggest_configs(sd)
            raise ValueError(
                f"{os.fspath(path)!r} has no training 'args' to pick a config from; pass one "
                f"(--config). " + (f"Configs whose shapes match: {', '.join(suggestions)}"
                                   if suggestions else "No config under configs/ matches."))
        config, name, overrides = config_from_args(ckpt.args)
    else:
        config = load_config(config)
        name, overrides = str(config.name), []
    shapes = target_shapes(config)
    params = convert_weights(sd, config, shapes=shapes)
    if ckpt.args is not None:
        notes += check_args_against_config(ckpt.args, config)
    raw = None
    if ckpt.model is not None:
        raw = params if weights == "raw" else convert_weights(select_weights(ckpt, "raw"),
                                                              config, shapes=shapes)
    for n in notes:
        logging.info("convert: %s", n)
    return Converted(params=params, raw_params=raw, config=config, config_name=name,
                     overrides=overrides, notes=notes, args=ckpt.args, weights=weights)


def load_official_checkpoint(path: str | os.PathLike, config: Any = None, *,
                             weights: str = "ema", trusted_pickle: bool = False):
    """(params, config) from an official ``.pth``; params as the reference evaluation runs."""
    c = convert_checkpoint(path, config, weights=weights, trusted_pickle=trusted_pickle)
    return c.params, c.config


def save_orbax(workdir: str | os.PathLike, converted: Converted, *, step: int = 0) -> str:
    """Writes ``workdir/checkpoints/<step>`` in the layout `emigm_jax.checkpoint` restores.

    The state item holds ``{'step', 'params', 'ema_params'}``: ``ema_params`` = the selected
    weights (what ``--mode=sample/evaluate`` restores), ``params`` = the online weights when
    the file has them. There is no optimizer state, so it samples/evaluates but does not
    resume training. Also writes ``config.json`` and ``convert_info.json``.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    ckpt = Checkpointer(epath.Path(workdir) / "checkpoints", keep=1, async_save=False)
    if ckpt.latest_step() is not None:
        raise FileExistsError(f"{ckpt.directory} already holds checkpoint step "
                              f"{ckpt.latest_step()}; write to an empty --workdir")
    raw = converted.raw_params if converted.raw_params is not None else converted.params
    state = {"step": jnp.asarray(step, jnp.int32),
             "params": jax.tree.map(jnp.asarray, raw),
             "ema_params": jax.tree.map(jnp.asarray, converted.params)}
    ckpt.save(step, state)
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(converted.config.to_json_best_effort(indent=2, sort_keys=True))
    info = dict(config=converted.config_name, overrides=converted.overrides,
                weights=converted.weights, notes=converted.notes, step=step,
                args={k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                      for k, v in (converted.args or {}).items()})
    with open(os.path.join(workdir, "convert_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return str(ckpt.directory)


def parameter_count(params: Mapping[str, Any]) -> int:
    return int(sum(np.prod(np.shape(v)) for v in flatten(params).values()))


def sample_command(converted: Converted, workdir: str, config_path: str | None = None,
                   overrides: Sequence[str] | None = None) -> str:
    """The ``emigm_jax.main`` command line that samples from a converted workdir.

    ``config_path``/``overrides``: the user's ``--config`` file and ``config.a.b=v`` strings
    (default: ``configs/<config_name>.py`` and the overrides taken from the checkpoint args).
    """
    path = config_path or os.path.join("configs", f"{converted.config_name}.py")
    extra = "".join(f" --config.{o}" for o in (converted.overrides if overrides is None
                                                else overrides))
    return (f"python -m emigm_jax.main --mode=sample --config={path}{extra} "
            f"--workdir={workdir}")


__all__ = [
    "WEIGHTS", "EMIGM_RULES", "MAR_RULES", "emigm_rules", "CheckpointMismatchError",
    "ConversionError", "config_signature", "flatten", "parameter_count",
    "OfficialCheckpoint", "split_checkpoint", "read_checkpoint", "is_shared", "select_weights",
    "load_config", "available_configs", "config_from_args", "check_args_against_config",
    "target_shapes", "first_mismatch", "suggest_configs", "convert_weights", "Converted",
    "convert_checkpoint", "load_official_checkpoint", "save_orbax", "sample_command",
]
