"""Checkpoints of either layer layout (``model.scan_layers``) restore into the other: a run
trained unrolled resumes scanned and back, reaching an uninterrupted unrolled run's numbers,
and sampling from a checkpoint of the other layout gives the same-layout restore's tokens."""
import json
import logging
import shutil

import jax
import numpy as np
import optax
import pytest

from emigm_jax import main as main_lib
from emigm_jax import sharding as shd
from emigm_jax import train
from emigm_jax.checkpoint import Checkpointer
from emigm_jax.models.layout import is_scanned, to_layout
from emigm_jax.sampling.generate import generate
from tests.multiprocess_worker import tiny_digits_config

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_layout_resume")

# Two blocks per stack (a stack of one is stacked too, but two tell the layer order apart);
# 6 steps with a checkpoint every 2; sampling with one first-order solver step per token, the
# cheapest head sampler to compile (the layout, not the solver, is under test).
RUN = {"model.enc_depth": 2, "model.dec_depth": 2, "train.num_steps": 6,
       "checkpoint.every_steps": 2, "checkpoint.async_save": False, "sample.batch_size": 8,
       "sample.solver_steps": 1, "sample.solver_order": 1}
RTOL = 1e-6


def _config(scan: bool):
    return tiny_digits_config({**RUN, "model.scan_layers": scan})


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(l) for l in open(workdir / "train_log.jsonl", encoding="utf-8")]
    return {r["step"]: float(r["loss"]) for r in rows}


def _resume_from(source, tmp_path, step: int, scan: bool):
    """``source``'s workdir without its checkpoints after ``step``, trained on to the end with
    ``model.scan_layers=scan``."""
    run = tmp_path / "run"
    shutil.copytree(source, run)
    for later in (p for p in (run / "checkpoints").iterdir() if int(p.name) > step):
        shutil.rmtree(later)
    result = train.train(_config(scan), run, progress=False)
    assert (result.start_step, result.step) == (step, 6)
    return run, jax.device_get(result.state)


def _relative_error(got, want) -> float:
    """||got - want|| / ||want|| over a whole parameter-shaped tree (float64)."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert [np.shape(a) for a in got] == [np.shape(b) for b in want]
    diff = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in zip(got, want))
    norm = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in want)
    assert norm > 0
    return (diff / norm) ** 0.5


def _trees(state) -> dict:
    """The parameter-shaped trees of a train state, in the unrolled layout."""
    unrolled = to_layout(state, False)
    return {"params": unrolled.params, "ema_params": unrolled.ema_params,
            "adam_mu": optax.tree_utils.tree_get(unrolled.opt_state, "mu"),
            "adam_nu": optax.tree_utils.tree_get(unrolled.opt_state, "nu")}


@pytest.fixture(scope="module")
def unrolled(tmp_path_factory):
    """An uninterrupted 6-step unrolled run: its workdir (checkpoints 2, 4, 6) and state."""
    workdir = tmp_path_factory.mktemp("unrolled") / "run"
    result = train.train(_config(False), workdir, progress=False)
    assert result.step == 6
    return workdir, jax.device_get(result.state)


@pytest.fixture(scope="module")
def unrolled_then_scanned(unrolled, tmp_path_factory):
    """Unrolled to step 2, resumed scanned to 6 (scanned checkpoints 4 and 6)."""
    return _resume_from(unrolled[0], tmp_path_factory.mktemp("to_scanned"), 2, scan=True)


def _assert_like_uninterrupted(run, state, reference):
    ref_dir, ref_state = reference
    got, want = _trees(state), _trees(ref_state)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for name in got:
        assert _relative_error(got[name], want[name]) <= RTOL, name
    assert int(optax.tree_utils.tree_get(state.opt_state, "ScaleByAdamState").count) == 6
    losses, ref_losses = _losses(run), _losses(ref_dir)
    assert sorted(losses) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(losses[step] - ref_losses[step]) <= RTOL * abs(ref_losses[step]), step


def test_unrolled_checkpoint_resumes_scanned_like_an_uninterrupted_run(
        unrolled, unrolled_then_scanned):
    run, state = unrolled_then_scanned
    assert is_scanned(state.params) and is_scanned(state.opt_state)
    _assert_like_uninterrupted(run, state, unrolled)
    record = json.loads((run / "config.json").read_text())
    assert record["model"]["scan_layers"] is True  # the record follows the free field


def test_scanned_checkpoint_resumes_unrolled_like_an_uninterrupted_run(
        unrolled, unrolled_then_scanned, tmp_path):
    run, state = _resume_from(unrolled_then_scanned[0], tmp_path, 4, scan=False)
    assert not is_scanned(state.params) and not is_scanned(state.opt_state)
    _assert_like_uninterrupted(run, state, unrolled)


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_across_layouts_is_a_relabelling(unrolled, unrolled_then_scanned, caplog):
    """Both checkpoint layouts into both configs: the other layout's restore holds exactly the
    same-layout restore's numbers, converted, and says so in one log line."""
    mesh = shd.make_mesh(_config(False).mesh)
    caplog.set_level(logging.INFO)
    for workdir, saved_scan in ((unrolled[0], False), (unrolled_then_scanned[0], True)):
        step, same = main_lib.restore_ema_params(_config(saved_scan), str(workdir), mesh)
        caplog.clear()
        other_step, other = main_lib.restore_ema_params(_config(not saved_scan), str(workdir), mesh)
        assert step == other_step == 6
        assert is_scanned(same) is saved_scan and is_scanned(other) is not saved_scan
        _assert_same(other, to_layout(jax.device_get(same), not saved_scan))
        layouts = ("scanned", "unrolled") if saved_scan else ("unrolled", "scanned")
        said = [r.getMessage() for r in caplog.records if "layer layout" in r.getMessage()]
        assert len(said) == 1 and "saved with the %s layer layout; converted it to the %s " \
            "layout" % layouts in said[0], said


def test_sampling_an_unrolled_checkpoint_scanned_gives_the_same_layout_tokens(unrolled, tmp_path):
    """--mode=sample with model.scan_layers=True: an unrolled checkpoint samples the tokens of a
    scanned checkpoint of the same weights, for the same key."""
    config, mesh = _config(True), shd.make_mesh(_config(True).mesh)
    _, ema = main_lib.restore_ema_params(_config(False), str(unrolled[0]), mesh)
    scanned_copy = Checkpointer(tmp_path / "checkpoints", async_save=False)
    scanned_copy.save(6, {"ema_params": to_layout(ema, True)})  # a sampling-only checkpoint
    scanned_copy.close()
    _, same = main_lib.restore_ema_params(config, str(tmp_path), mesh)
    _, other = main_lib.restore_ema_params(config, str(unrolled[0]), mesh)
    labels = np.arange(8) % 10
    want = generate(same, labels, config, mesh, seed=3, progress=False)[0]
    got = generate(other, labels, config, mesh, seed=3, progress=False)[0]
    assert want.shape[0] == 8 and float(np.std(want)) > 0
    np.testing.assert_array_equal(got, want)
