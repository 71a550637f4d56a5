"""The absl entry point: pre-flight errors, overrides, and the digits job end to end."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from emigm_jax import main as main_lib
from emigm_jax.evaluation import digits_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny digits model through the real CLI (the shipped configs/digits.py plus overrides).
# Plumbing tests compile the plain step: each ladder rung would add a compiled branch
# (tests/test_buckets.py proves the ladders exact; tests/test_plan.py runs them through the CLI).
NO_LADDERS = ["--config.model.encoder_buckets=()", "--config.model.loss_buckets=()"]
TINY = ["--config.model.width=32", "--config.model.enc_depth=1", "--config.model.dec_depth=1",
        "--config.model.head_depth=1", "--config.model.head_width=32",
        "--config.model.diffusion_batch_mul=1", "--config.train.batch_size=32",
        "--config.train.num_steps=4", "--config.train.log_every=2",
        "--config.checkpoint.every_steps=2", "--config.train.progress=False",
        # one first-order DPM-Solver++ step per token: the cheapest head sampler to compile
        # (tests/test_dpm_solver.py checks the solver's orders)
        "--config.sample.num_iter=2", "--config.sample.solver_steps=1",
        "--config.sample.solver_order=1", *NO_LADDERS]


def _cli(*args, devices: int = 1, timeout: int = 600, config: str = "configs/digits.py"):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emigm_jax.main", f"--config={config}",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - t0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,devices,message", [
    ((), 1, "--workdir is required"),
    (("--config.optim.nope=1",), 1, "config has no field 'optim.nope'"),
    (("--config.optimizer.lr=1",), 1, "config has no field 'optimizer'"),
    (("--config.model.num_cond_tokens=1",), 1, "num_cond_tokens is model.buffer_size"),
    (("--config.mask.schedule=cosin",), 1, "mask.schedule='cosin'"),
    (("--config.train.batch_size=12",), 8, "batch_size=12 must be divisible"),
    (("--config.mesh.data=3", "--config.mesh.fsdp=2"), 8, "needs 6 devices but 8 are available"),
    (("--config.data.source=lmdb",), 1, "data.source='lmdb'"),
    (("--mode=fly",), 1, "--mode"),
])
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, args, devices, message):
    workdir = [f"--workdir={tmp_path / 'run'}"] if args else []  # () tests the missing flag
    proc, seconds = _cli(*workdir, *args, devices=devices, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training started


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc, _ = _cli(f"--workdir={blocker / 'run'}")
    assert proc.returncode != 0
    assert "cannot be created or written" in proc.stderr, proc.stderr[-2000:]
    # The CLI prints any prepare_workdir error as above; the other messages are checked
    # in-process (each CLI run costs ~10 s of imports).
    with pytest.raises(main_lib.PreflightError, match="exists and is not a directory"):
        main_lib.prepare_workdir(str(blocker))
    with pytest.raises(main_lib.PreflightError, match="cannot be created or written"):
        main_lib.prepare_workdir("/proc/emigm_cannot_write_here")


def test_sample_preset_is_applied_and_checked():
    from configs import emigm_xs_256
    c = emigm_xs_256.get_config()
    main_lib.apply_sample_preset(c, "iter128")
    assert (c.sample.num_iter, c.sample.cfg_t_min, c.sample.cfg_t_max) == (128, 0.18, 0.6)
    with pytest.raises(main_lib.PreflightError, match="not in config.sample_presets"):
        main_lib.apply_sample_preset(c, "iter7")


def test_image_grid_layout():
    images = np.stack([np.full((8, 8), float(i)) for i in range(6)])
    grid = digits_report.digits_grid(images, rows=2, scale=2, pad=1)
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1) and grid.dtype == np.uint8
    # cell (row 1, col 2) is image 5 -> 5/16*255
    assert grid[1 + 17 + 3, 1 + 2 * 17 + 3] == int(5 / 16 * 255)


# ----------------------------------------------------------------------------- end to end


def test_digits_job_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc, _ = _cli(f"--workdir={run}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class accuracy" in proc.stdout

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("sample_class_accuracy", "sample_fd", "real_class_accuracy", "real_fd", "nfe",
                "train_steps", "train_seconds"):
        assert key in metrics, key
    assert metrics["train_steps"] == 4
    # 2 steps at s = 0.5, 1e-5; CFG interval (0.1, 0.6] guides the first: NFE 2 + 1
    assert metrics["nfe"] == 3
    assert 0.0 <= metrics["sample_class_accuracy"] <= 1.0
    assert metrics["real_class_accuracy"] > 0.95 and metrics["real_fd"] > 0

    samples = np.load(run / "samples.npz")
    images, labels = samples["images"], samples["labels"]
    assert images.shape == (500, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 16.0
    assert np.bincount(labels, minlength=10).tolist() == [50] * 10

    from PIL import Image
    grid = Image.open(run / "samples.png")
    assert grid.size == (10 * 33 + 1, 10 * 33 + 1)  # 10 classes x 10 samples, 8px * 4 + 1
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["width"] == 32 and config["train"]["num_steps"] == 4
    rows = [json.loads(l) for l in open(run / "train_log.jsonl")]
    assert [r["step"] for r in rows] == [2, 4]
    assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()) == [2, 4]

    # --mode=sample restores the EMA weights of the newest checkpoint and scores again
    os.remove(run / "metrics.json")
    proc, _ = _cli(f"--workdir={run}", "--mode=sample", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "config_sample.json").exists()
    again = json.loads((run / "metrics.json").read_text())
    assert again["train_steps"] == 4
    assert again["sample_class_accuracy"] == pytest.approx(metrics["sample_class_accuracy"])


# --mode=sample on a workdir without a checkpoint: tests/test_recovery.py
# (test_read_modes_without_a_checkpoint_fail_in_one_line) runs that command.


# The discrete digits configs through the same job: pixel tokens, categorical head.
TINY_DISCRETE = ["--config.model.width=32", "--config.model.enc_depth=1",
                 "--config.train.batch_size=32", "--config.train.num_steps=2",
                 "--config.train.log_every=2", "--config.checkpoint.every_steps=2",
                 "--config.train.progress=False", "--config.sample.num_iter=3", *NO_LADDERS]


@pytest.mark.parametrize("name,nfe", [
    ("digits_maskgit", 3),      # 3 steps, no CFG
    ("digits_maskgil", 6),      # 3 steps, CFG 2 on logits: 2 passes each
    ("digits_di", 3),
    ("digits_mdm", 3),
])
def test_discrete_digits_job_end_to_end(tmp_path, name, nfe):
    run = tmp_path / "run"
    proc, _ = _cli(f"--workdir={run}", *TINY_DISCRETE, config=f"configs/{name}.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["nfe"] == nfe
    assert 0.0 <= metrics["sample_class_accuracy"] <= 1.0 and metrics["sample_fd"] > 0
    samples = np.load(run / "samples.npz")
    tokens, images = samples["tokens"], samples["images"]
    assert tokens.shape == (500, 64) and np.issubdtype(tokens.dtype, np.integer)
    assert tokens.min() >= 0 and tokens.max() <= 16  # no mask id survives sampling
    np.testing.assert_array_equal(images.reshape(500, 64), tokens.astype(np.float32))
