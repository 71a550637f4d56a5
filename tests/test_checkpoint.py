"""Orbax checkpoints: round trip, retention policy, exact resume after SIGKILL, SIGTERM."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax import sharding as shd
from emigm_jax import train
from emigm_jax.checkpoint import Checkpointer, PreemptionWatcher
from emigm_jax.data import pipeline
from emigm_jax.data.digits import ArraySource

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_checkpoint")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")


def _toy_state():
    import optax
    params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((4,))}
    opt = optax.adamw(1e-3)
    state = train.init_train_state(params, opt, jax.random.key(7))
    return state.replace(step=jnp.int32(5), nonfinite_total=jnp.int32(2))


def _abstract(state):
    mesh = shd.make_mesh(type("M", (), {"data": 1, "fsdp": 1})())
    sh = shd.named_shardings(state, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, sh)


def _iterator():
    ds = pipeline.build_dataset(ArraySource(x=np.arange(20)), global_batch=3, seed=0)
    return pipeline.to_iterator(ds)


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_state_and_iterator(tmp_path, async_save):
    state = _toy_state()
    it = _iterator()
    for _ in range(4):
        next(it)
    ckpt = Checkpointer(tmp_path, keep=2, async_save=async_save)
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state, it)
    assert not ckpt.save(5, state, it)  # already there
    expected_next = next(it)["x"]
    ckpt.close()

    ckpt = Checkpointer(tmp_path, keep=2)
    it2 = _iterator()
    step, restored = ckpt.restore(_abstract(state), it2)
    assert step == 5 and isinstance(restored, train.TrainState)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype
    np.testing.assert_array_equal(next(it2)["x"], expected_next)
    # the EMA weights alone, for sampling
    abstract_params = _abstract(state).ema_params
    step, ema = ckpt.restore_params(abstract_params)
    np.testing.assert_array_equal(np.asarray(ema["w"]), np.asarray(state.ema_params["w"]))
    ckpt.close()


def test_keep_last_n_and_every_k(tmp_path):
    state = _toy_state()
    ckpt = Checkpointer(tmp_path, keep=2, keep_every=4, async_save=True)
    for s in range(1, 11):
        ckpt.save(s, state)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9, 10]
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 8, 9, 10]


def test_bad_retention_settings_and_empty_restore(tmp_path):
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(tmp_path / "a", keep=0)
    with pytest.raises(ValueError, match="keep_every=-1"):
        Checkpointer(tmp_path / "b", keep_every=-1)
    assert Checkpointer(tmp_path / "c").restore(None) is None  # nothing to resume from


def test_should_save_schedule_and_sigterm_flag(tmp_path):
    ckpt = Checkpointer(tmp_path, every_steps=5)
    assert [s for s in range(1, 16) if ckpt.should_save(s)] == [5, 10, 15]
    previous = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher(ckpt)
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, does not kill pytest
    assert watcher.should_stop(2) and watcher.signum == signal.SIGTERM
    watcher.restore_handler()
    assert signal.getsignal(signal.SIGTERM) == previous
    ckpt.close()


# ----------------------------------------------------------------------------- subprocesses


def _run_worker(workdir, out, *extra, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, WORKER, f"--workdir={workdir}", f"--out={out}",
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 steps without interruption: the reference for both resume tests."""
    d = tmp_path_factory.mktemp("straight")
    _run_worker(d / "run", d / "out.json", "--steps=8")
    return json.loads((d / "out.json").read_text()), np.load(d / "out.json.npz")


def _assert_same_params(a, b):
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit


def test_resume_after_sigkill_is_bit_exact(tmp_path, straight_run):
    ref_info, ref_params = straight_run
    proc = _run_worker(tmp_path / "run", tmp_path / "killed.json", "--steps=8", "--kill_at=4",
                       check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "killed.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
    _run_worker(tmp_path / "run", tmp_path / "resumed.json", "--steps=8")
    info = json.loads((tmp_path / "resumed.json").read_text())
    assert (info["start_step"], info["step"]) == (4, 8)
    assert info["loss"] == ref_info["loss"]
    _assert_same_params(np.load(tmp_path / "resumed.json.npz"), ref_params)


def test_sigterm_checkpoints_at_the_stop_step_and_resumes(tmp_path, straight_run):
    ref_info, ref_params = straight_run
    _run_worker(tmp_path / "run", tmp_path / "stopped.json", "--steps=8", "--sigterm_at=2")
    info = json.loads((tmp_path / "stopped.json").read_text())
    assert info["preempted"] and info["step"] == 3  # signal during step 2 -> stop after 3
    steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints") if d.isdigit())
    assert steps[-1] == info["step"]
    _run_worker(tmp_path / "run", tmp_path / "resumed.json", "--steps=8")
    info = json.loads((tmp_path / "resumed.json").read_text())
    assert (info["start_step"], info["step"], info["preempted"]) == (3, 8, False)
    assert info["loss"] == ref_info["loss"]
    _assert_same_params(np.load(tmp_path / "resumed.json.npz"), ref_params)
