"""Reading PyTorch ``.pth`` training checkpoints (torch is an optional dependency).

Official eMIGM/MAR checkpoints are whole training snapshots: ``{'model', 'model_ema',
'optimizer', 'epoch', 'scaler', 'args'}`` where ``args`` is a pickled ``argparse.Namespace``.
Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, which refuses any pickled
Python object outside an allow-list, so a plain load of these files fails. Two ways in:

  * default: ``weights_only=True`` with ``argparse.Namespace`` added to the allow-list
    (``torch.serialization.safe_globals``). Nothing but tensors, containers, numbers, strings
    and Namespaces can be constructed, so an untrusted file cannot run code. This reads every
    official checkpoint we know of.
  * ``trusted_pickle=True``: ``weights_only=False``, plain unpickling, which *executes code
    from the file*. Only for files you trust that hold other Python objects.

Files are memory-mapped where possible (``mmap=True``) so the optimizer state of a large
checkpoint is not read into RAM unless touched.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Any

INTEROP_HINT = "install the interop extra: pip install -e '.[interop]'"


def import_torch():
    """``import torch`` or an ImportError that says how to install it."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"reading PyTorch checkpoints (.pth/.pt) needs PyTorch, which is not "
                          f"installed; {INTEROP_HINT}") from e
    return torch


def load_pth(path: str | os.PathLike, *, trusted_pickle: bool = False) -> Any:
    """Loads a torch checkpoint on the CPU; see the module docstring for the pickle policy.

    Returns whatever was saved (usually a dict); tensors stay torch tensors.
    Raises FileNotFoundError, ImportError (no torch), or ValueError (one line) when the file
    is empty, truncated or corrupt, or holds pickled objects outside the allow-list and
    ``trusted_pickle`` is False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    torch = import_torch()

    def _load(**kw):
        try:
            return torch.load(path, map_location="cpu", mmap=True, **kw)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", **kw)

    try:
        if trusted_pickle:
            return _load(weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _load(weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
        readable = readable_load_error(path, e)
        if readable is None:
            raise
        raise readable from e


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CORRUPT_HINTS = ("PytorchStreamReader", "zip archive", "central directory", "truncated",
                  "unexpected EOF", "Ran out of input")


def readable_load_error(path: str, error: Exception) -> ValueError | None:
    """One-line ValueError for a refused pickle or a damaged file; None for anything else."""
    if os.path.getsize(path) == 0:
        return ValueError(f"{path!r} is empty (0 bytes): not a PyTorch checkpoint; download "
                          f"or save it again")
    text = _ANSI.sub("", str(error))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused or "Weights only load failed" in text:
        what = (f"Unsupported global: GLOBAL {refused.group(1)}" if refused
                else text.splitlines()[0][:200])
        return ValueError(
            f"{path!r} pickles a Python object outside the allow-list ({what}), so it cannot be "
            f"read safely; if you trust the file, pass trusted_pickle=True (CLI: "
            f"--trusted_pickle), which uses torch.load(weights_only=False) and runs code from "
            f"the file")
    if isinstance(error, (EOFError, pickle.UnpicklingError)) or any(
            h in text for h in _CORRUPT_HINTS):
        first = next((l.strip() for l in text.splitlines() if l.strip()), type(error).__name__)
        return ValueError(
            f"{path!r} ({os.path.getsize(path):,} bytes) is not a readable PyTorch checkpoint: "
            f"truncated or corrupt ({first.split('. ')[0][:160]}); download or save it again")
    return None


def namespace_to_dict(args: Any) -> dict[str, Any] | None:
    """A checkpoint's ``args`` (argparse.Namespace, dict or None) as a plain dict."""
    if args is None:
        return None
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    raise TypeError(f"checkpoint 'args' is a {type(args).__name__}; expected an "
                    f"argparse.Namespace or a dict")
