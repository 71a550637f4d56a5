"""``python -m emigm_jax.convert``: an official eMIGM/MAR ``.pth`` -> an Orbax run directory.

  python -m emigm_jax.convert --src=eMIGM_xsmall_256_checkpoint.pth --workdir=runs/emigm_xs
  python -m emigm_jax.main --mode=sample --config=configs/emigm_xs_256.py --workdir=runs/emigm_xs

The config comes from the checkpoint's training ``args`` unless ``--config`` is given (then
any ``--config.a.b=v`` override works, and the checkpoint is checked against it: the first
tensor whose shape does not fit is named, with the configs whose shapes match).
``--weights=ema`` (default) gives exactly the weights the reference evaluation runs (EMA,
with the shared mask/fake vector at its online value; see `emigm_jax.convert.emigm`),
``raw`` the online weights, ``ema_all`` the EMA of every tensor.

Reading ``.pth`` files needs PyTorch (``pip install -e '.[interop]'``). The training
``args`` Namespace is read with ``torch.load(weights_only=True)`` plus an allow-list for
``argparse.Namespace``; ``--trusted_pickle`` falls back to ``weights_only=False`` for files
that pickle other objects (this runs code from the file: only for files you trust).
Other converters: ``python -m emigm_jax.convert.vae``, ``.dcae``, ``.inception``, ``.vq``,
``.llamagen`` (LlamaGen's class-to-image GPT onto ``model.arch='ar'``).
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from emigm_jax.convert import emigm
from emigm_jax.convert.emigm import WEIGHTS

_SRC = flags.DEFINE_string("src", None, "Official checkpoint (.pth, or a flat .safetensors).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output run directory (must hold no checkpoint).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config file (default: picked from the checkpoint's args).",
    lock_config=True)
_WEIGHTS = flags.DEFINE_enum("weights", "ema", WEIGHTS,
                             "ema: what the reference evaluation runs; raw: online weights; "
                             "ema_all: EMA of every tensor incl. the shared vector.")
_TRUSTED = flags.DEFINE_bool("trusted_pickle", False,
                             "Allow torch.load(weights_only=False) (runs code from the file).")
_STEP = flags.DEFINE_integer("step", 0, "Step number of the written checkpoint.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _SRC.value:
        raise app.UsageError("--src is required: the official .pth checkpoint to convert")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required: where the Orbax checkpoint goes")
    try:
        converted = emigm.convert_checkpoint(_SRC.value, _CONFIG.value, weights=_WEIGHTS.value,
                                             trusted_pickle=_TRUSTED.value)
        directory = emigm.save_orbax(_WORKDIR.value, converted, step=_STEP.value)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    n = emigm.parameter_count(converted.params)
    print(f"converted {_SRC.value} ({_WEIGHTS.value} weights, {n:,} parameters) with config "
          f"{converted.config_name}" + (f" + {', '.join(converted.overrides)}"
                                        if converted.overrides else ""))
    for note in converted.notes:
        print(f"note: {note}")
    config_path = overrides = None
    if _CONFIG.value is not None:
        config_path = config_flags.get_config_filename(flags.FLAGS["config"])
        overrides = [a[len("--config."):] for a in sys.argv[1:] if a.startswith("--config.")]
    print(f"wrote {directory} (step {_STEP.value}); sample with:\n  "
          f"{emigm.sample_command(converted, _WORKDIR.value, config_path, overrides)}")


if __name__ == "__main__":
    app.run(main)
