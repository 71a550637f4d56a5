"""The product's main job: ``python -m emigm_jax.main --config=configs/<name>.py --workdir=DIR``.

The same command runs on one CPU, one GPU, a GPU cluster or a TPU pod (see launch/). Any
config field can be overridden on the command line (``--config.optim.base_lr=2e-4``).

Modes:
  train     train (resuming from the newest checkpoint in DIR); on the embedded digits config
            it then samples with the EMA weights and scores the samples (metrics.json).
  sample    restore the newest checkpoint's EMA weights and sample (digits: + score).
  evaluate  digits: same as sample; other datasets: ``emigm_jax.evaluation.evaluate``.
  sweep     ``emigm_jax.evaluation.sweep`` (NFE-vs-FID table and plot).

Everything that can be checked without compiling is checked first (workdir, config fields,
mesh vs devices, batch divisibility), so a bad command fails in seconds with a message that
names the bad value.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "sample", "evaluate", "sweep")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file, e.g. configs/digits.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_SAMPLE_PRESET = flags.DEFINE_string(
    "sample_preset", None, "Name of an entry of config.sample_presets to apply to config.sample.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process without auto-detect).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Comma-separated local device ids this process drives (default: "
    "all; on Slurm/MPI GPU clusters jax defaults to one GPU per process).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ("auto", "on", "off"),
    "auto: start jax.distributed when a TPU pod / Slurm / MPI job is detected; on: always "
    "(cluster auto-detection); off: never. Explicit coordinator flags always start it.")
_ACCEPT_RECIPE = flags.DEFINE_bool(
    "accept_changed_recipe", False, "Resume although train.batch_size or optim.* differ from "
    "the workdir's config.json (the learning rate changes from that step on).")
_FRESH_START = flags.DEFINE_bool(
    "allow_fresh_start", False, "Train from step 0 although the workdir's checkpoints were all "
    "found damaged (they stay in checkpoints_damaged/).")


# Names used in COMPANION.md / the papers for a switch that exists here under another name.
FIELD_SYNONYMS = {
    "model.num_cond_tokens": "model.buffer_size (class-embedding prefix tokens: eMIGM 64, MaskGIL 1)",
    "sample.gumbel_temp": "sample.choice_temperature (with sample.gumbel_anneal)",
}


class PreflightError(ValueError):
    """A problem with the command line found before anything is compiled."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input or files: printed as one line, no traceback."""
    from emigm_jax.checkpoint import CheckpointError, SaveInterrupted  # pylint: disable=import-outside-toplevel
    from emigm_jax.config_validation import ConfigError  # pylint: disable=import-outside-toplevel
    from emigm_jax.workdir import WorkdirError  # pylint: disable=import-outside-toplevel
    return (ConfigError, PreflightError, CheckpointError, SaveInterrupted, WorkdirError,
            FileNotFoundError, NotImplementedError, FloatingPointError)


# ---------------------------------------------------------------------------------------------
# Pre-flight checks.

def prepare_workdir(workdir: str | None) -> str:
    """Creates the run directory if needed; fails clearly if it cannot be written."""
    if not workdir:
        raise PreflightError("--workdir is required: the directory for checkpoints, logs and "
                             "samples (created if missing)")
    if "://" in workdir:  # remote (gs://...) run directories are handled by Orbax/etils
        return workdir
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"--workdir={workdir!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise PreflightError(f"--workdir={workdir!r} cannot be created or written: "
                             f"{e.strerror or e}") from e
    return path


def apply_sample_preset(config, name: str | None) -> None:
    if not name:
        return
    from emigm_jax.config_validation import ConfigError, sample_preset  # pylint: disable=import-outside-toplevel
    try:
        overrides = sample_preset(config, name, source="--sample_preset=")
    except ConfigError as e:
        raise PreflightError(str(e)) from e
    with config.unlocked():
        for k, v in overrides.items():
            config.sample[k] = v


def preflight(config, mode: str) -> None:
    """Config fields, mesh shape vs devices, batch divisibility: all before compilation."""
    import jax  # pylint: disable=import-outside-toplevel

    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    try:
        from emigm_jax.config_validation import validate_config  # pylint: disable=import-outside-toplevel
    except ImportError:  # pragma: no cover
        validate_config = None
    try:
        if validate_config is not None:
            validate_config(config)
        mesh_shape = shd.mesh_shape(config.mesh, jax.device_count())
        n_dev = mesh_shape[0] * mesh_shape[1]
        if mode == "train":
            accum = int(config.train.get("grad_accum", 1))
            batch = int(config.train.batch_size)
            if batch % accum or (batch // accum) % n_dev or batch % jax.process_count():
                raise PreflightError(
                    f"config.train.batch_size={batch} must be divisible by train.grad_accum="
                    f"{accum} times the {n_dev} devices (data={mesh_shape[0]} x fsdp="
                    f"{mesh_shape[1]}), i.e. a multiple of {accum * n_dev}, and by the "
                    f"{jax.process_count()} processes")
        from emigm_jax.data.pipeline import SOURCES  # pylint: disable=import-outside-toplevel
        if config.data.source not in SOURCES:
            raise PreflightError(f"config.data.source={config.data.source!r} is invalid: "
                                 f"expected one of {SOURCES}")
    except PreflightError:
        raise
    except ValueError as e:
        raise PreflightError(str(e)) from e


def check_overrides(argv: list[str]) -> None:
    """Names an unknown ``--config.a.b=...`` field (ml_collections only says AttributeError)."""
    config_path = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
    if not config_path:
        return
    path, _, arg = config_path.partition(":")
    if not os.path.exists(path):
        raise PreflightError(f"--config={config_path!r}: no such file")
    spec = importlib.util.spec_from_file_location("_emigm_cli_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for a in argv:
        m = re.match(r"--(?:no)?config\.([^=\s]+)", a)
        if not m:
            continue
        node, walked = config, []
        for part in m.group(1).split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(walked) or "<top level>"
                name = ".".join(walked + [part])
                hint = (f"; the companion papers' {name} is {FIELD_SYNONYMS[name]} here"
                        if name in FIELD_SYNONYMS else "")
                raise PreflightError(
                    f"{a.split('=')[0]}: config has no field {name!r}{hint} "
                    f"({where} has: {', '.join(sorted(map(str, keys)))})")
            node, walked = node[part], walked + [part]


# ---------------------------------------------------------------------------------------------
# The digits job: sample, score, write samples.npz / samples.png / metrics.json.

def sample_function(config, mesh):
    """``(params, labels, rng, config) -> (tokens, info)``: the masked sampler, the AR sampler
    (``model.arch='ar'``), or MaskGIL's AR prefix + masked completion (``sample.ar_prefix``
    > 0, with the AR run's EMA weights and config from ``sample.ar_workdir``)."""
    import functools  # pylint: disable=import-outside-toplevel
    from emigm_jax import ar_prefix, ar_sampling, sampling  # pylint: disable=import-outside-toplevel

    if config.model.arch == "ar":
        return ar_sampling.sample
    if float(config.sample.get("ar_prefix", 0.0)) == 0.0:
        return sampling.sample
    ar_config, ar_params = load_ar_run(config.sample.get("ar_workdir", ""), mesh)
    return functools.partial(ar_prefix.sample, ar_params=ar_params, ar_config=ar_config)


def load_ar_run(workdir: str, mesh):
    """(config, EMA params) of a trained ``model.arch='ar'`` run (its config.json)."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    if not workdir:
        raise FileNotFoundError("config.sample.ar_prefix > 0 needs config.sample.ar_workdir: "
                                "the run directory of a trained model.arch='ar' model")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.sample.ar_workdir={workdir!r} has no config.json: "
                                f"train the AR model there first (configs/digits_ar.py)")
    with open(path, encoding="utf-8") as f:
        ar_config = ml_collections.ConfigDict(json.load(f))
    _, params = restore_ema_params(ar_config, workdir, mesh)
    return ar_config, params


def generate(params, labels, config, mesh, seed: int) -> tuple[Any, int]:
    """Samples tokens for ``labels`` [K] in batches of ``sample.batch_size`` on the mesh.

    Returns (tokens as numpy [K, ...], NFE per image).
    """
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel

    sample_fn = sample_function(config, mesh)
    labels = np.asarray(labels, np.int32)
    n_dev = mesh.devices.size
    bs = int(config.sample.get("batch_size", 64))
    bs = max(n_dev, bs - bs % n_dev)
    out, nfe = [], None
    rng = jax.random.key(seed)
    for start in range(0, len(labels), bs):
        chunk = labels[start:start + bs]
        pad = np.concatenate([chunk, np.zeros(bs - len(chunk), np.int32)])
        glabels = jax.make_array_from_callback(pad.shape, shd.batch_sharding(mesh),
                                               lambda idx, pad=pad: pad[idx])
        tokens, info = sample_fn(params, glabels, jax.random.fold_in(rng, start), config)
        if jax.process_count() > 1:
            tokens = multihost_utils.process_allgather(tokens, tiled=True)
        out.append(np.asarray(tokens)[:len(chunk)])
        nfe = int(jax.device_get(info["nfe"]))
    return np.concatenate(out), nfe


def image_grid(images, rows: int, scale: int = 4, pad: int = 1):
    """[rows*cols, H, W] in 0..16 -> uint8 grid, one row per class, nearest upscaling."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from emigm_jax.data.digits import PIXEL_MAX  # pylint: disable=import-outside-toplevel
    images = np.asarray(images, np.float32)
    k, h, w = images.shape
    cols = k // rows
    img = np.clip(images[:rows * cols] / PIXEL_MAX * 255.0, 0, 255).astype(np.uint8)
    img = img.repeat(scale, 1).repeat(scale, 2).reshape(rows, cols, h * scale, w * scale)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = np.full((rows * cell_h + pad, cols * cell_w + pad), 64, np.uint8)
    for r in range(rows):
        for c in range(cols):
            grid[pad + r * cell_h: pad + r * cell_h + h * scale,
                 pad + c * cell_w: pad + c * cell_w + w * scale] = img[r, c]
    return grid


def digits_sample_fn(config, mesh, per_class: int | None = None):
    """Periodic training samples (EMA weights): a grid and the samples' class accuracy.

    Uses ``sample.num_images`` samples by default (one padded batch of ``sample.batch_size``
    costs the same whatever the count, and reuses the final report's compiled sampler).
    """
    import numpy as np  # pylint: disable=import-outside-toplevel
    from emigm_jax.data import digits_metric  # pylint: disable=import-outside-toplevel
    from emigm_jax.data.digits import NUM_CLASSES, tokenizer_from_config  # pylint: disable=import-outside-toplevel
    tok = tokenizer_from_config(config)
    per_class = per_class or max(10, int(config.sample.num_images) // NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    clf = digits_metric.fit_classifier(float(config.data.get("test_fraction", 0.2)),
                                       int(config.data.get("split_seed", 0)))

    def fn(state, step):
        tokens, _ = generate(state.ema_params, labels, config, mesh, seed=int(step))
        images = tok.decode(tokens)
        shown = np.concatenate([images[c * per_class: c * per_class + 10]
                                for c in range(NUM_CLASSES)])
        return {"image": image_grid(shown, NUM_CLASSES),
                "class_accuracy": clf.accuracy(images, labels)}
    return fn


def digits_report(config, params, workdir: str, mesh, *, train_steps: int,
                  train_seconds: float) -> dict:
    """Samples ``sample.num_images`` digits (>= 50 per class), scores them, writes the files."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from emigm_jax.data import digits_metric  # pylint: disable=import-outside-toplevel
    from emigm_jax.data.digits import NUM_CLASSES, tokenizer_from_config  # pylint: disable=import-outside-toplevel

    per_class = max(50, int(config.sample.num_images) // NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
    t0 = time.perf_counter()
    tokens, nfe = generate(params, labels, config, mesh, seed=int(config.seed) + 1)
    sample_seconds = time.perf_counter() - t0
    images = tokenizer_from_config(config).decode(tokens)  # [K, 8, 8] in 0..16
    scores = digits_metric.score_samples(
        images, labels, test_fraction=float(config.data.get("test_fraction", 0.2)),
        split_seed=int(config.data.get("split_seed", 0)))
    metrics = {
        "sample_class_accuracy": scores["sample_class_accuracy"],
        "sample_fd": scores["sample_fd"],
        "real_class_accuracy": scores["real_class_accuracy"],
        "real_fd": scores["real_fd"],
        "nfe": nfe,
        "train_steps": int(train_steps),
        "train_seconds": float(train_seconds),
        "sample_seconds": float(sample_seconds),
        "num_samples": int(len(labels)),
        "per_class_accuracy": scores["per_class_accuracy"],
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    if jax.process_index() == 0:
        np.savez(os.path.join(workdir, "samples.npz"), images=images.astype(np.float32),
                 labels=labels, tokens=np.asarray(tokens))
        cols = min(per_class, 10)
        grid_idx = np.concatenate([np.arange(c * per_class, c * per_class + cols)
                                   for c in range(NUM_CLASSES)])
        Image.fromarray(image_grid(images[grid_idx], NUM_CLASSES)).save(
            os.path.join(workdir, "samples.png"))
        with open(os.path.join(workdir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(f"\ndigits ({len(labels)} samples, NFE {nfe}, {train_steps} train steps in "
              f"{train_seconds:.0f}s):\n"
              f"  class accuracy  samples {metrics['sample_class_accuracy']:.3f}   "
              f"real held-out {metrics['real_class_accuracy']:.3f}\n"
              f"  Frechet dist.   samples {metrics['sample_fd']:.3f}   "
              f"real train-vs-held-out {metrics['real_fd']:.3f}\n"
              f"  wrote {workdir}/metrics.json, samples.npz, samples.png", flush=True)
    return metrics


# ---------------------------------------------------------------------------------------------
# Modes.

def _evaluation_entry(name: str):
    """``emigm_jax.evaluation.<name>.<name>``: (config, params, workdir, mesh) -> dict."""
    module_name = f"emigm_jax.evaluation.{name}"
    try:
        module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError) as e:
        raise NotImplementedError(
            f"--mode={name} for data.source != 'digits' needs {module_name}.{name}"
            f"(config, params, workdir, mesh), which is not available ({e})") from e


def restore_ema_params(config, workdir: str, mesh):
    """EMA parameters of the newest checkpoint, in their training sharding."""
    import jax  # pylint: disable=import-outside-toplevel

    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    from emigm_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
    from emigm_jax.models import param_shapes  # pylint: disable=import-outside-toplevel

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) or not any(d.isdigit() for d in os.listdir(directory)):
        raise FileNotFoundError(f"--mode needs a checkpoint, but {directory} has none; "
                                f"train first (--mode=train)")
    shapes = param_shapes(config)
    shardings = shd.named_shardings(shapes, mesh, shd.rules_from_config(config))
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    ckpt = Checkpointer.from_config(config, workdir, read_only=True)
    try:
        restored = ckpt.restore_params(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory} can be restored (damaged steps "
                                f"moved to {ckpt.damaged_directory}); train first")
    return restored


def run_mode(config, workdir: str, mode: str) -> dict:
    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    from emigm_jax import train as train_lib  # pylint: disable=import-outside-toplevel
    from emigm_jax.workdir import total_train_seconds  # pylint: disable=import-outside-toplevel

    digits = config.data.source == "digits"
    if mode == "train":
        mesh = shd.make_mesh(config.mesh)
        sample_fn = digits_sample_fn(config, mesh) if digits and \
            int(config.train.get("sample_every", 0)) > 0 else None
        result = train_lib.train(config, workdir, sample_fn=sample_fn,
                                 accept_recipe_change=_ACCEPT_RECIPE.value,
                                 allow_fresh_start=_FRESH_START.value)
        logging.info("trained to step %d/%d in %.1fs", result.step, result.total_steps,
                     result.train_seconds)
        if result.preempted:
            print(f"preempted: checkpoint at step {result.step} in {workdir}; rerun the same "
                  f"command to resume", flush=True)
            return {"preempted": True, "step": result.step}
        if digits:
            seconds = total_train_seconds(workdir)
            return digits_report(config, result.state.ema_params, workdir, result.mesh,
                                 train_steps=result.step, train_seconds=seconds)
        return {"step": result.step}

    mesh = shd.make_mesh(config.mesh)
    step, params = restore_ema_params(config, workdir, mesh)
    if digits and mode in ("sample", "evaluate"):
        return digits_report(config, params, workdir, mesh, train_steps=step,
                             train_seconds=total_train_seconds(workdir))
    if mode == "sample":
        mode = "evaluate"  # sampling to files is part of the evaluation job
    return _evaluation_entry(mode)(config, params, workdir, mesh)


def write_config(config, workdir: str, mode: str = "train") -> None:
    """The resolved config (file + overrides): config.json for training, config_<mode>.json
    for the other modes (so sampling with other settings keeps the training record)."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
        return
    name = "config.json" if mode == "train" else f"config_{mode}.json"
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _quiet_library_logs() -> None:
    """Orbax logs every save/restore phase at INFO through absl; keep its warnings only."""
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname

    absl_logging.get_absl_handler().addFilter(keep)


def main(argv) -> None:
    _quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/digits.py")
    try:
        workdir = prepare_workdir(_WORKDIR.value)
        apply_sample_preset(config, _SAMPLE_PRESET.value)
    except PreflightError as e:
        raise app.UsageError(str(e)) from e

    from emigm_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    local_ids = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
    shd.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               local_device_ids=local_ids, mode=_DISTRIBUTED.value)
    try:
        preflight(config, _MODE.value)
    except PreflightError as e:
        raise app.UsageError(str(e)) from e
    import jax  # pylint: disable=import-outside-toplevel
    from emigm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    lock = None
    try:
        lock = workdir_lib.acquire_lock(workdir) if jax.process_index() == 0 else None
        if _MODE.value != "train":  # training writes config.json once the resume is checked
            write_config(config, workdir, _MODE.value)
        run_mode(config, workdir, _MODE.value)
    except user_errors() as e:
        sys.exit(f"error: {e}")  # one line: these name the file and field themselves
    finally:
        if lock is not None:
            workdir_lib.release_lock(lock)


def _parse_flags(argv: list[str]):
    try:
        check_overrides(argv)
    except PreflightError as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on "
              f"flags.", file=sys.stderr)
        sys.exit(1)


def run() -> None:
    """Console-script entry point (``emigm``)."""
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
