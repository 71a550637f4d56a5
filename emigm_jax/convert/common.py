"""Rule-table conversion of PyTorch state dicts into Flax variable trees, with a coverage check.

Why this exists: a converted checkpoint that silently leaves one Flax leaf at its random init,
or silently drops one source tensor, still runs and produces plausible-looking garbage. Every
converter in this package therefore states its mapping as *data* (a tuple of `Rule`s) and
goes through `convert_state_dict`, which refuses to return unless

  * every source tensor matched a rule (or an explicit ignore rule),
  * every rule-produced target exists in the model and got exactly one tensor,
  * every transformed tensor has the target's shape,
  * every target leaf was filled,

and otherwise raises `ConversionError` listing all problems at once (unexpected keys, keys
mapped to nothing, shape mismatches, duplicates, missing targets).

Target naming convention. A rule's target template expands (``re.Match.expand``: ``\\1``,
``\\g<name>``) to a *dotted* path whose first component is the Flax collection
(``params``, ``batch_stats``). Dots become tree levels, and a purely numeric component is
merged into the previous one with ``_``: ``params.encoder.down.0.block.1.conv1.kernel`` is
``('params', 'encoder', 'down_0', 'block_1', 'conv1', 'kernel')``. Flax modules in this package
name their list members ``<name>_<i>`` (explicit ``name=`` in ``nn.compact``), so a torch
``ModuleList`` index maps without per-model code.

Transforms (by name, so a rule table stays plain data): see `TRANSFORMS`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from flax import serialization, traverse_util

from emigm_jax.convert.torch_io import load_pth

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a mapping table.

    pattern: regex that must ``fullmatch`` the source key; the first matching rule wins.
    target: template expanded with the match (dotted path, see module doc); ``None`` consumes
      the tensor without a target (e.g. ``num_batches_tracked``, training-only losses).
    transform: name in `TRANSFORMS` applied to the source array before the shape check.
    """
    pattern: str
    target: str | None
    transform: str = "identity"


def _expect_ndim(a: np.ndarray, ndim: int, name: str) -> np.ndarray:
    if a.ndim != ndim:
        raise ValueError(f"transform '{name}' expects a {ndim}-D tensor, got shape {a.shape}")
    return a


def _conv2d(a):      # torch [O, I/g, kh, kw] -> flax [kh, kw, I/g, O]
    return np.transpose(_expect_ndim(a, 4, "conv2d"), (2, 3, 1, 0))


def _linear(a):      # torch [out, in] -> flax [in, out]
    return np.transpose(_expect_ndim(a, 2, "linear"))


def _conv1x1_to_linear(a):  # torch [O, I, 1, 1] -> flax Dense [I, O]
    a = _expect_ndim(a, 4, "conv1x1_to_linear")
    if a.shape[2:] != (1, 1):
        raise ValueError(f"transform 'conv1x1_to_linear' expects a 1x1 kernel, got shape {a.shape}")
    return np.transpose(a[:, :, 0, 0])


def _linear_to_conv1x1(a):  # torch [out, in] -> flax Conv [1, 1, in, out]
    return np.transpose(_expect_ndim(a, 2, "linear_to_conv1x1"))[None, None]


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "conv2d": _conv2d,
    "linear": _linear,
    "conv1x1_to_linear": _conv1x1_to_linear,
    "linear_to_conv1x1": _linear_to_conv1x1,
}


class ConversionError(ValueError):
    """A state dict does not cover the target model exactly; the message lists every problem."""


def dotted_to_path(dotted: str) -> Path:
    """``'params.enc.down.0.block.1.w'`` -> ``('params', 'enc', 'down_0', 'block_1', 'w')``."""
    out: list[str] = []
    for part in dotted.split("."):
        if part.isdigit():
            if not out:
                raise ValueError(f"target path {dotted!r} starts with an index")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, incl. bfloat16) or array-like -> numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor without importing torch
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16",):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
    return traverse_util.flatten_dict(tree) if tree else {}


def _fmt_section(title: str, items: Sequence[str], limit: int = 40) -> str:
    if not items:
        return ""
    shown = "\n".join(f"    {s}" for s in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}\n"


@dataclasses.dataclass
class ConversionReport:
    converted: int
    ignored: list[str]


def convert_state_dict(state_dict: Mapping[str, Any], rules: Sequence[Rule],
                       target: Mapping[str, Any], *, what: str = "checkpoint",
                       cast_to_target_dtype: bool = True,
                       return_report: bool = False):
    """Maps a flat torch-style state dict onto a Flax variable tree, checking full coverage.

    Args:
      state_dict: flat ``{key: tensor or array}``.
      rules: the mapping table (first fullmatch wins).
      target: Flax variables (or ``jax.eval_shape`` output): nested dict whose leaves have
        ``.shape`` (and ``.dtype``), e.g. ``{'params': ..., 'batch_stats': ...}``.
      what: name used in error messages ("KL-16 VAE checkpoint").
      cast_to_target_dtype: cast each array to its target leaf's dtype (e.g. fp16 -> fp32).
    Returns:
      Nested dict of numpy arrays with exactly the target's structure (and a
      `ConversionReport` when ``return_report``).
    Raises:
      ConversionError listing unexpected keys, unknown targets, shape mismatches, duplicate
      targets and missing targets.
    """
    compiled = [(re.compile(r.pattern), r) for r in rules]
    tflat = flatten(target)
    out: dict[Path, np.ndarray] = {}
    filled_by: dict[Path, str] = {}
    problems = {title: [] for title in PROBLEM_SECTIONS}
    ignored = []
    for key in sorted(state_dict):
        rule, match = first_match(compiled, key)
        if rule is None:
            problems["unexpected"].append(f"{key} {_shape_of(state_dict[key])}")
        elif rule.target is None:
            ignored.append(key)
        else:
            done = _convert_key(key, state_dict[key], rule, match, tflat, filled_by, problems,
                                cast_to_target_dtype)
            if done is not None:
                out[done[0]], filled_by[done[0]] = done[1], key
    problems["missing"] = sorted(f"{'/'.join(p)} {_shape_of(v)}" for p, v in tflat.items()
                                 if p not in out)
    msg = "".join(_fmt_section(PROBLEM_SECTIONS[k], v) for k, v in problems.items())
    if msg:
        raise ConversionError(
            f"{what} does not match the model: {len(state_dict)} source tensors, "
            f"{len(tflat)} target leaves, {len(out)} converted.\n{msg}")
    tree = traverse_util.unflatten_dict(out)
    if return_report:
        return tree, ConversionReport(converted=len(out), ignored=ignored)
    return tree


PROBLEM_SECTIONS = {
    "unexpected": "source keys matching no rule (unexpected)",
    "unknown": "source keys mapped to a target the model does not have",
    "mismatched": "shape mismatches",
    "bad_transform": "transform errors",
    "duplicates": "several source keys for one target",
    "missing": "target parameters not filled (missing)",
}


def first_match(compiled, key: str):
    """(rule, match) of the first rule whose pattern fully matches ``key``, or (None, None)."""
    for rx, r in compiled:
        match = rx.fullmatch(key)
        if match:
            return r, match
    return None, None


def _convert_key(key, src, rule: Rule, match, tflat, filled_by, problems, cast: bool):
    """(target path, array) for one source tensor, or None after noting the problem."""
    path = dotted_to_path(match.expand(rule.target))
    if path not in tflat:
        problems["unknown"].append(f"{key} {_shape_of(src)} -> {'/'.join(path)}")
        return None
    if path in filled_by:
        problems["duplicates"].append(f"{key} and {filled_by[path]} -> {'/'.join(path)}")
        return None
    if rule.transform not in TRANSFORMS:
        raise ValueError(f"rule {rule} names unknown transform {rule.transform!r}; "
                         f"expected one of {sorted(TRANSFORMS)}")
    try:
        arr = TRANSFORMS[rule.transform](to_numpy(src))
    except ValueError as e:
        problems["bad_transform"].append(f"{key}: {e}")
        return None
    tshape = _shape_of(tflat[path])
    if _shape_of(arr) != tshape:
        problems["mismatched"].append(f"{key} {_shape_of(src)} --{rule.transform}--> "
                                      f"{_shape_of(arr)} != {'/'.join(path)} {tshape}")
        return None
    if cast and hasattr(tflat[path], "dtype"):
        arr = arr.astype(tflat[path].dtype, copy=False)
    return path, arr


def run_converter(main: Callable[[], None]) -> None:
    """Runs a converter's ``main``; a bad file or argument ends with one ``error:`` line."""
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def select_entry(obj: Any, key: str | None, path: str) -> Mapping:
    """The sub-dict of a loaded checkpoint at ``key`` ("a/b" for nested keys; None: obj)."""
    if key:
        for k in key.split("/"):
            if not isinstance(obj, Mapping) or k not in obj:
                have = sorted(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
                raise KeyError(f"{path!r} has no entry {k!r} (of key {key!r}); top-level: {have}")
            obj = obj[k]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r}[{key!r}] is a {type(obj).__name__}, not a state dict")
    return obj


def load_state_dict(path: str | os.PathLike, key: str | None = None, *,
                    trusted_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a flat ``{name: array}`` state dict from ``.safetensors`` or a torch pickle.

    ``.safetensors`` is read with numpy only (no torch needed). Torch files (``.ckpt``,
    ``.pt``, ``.pth``, ``.bin``) need torch and load with ``weights_only=True``; a file that
    also pickles Python objects (argparse Namespaces...) needs ``trusted_pickle=True``, since
    unpickling runs code. ``key`` selects a sub-dict, e.g. ``"model"`` for MAR's ``kl16.ckpt``;
    nested keys are written ``"a/b"``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
        obj: Any = load_file(path)
    elif path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        obj = load_pth(path, trusted_pickle=trusted_pickle)  # one-line errors, pickle policy
    else:
        raise ValueError(f"unknown checkpoint format {path!r}: expected .safetensors, .ckpt, "
                         ".pt, .pth or .bin")
    obj = select_entry(obj, key, path)
    out = {}
    for k, v in obj.items():
        if not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise ValueError(f"{path!r}: entry {k!r} is a {type(v).__name__}, not a tensor; pass "
                             f"key=... to select the state dict (top-level keys: {sorted(obj)[:20]})")
        out[k] = to_numpy(v)
    return out


def load_converted(path: str, target: Mapping[str, Any], what: str) -> dict:
    """Variables from a converted ``.msgpack``, held to the same coverage check as a fresh
    conversion (names and shapes against ``target``), so a file for another config fails."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"converted {what} file not found: {path!r}")
    with open(path, "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    flat = {".".join(k): v for k, v in flatten(variables).items()}
    return convert_state_dict(flat, (Rule(r"(?P<p>.+)", r"\g<p>"),), target,
                              what=f"converted {what} {path!r}")


def write_variables(variables: Mapping[str, Any], dst: str) -> None:
    """Writes converted Flax variables to ``dst`` (.msgpack) and prints the parameter count."""
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(serialization.msgpack_serialize(variables))
    n = sum(v.size for v in flatten(variables).values())
    print(f"wrote {dst}: {n:,} parameters")
