"""The one config loader: a config name (``emigm_xs_256``) or a file path -> ConfigDict.

Used by the command line (to name a mistyped ``--config.a.b`` field before absl parses
it), the checkpoint converter and the benchmarks, so that every entry point resolves a
config the same way: ``configs/<name>.py`` for a bare name, the file otherwise; an
optional ``:arg`` suffix is passed to ``get_config(arg)`` as ml_collections does.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
from typing import Any

import configs


def configs_dir() -> str:
    return os.path.dirname(os.path.abspath(configs.__file__))


def config_names() -> list[str]:
    """Names of the runnable configs under configs/ (modules with ``get_config``)."""
    names = []
    for f in sorted(glob.glob(os.path.join(configs_dir(), "*.py"))):
        n = os.path.splitext(os.path.basename(f))[0]
        with open(f, encoding="utf-8") as fh:
            if n != "__init__" and "def get_config" in fh.read():
                names.append(n)
    return names


def load_config(spec: Any):
    """A ConfigDict (returned as is), a config name or a path ``file.py[:arg]``."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    spec = os.fspath(spec)
    path, _, arg = spec.partition(":")
    if path.endswith(".py") or os.sep in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path!r}")
        module_spec = importlib.util.spec_from_file_location("_emigm_config_file", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"configs.{path}")
        except ModuleNotFoundError as e:
            raise ValueError(f"no config named {path!r} (looked for configs/{path}.py; "
                             f"available: {', '.join(config_names())})") from e
    config = module.get_config(arg) if arg else module.get_config()
    if "name" not in config or not config.name:
        with config.unlocked():
            config.name = os.path.splitext(os.path.basename(path))[0]
    return config
