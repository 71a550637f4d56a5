"""Nothing lost, nothing hidden: damaged and unwritable checkpoints, the resume contract, one
run per workdir, one log row per step, training time across segments, one-line errors.

Each test first makes the failure with plain file operations on a real tiny run's workdir
(or the command that failed), then checks the behaviour the README's "Resuming and
recovering" section promises.
"""
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from emigm_jax import main as main_lib
from emigm_jax import sharding as shd
from emigm_jax import train
from emigm_jax import workdir as workdir_lib
from emigm_jax.checkpoint import Checkpointer, CheckpointError, PreemptionWatcher, SaveInterrupted
from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.convert.torch_io import load_pth
from emigm_jax.data import pipeline
from emigm_jax.models import init_params
from tests.multiprocess_worker import tiny_digits_config
from tests.test_train import toy_init, toy_loss, toy_mask

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_recovery")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534  # an unprivileged uid/gid: root ignores permission bits
# 10 steps, a checkpoint every 5; max_nonfinite_steps=0 once stopped healthy runs (failure 3).
RUN = {"model.width": 64, "train.num_steps": 10, "train.log_every": 1,
       "checkpoint.every_steps": 5, "train.max_nonfinite_steps": 0}


def _flat_params(state_params) -> dict:
    return {shd.path_str(p): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(state_params))[0]}


@pytest.fixture(scope="module")
def run10(tmp_path_factory):
    """A real 10-step tiny digits run: checkpoints at steps 5 and 10, final parameters."""
    workdir = tmp_path_factory.mktemp("run10") / "run"
    result = train.train(tiny_digits_config(RUN), workdir)
    assert (result.step, result.preempted) == (10, False)  # max_nonfinite_steps=0: no stop
    return workdir, _flat_params(result.state.params)


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _cli(*args, module="emigm_jax.main", user=None, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    prefix = []
    if user is not None:  # drop root: permission bits are only enforced for other users
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]  # uid
        env["HOME"] = tempfile.gettempdir()
    t0 = time.perf_counter()
    proc = subprocess.run(prefix + [sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def _cli_overrides(config) -> list[str]:
    """--config.* flags that turn configs/digits.py into ``config`` (scalar fields and
    tuples of numbers, e.g. the ladders)."""
    from configs import digits
    base = workdir_lib.flatten(workdir_lib.config_as_json(digits.get_config()))
    want = workdir_lib.flatten(workdir_lib.config_as_json(config))

    def flag(v):
        return repr(tuple(v)) if isinstance(v, list) else v

    return [f"--config.{k}={flag(v)}" for k, v in sorted(want.items())
            if base.get(k) != v and k in base and (isinstance(v, (int, float, str)) or (
                isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)))]


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- 1: damage


def _truncate_a_data_file(step_dir):
    data = sorted((step_dir / "state" / "d").iterdir())[0]
    data.write_bytes(data.read_bytes()[:100])


DAMAGE = {
    "truncated_array_file": _truncate_a_data_file,
    "state_metadata_removed": lambda d: os.remove(d / "state" / "_METADATA"),
    "iterator_state_removed": lambda d: os.remove(d / "data" / "process_0-of-1.json"),
    "empty_step_directory": lambda d: [shutil.rmtree(p) if p.is_dir() else os.remove(p)
                                       for p in list(d.iterdir())],
}


@pytest.mark.parametrize("damage", ["truncated_array_file", "state_metadata_removed",
                                    "empty_step_directory"])  # sampling never reads the iterator
def test_sample_mode_restore_falls_back_past_a_damaged_step(run10, tmp_path, damage):
    run = _copy(run10[0], tmp_path)
    config = tiny_digits_config(RUN)
    mesh = shd.make_mesh(config.mesh)
    reference = tmp_path / "reference"
    shutil.copytree(run, reference)
    shutil.rmtree(reference / "checkpoints" / "10")
    _, expected = main_lib.restore_ema_params(config, str(reference), mesh)

    DAMAGE[damage](run / "checkpoints" / "10")
    step, params = main_lib.restore_ema_params(config, str(run), mesh)
    assert step == 5
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sorted(os.listdir(run / "checkpoints_damaged")) == ["10"]  # moved, not deleted
    assert not (run / "checkpoints" / "10").exists()


def test_train_restore_falls_back_when_the_iterator_state_is_missing(run10, tmp_path):
    run = _copy(run10[0], tmp_path)
    DAMAGE["iterator_state_removed"](run / "checkpoints" / "10")
    config = tiny_digits_config(RUN)
    mesh = shd.make_mesh(config.mesh)
    optimizer = train.make_optimizer(config, train.lr_schedule(config, 1437))
    _, abstract, _ = train.create_sharded_state(
        config, mesh, optimizer, functools.partial(init_params, config), initialize=False)
    data_iter, _ = pipeline.make_train_iterator(config)
    ckpt = Checkpointer.from_config(config, run)
    step, state = ckpt.restore(abstract, data_iter)
    ckpt.close()
    assert step == 5 and int(state.step) == 5
    assert sorted(os.listdir(run / "checkpoints_damaged")) == ["10"]


def test_training_resumes_past_a_damaged_step_like_an_uninterrupted_run(run10, tmp_path):
    run = _copy(run10[0], tmp_path)
    _truncate_a_data_file(run / "checkpoints" / "10")
    result = train.train(tiny_digits_config(RUN), run)
    assert (result.start_step, result.step) == (5, 10)
    final = _flat_params(result.state.params)
    assert sorted(final) == sorted(run10[1])
    for k, v in run10[1].items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)  # bit for bit
    rows = [json.loads(l)["step"] for l in open(run / "train_log.jsonl")]
    assert rows == list(range(1, 11))  # steps 6..10 were re-run, logged once
    assert (run / "checkpoints_damaged" / "10" / "state").is_dir()  # kept for inspection


def test_no_fresh_start_over_damaged_checkpoints_unless_asked(run10, tmp_path):
    run = _copy(run10[0], tmp_path)
    for step in ("5", "10"):
        DAMAGE["state_metadata_removed"](run / "checkpoints" / step)
    for _ in range(2):  # the first run moves both aside; a rerun must still refuse
        with pytest.raises(CheckpointError, match="--allow_fresh_start"):
            train.train(tiny_digits_config(RUN), run)
    assert sorted(os.listdir(run / "checkpoints_damaged")) == ["10", "5"]
    ckpt = Checkpointer.from_config(tiny_digits_config(RUN), run)
    ckpt.check_fresh_start(allow_fresh_start=True)  # the explicit flag lets it start over
    ckpt.close()


def test_changed_architecture_in_a_checkpoint_is_a_mismatch_not_damage(run10, tmp_path):
    run = _copy(run10[0], tmp_path)
    os.remove(run / "config.json")  # no record: the checkpoint itself still tells
    config = tiny_digits_config({**RUN, "model.width": 96})
    with pytest.raises(ConfigError, match="different model"):
        main_lib.restore_ema_params(config, str(run), shd.make_mesh(config.mesh))
    assert not (run / "checkpoints_damaged").exists()


def test_sampling_only_checkpoint_cannot_resume_training_and_is_kept(tmp_path):
    """A converted checkpoint (no optimizer state) is a different kind, not damage."""
    import optax
    params = {"w": jax.numpy.ones((3, 4))}
    state = train.init_train_state(params, optax.adamw(1e-3), jax.random.key(0))
    mesh = shd.make_mesh(tiny_digits_config().mesh)
    sh = shd.named_shardings(state, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            state, sh)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(3, {"step": state.step, "params": params, "ema_params": params})
    with pytest.raises(ConfigError, match=r"not \['nonfinite_max_streak'.*not resume training"):
        ckpt.restore(abstract)
    assert ckpt.all_steps() == [3] and not (tmp_path / "ckpt_damaged").exists()
    step, ema = ckpt.restore_params(abstract.ema_params)  # sampling still works
    assert step == 3 and np.asarray(ema["w"]).tolist() == [[1.0] * 4] * 3
    ckpt.close()


# ----------------------------------------------------------------------------- 2: unwritable


def test_unwritable_checkpoint_directory_fails_at_start_in_seconds(run10):
    base = tempfile.mkdtemp(prefix="emigm_ro_")
    try:
        os.chmod(base, 0o777)
        run = os.path.join(base, "run")
        shutil.copytree(run10[0], run)
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", run], check=True)
        os.chmod(os.path.join(run, "checkpoints"), 0o555)
        config = tiny_digits_config(RUN)
        proc, seconds = _cli(f"--workdir={run}", "--config=configs/digits.py",
                             *_cli_overrides(config), user=NOBODY)
        _one_line_error(proc, os.path.join(run, "checkpoints"), "not writable")
        assert seconds < 60, seconds  # the issue: hung 300 s; here imports dominate
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_checkpoint_directory_lost_mid_run_stops_at_the_next_save(run10, tmp_path):
    run = tmp_path / "run"
    marks = {}

    def break_directory(step, state, ckpt):
        if step == 6:
            ckpt.wait()  # step 5 committed; then the directory goes away
            os.rename(run / "checkpoints", tmp_path / "moved")
            (run / "checkpoints").write_text("a file where the directory was")
            marks["t"] = time.perf_counter()

    with pytest.raises(CheckpointError, match=f"{run / 'checkpoints'} is not writable"):
        train.train(tiny_digits_config(RUN), run, hooks=[break_directory], loss_fn=toy_loss,
                    init_params_fn=toy_init, weight_decay_mask=toy_mask)
    assert time.perf_counter() - marks["t"] < 10
    assert sorted(os.listdir(tmp_path / "moved")) == ["5"]


def test_full_checkpoint_disk_is_named_before_a_save(tmp_path, monkeypatch):
    from emigm_jax import checkpoint
    ckpt = Checkpointer(tmp_path / "ckpt")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda p: usage._replace(free=3 * 2**20))  # 3 MiB left
    with pytest.raises(CheckpointError, match=re.escape(
            f"{tmp_path / 'ckpt'} has 3.0 MiB free but a checkpoint needs about 4.0 MiB")):
        ckpt.save(1, {"w": jax.numpy.zeros((2**20,), jax.numpy.float32)})  # 4 MiB of state
    ckpt.ensure_writable(need_bytes=2 * 2**20)  # 2 MiB * 1.2 margin fits in 3 MiB
    ckpt.close()
    assert ckpt.all_steps() == []


def test_sigterm_while_a_save_is_pending_stops_at_once(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    stuck = threading.Event()
    ckpt.manager.wait_until_finished = lambda: stuck.wait(120)  # storage that never answers
    watcher = PreemptionWatcher(ckpt)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(SaveInterrupted, match="checkpoint write"):
            ckpt.wait()
    finally:
        watcher.restore_handler()
        stuck.set()
        ckpt.close()
    assert time.perf_counter() - t0 < 5


# ----------------------------------------------------------------------------- 3: non-finite


def test_nonfinite_limit_zero_means_no_tolerance_not_always():
    assert not train.nonfinite_limit_reached(0, 0)  # a healthy run never stops
    assert train.nonfinite_limit_reached(1, 0)
    assert not train.nonfinite_limit_reached(9, 10) and train.nonfinite_limit_reached(10, 10)


# ----------------------------------------------------------------------------- 4, 5: contract


def test_changed_architecture_is_named_before_anything_is_written(run10, tmp_path):
    run = _copy(run10[0], tmp_path)
    record = (run / "config.json").read_bytes()
    proc, _ = _cli(f"--workdir={run}", "--config=configs/digits.py",
                   *_cli_overrides(tiny_digits_config(RUN)), "--config.model.width=96")
    line = _one_line_error(proc, "model.width 64 -> 96", str(run / "config.json"))
    assert "train.batch_size" not in line  # only what changed is named
    assert (run / "config.json").read_bytes() == record
    assert not (run / "run.lock").exists()


def test_changed_batch_size_needs_the_explicit_flag(run10, tmp_path):
    run = _copy(run10[0], tmp_path)
    record = (run / "config.json").read_bytes()
    proc, _ = _cli(f"--workdir={run}", "--config=configs/digits.py",
                   *_cli_overrides(tiny_digits_config(RUN)), "--config.train.batch_size=8")
    _one_line_error(proc, "train.batch_size 16 -> 8", "--accept_changed_recipe")
    assert (run / "config.json").read_bytes() == record

    halved = tiny_digits_config({**RUN, "train.batch_size": 8})
    accepted = workdir_lib.check_resume(halved, str(run), accept_recipe_change=True)
    assert accepted == ["train.batch_size 16 -> 8"]
    workdir_lib.write_record(halved, str(run), accepted, step=10)
    assert (run / "config_until_step_10.json").read_bytes() == record
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 8


# ----------------------------------------------------------------------------- 6: read modes


@pytest.mark.parametrize("mode", ["sample", "sweep"])
def test_read_modes_without_a_checkpoint_fail_in_one_line(tmp_path, mode):
    run = tmp_path / "empty"
    proc, _ = _cli(f"--workdir={run}", "--config=configs/digits.py", f"--mode={mode}")
    _one_line_error(proc, "has none; train first")
    assert "cannot schedule new futures" not in proc.stderr
    assert not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------- 7: converters


@pytest.fixture(scope="module")
def pth_files(tmp_path_factory):
    torch = pytest.importorskip("torch")
    d = tmp_path_factory.mktemp("pth")
    (d / "evilmod.py").write_text(f"def touch(*a):\n    open({str(d / 'PWNED')!r}, 'w')\n")
    sys.path.insert(0, str(d))
    try:
        import evilmod  # pylint: disable=import-error
        torch.save({"model": {"w": torch.ones(3)}, "x": evilmod.touch}, d / "evil.pth")
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("evilmod", None)
    torch.save({"model": {"w": torch.ones(3, 4)}}, d / "good.pth")
    good = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(good[:len(good) // 2])
    (d / "empty.pth").write_bytes(b"")
    return d


@pytest.mark.parametrize("name,message", [
    ("truncated.pth", "truncated or corrupt"),
    ("empty.pth", "is empty (0 bytes)"),
    ("evil.pth", "Unsupported global: GLOBAL evilmod.touch"),
])
def test_converter_errors_are_one_clean_line(pth_files, name, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_pth(pth_files / name)
    assert "\x1b[" not in str(info.value) and "\n" not in str(info.value)


def test_converter_cli_names_the_refused_global(pth_files):
    proc, _ = _cli(f"--src={pth_files / 'evil.pth'}", f"--workdir={pth_files / 'out'}",
                   module="emigm_jax.convert")
    _one_line_error(proc, "GLOBAL evilmod.touch", "--trusted_pickle")
    assert "\x1b[" not in proc.stderr and not (pth_files / "PWNED").exists()


# ----------------------------------------------------------------------------- 8: smaller


@pytest.mark.parametrize("field,value,message", [
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps=-1"),
    ("train.num_steps", 0, "train.num_steps=0"),
    ("train.num_steps", -5, "train.num_steps=-5"),
    ("train.max_nonfinite_steps", -1, "train.max_nonfinite_steps=-1"),
    ("tokenizer.name", "bogus", "tokenizer.name='bogus'"),
])
def test_numeric_and_tokenizer_fields_are_validated_up_front(field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(tiny_digits_config({field: value}))


def test_bad_checkpoint_field_fails_before_anything_starts(tmp_path):
    proc, seconds = _cli(f"--workdir={tmp_path / 'run'}", "--config=configs/digits.py",
                         "--config.checkpoint.keep=0")
    assert proc.returncode != 0 and "checkpoint.keep=0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


# The toy model of test_train (compiles in a second); kill -9 at step 7 of 10, after the
# step-5 checkpoint is committed.
KILLED_RUN = """
import os, signal, sys
from emigm_jax import train
from tests.multiprocess_worker import tiny_digits_config
from tests.test_train import toy_init, toy_loss, toy_mask

def kill(step, state, ckpt):
    if step == 7:
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)

train.train(tiny_digits_config({"checkpoint.every_steps": 5, "train.num_steps": 10}),
            sys.argv[1], hooks=[kill], loss_fn=toy_loss, init_params_fn=toy_init,
            weight_decay_mask=toy_mask)
"""


def test_kill9_and_sigterm_resumes_keep_one_log_row_per_step_and_all_time(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [json.loads(l)["step"] for l in open(run / "train_log.jsonl")] == list(range(1, 8))
    assert json.loads((run / "run.lock").read_text())["pid"] != os.getpid()  # stale lock left

    toy = dict(loss_fn=toy_loss, init_params_fn=toy_init, weight_decay_mask=toy_mask)
    config = tiny_digits_config({"checkpoint.every_steps": 5, "train.num_steps": 10})

    def sigterm(step, state, ckpt):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train.train(config, run, hooks=[sigterm], **toy)
    assert stopped.preempted and (stopped.start_step, stopped.step) == (5, 8)
    finished = train.train(config, run, **toy)
    assert (finished.start_step, finished.step) == (8, 10)
    assert [json.loads(l)["step"] for l in open(run / "train_log.jsonl")] == list(range(1, 11))
    segments = workdir_lib.read_segments(str(run))
    assert [(s["start_step"], s["end_step"]) for s in segments] == [(0, 5), (5, 8), (8, 10)]
    assert all(s["seconds"] > 0 for s in segments)
    assert workdir_lib.total_train_seconds(str(run)) == pytest.approx(
        sum(s["seconds"] for s in segments))
    assert not (run / "run.lock").exists()


def test_second_run_on_a_locked_workdir_is_refused_naming_the_owner(tmp_path):
    run = tmp_path / "run"
    lock = workdir_lib.acquire_lock(str(run))
    try:
        proc, _ = _cli(f"--workdir={run}", "--config=configs/digits.py")
        _one_line_error(proc, "is in use by another run", f"pid {os.getpid()}",
                        socket.gethostname())
        assert not (run / "config.json").exists()
    finally:
        workdir_lib.release_lock(lock)
    assert not (run / "run.lock").exists()

    # A lock left by a process that is gone (kill -9) on this host is stale and replaced.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    workdir_lib.release_lock(workdir_lib.acquire_lock(str(run)))
    # A lock held from another host cannot be checked: refused, owner named.
    (run / "run.lock").write_text(json.dumps({"host": "node-7", "pid": 4242}))
    with pytest.raises(workdir_lib.WorkdirError, match="host node-7, pid 4242"):
        workdir_lib.acquire_lock(str(run))


def test_two_segments_started_in_one_second_by_one_process_are_both_kept(tmp_path):
    """A preempted train() resumed in the same process can start its next segment within the
    same second; each segment keeps its own train_time.json entry."""
    first = workdir_lib.SegmentClock(str(tmp_path), 0)
    first.record(5)
    second = workdir_lib.SegmentClock(str(tmp_path), 5)
    second.record(8)
    first.record(5)  # a later update of the first segment replaces only its own entry
    assert [(s["start_step"], s["end_step"]) for s in workdir_lib.read_segments(str(tmp_path))] \
        == [(5, 8), (0, 5)]
