"""The product's main job: ``python -m emigm_jax.main --config=configs/<name>.py --workdir=DIR``.

The same command runs on one CPU, one GPU, a GPU cluster or a TPU pod (see launch/). Any
config field can be overridden on the command line (``--config.optim.base_lr=2e-4``).

Modes:
  train     train (resuming from the newest checkpoint in DIR); on the embedded digits config
            it then samples with the EMA weights and scores the samples (metrics.json).
  sample    restore the newest checkpoint's EMA weights and sample (digits: + score).
  evaluate  digits: same as sample; other datasets: ``emigm_jax.evaluation.evaluate``.
  sweep     ``emigm_jax.evaluation.sweep`` (NFE-vs-FID table and plot).
  plan      ``emigm_jax.plan``: compile-only plan for ``config.plan.target`` (a TPU slice via
            libtpu, or cpu:N): memory, FLOPs, collectives, estimated step time, best mesh.

Everything that can be checked without compiling is checked first (workdir, config fields,
mesh vs devices, batch divisibility), so a bad command fails in seconds with a message that
names the bad value.
"""
from __future__ import annotations

from emigm_jax.host_memory import use_huge_pages

if __name__ == "__main__":  # before the imports below load JAX: a re-exec here costs ms
    use_huge_pages()

import logging
import os
import re
import sys
import tempfile

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from emigm_jax import plan
from emigm_jax import sharding as shd
from emigm_jax import train as train_lib
from emigm_jax import workdir as workdir_lib
from emigm_jax.checkpoint import Checkpointer, CheckpointError, SaveInterrupted
from emigm_jax.config_files import load_config
from emigm_jax.config_validation import ConfigError, sample_preset, validate_config
from emigm_jax.convert.inception import load_inception_variables
from emigm_jax.data.pipeline import SOURCES
from emigm_jax.evaluation.digits_report import digits_report, digits_sample_fn
from emigm_jax.evaluation.evaluate import eval_settings, evaluate
from emigm_jax.evaluation.sweep import sweep
from emigm_jax.models import param_shapes
from emigm_jax.sampling import ar_prefix
from emigm_jax.workdir import WorkdirError, total_train_seconds

MODES = ("train", "sample", "evaluate", "sweep", "plan")

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


# Names the companion papers (DI, BAG, MaskGIL) use for a switch that exists here under another name.
FIELD_SYNONYMS = {
    "model.num_cond_tokens": "model.buffer_size (class-embedding prefix tokens: eMIGM 64, MaskGIL 1)",
    "sample.gumbel_temp": "sample.choice_temperature (with sample.gumbel_anneal)",
}


class PreflightError(ValueError):
    """A problem with the command line found before anything is compiled."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input or files: printed as one line, no traceback."""
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
    try:
        overrides = sample_preset(config, name, source="--sample_preset=")
    except ConfigError as e:
        raise PreflightError(str(e)) from e
    with config.unlocked():
        config.sample.update(overrides)


def preflight(config, mode: str) -> None:
    """Config fields, mesh shape vs devices, batch divisibility: all before compilation."""
    if config.data.source not in SOURCES:  # first: the other fields' rules depend on it
        raise PreflightError(f"config.data.source={config.data.source!r} is invalid: "
                             f"expected one of {SOURCES}")
    try:
        validate_config(config)
        mesh = shd.make_mesh(config.mesh)
        if mode == "train":
            shd.check_batch_size(int(config.train.batch_size), mesh,
                                 grad_accum=int(config.train.grad_accum))
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
    try:
        config = load_config(config_path)
    except FileNotFoundError as e:
        raise PreflightError(f"--config={config_path!r}: no such file") from e
    except ValueError as e:
        raise PreflightError(f"--config={config_path!r}: {e}") from e
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
# Modes.

def run_evaluation(config, params, workdir: str, mesh, mode: str) -> dict:
    """--mode=evaluate / sweep; the Inception is loaded once here for both."""
    if mode == "sweep" and config.data.source == "digits":
        return sweep(config, params, workdir, mesh)
    path = eval_settings(config)["inception_path"]
    if not path:
        raise ValueError("config.eval.inception_path is empty: point it at pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth (or a converted .msgpack)")
    entry = evaluate if mode == "evaluate" else sweep
    return entry(config, params, workdir, mesh,
                 inception_variables=load_inception_variables(path))


def restore_ema_params(config, workdir: str, mesh):
    """EMA parameters of the newest checkpoint, in their training sharding and in the layer
    layout of ``config.model.scan_layers`` (a checkpoint of the other layout is converted)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory) or not any(d.isdigit() for d in os.listdir(directory)):
        raise FileNotFoundError(f"--mode needs a checkpoint, but {directory} has none; "
                                f"train first (--mode=train)")
    shapes, rules = param_shapes(config), shd.rules_from_config(config)
    shardings = shd.named_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    ckpt = Checkpointer.from_config(config, workdir, read_only=True)
    try:
        restored = ckpt.restore_params(abstract, rules=rules)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory} can be restored (damaged steps "
                                f"moved to {ckpt.damaged_directory}); train first")
    return restored


def sampling_params(config, params, mesh):
    """``params``, or ``{'masked': params, 'ar': the AR run's EMA params}`` with
    ``sample.ar_prefix`` > 0 (MaskGIL's AR prefix; the AR run is ``sample.ar_workdir``)."""
    if ar_prefix.prefix_length(config) == 0:
        return params
    ar_workdir = config.sample.ar_workdir
    _, ar_params = restore_ema_params(ar_prefix.load_ar_config(ar_workdir), ar_workdir, mesh)
    return {"masked": params, "ar": ar_params}


def run_mode(config, workdir: str, mode: str) -> dict:

    digits = config.data.source == "digits"
    mesh = shd.make_mesh(config.mesh)
    if mode == "train":
        sample_fn = digits_sample_fn(config, mesh) if digits and \
            int(config.train.sample_every) > 0 else None
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

    step, params = restore_ema_params(config, workdir, mesh)
    params = sampling_params(config, params, mesh)
    if digits and mode in ("sample", "evaluate"):
        return digits_report(config, params, workdir, mesh, train_steps=step,
                             train_seconds=total_train_seconds(workdir))
    if mode == "sample":
        mode = "evaluate"  # sampling to files is part of the evaluation job
    return run_evaluation(config, params, workdir, mesh, mode)


def write_config(config, workdir: str, mode: str = "train") -> None:
    """The resolved config (file + overrides): config.json for training, config_<mode>.json
    for the other modes (so sampling with other settings keeps the training record)."""
    if jax.process_index() != 0:
        return
    name = "config.json" if mode == "train" else f"config_{mode}.json"
    with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _quiet_library_logs() -> None:
    """Orbax logs every save/restore phase at INFO through absl; keep its warnings only."""

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

    if _MODE.value == "plan":  # compile-only: no devices of the target are needed here
        plan.set_cpu_devices(str(config.plan.target))
        try:
            validate_config(config)
        except ConfigError as e:
            raise app.UsageError(str(e)) from e
        write_config(config, workdir, "plan")
        plan.run_plan(config, workdir)
        return
    local_ids = [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None
    shd.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               local_device_ids=local_ids, mode=_DISTRIBUTED.value)
    try:
        preflight(config, _MODE.value)
    except PreflightError as e:
        raise app.UsageError(str(e)) from e
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
    use_huge_pages()  # a no-op when ``python -m emigm_jax.main`` has done it already
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
