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
    Raises FileNotFoundError, ImportError (no torch), or ValueError when the file holds
    pickled objects outside the allow-list and ``trusted_pickle`` is False.
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

    if trusted_pickle:
        return _load(weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _load(weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends # pylint: disable=broad-except
        if "Weights only load failed" not in str(e) and "Unsupported global" not in str(e):
            raise
        raise ValueError(
            f"{path!r} pickles Python objects other than tensors and argparse.Namespace, so it "
            f"cannot be read safely ({str(e).splitlines()[0][:200]}...). If you trust the file, "
            f"pass trusted_pickle=True (CLI: --trusted_pickle), which uses "
            f"torch.load(weights_only=False) and runs code from the file.") from e


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
