"""Shared test fixtures: tiny configs that compile in seconds on a CPU."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One persistent XLA compilation cache for the whole run: set here, in the process that starts
# the xdist workers, so the workers and every subprocess they launch (resumes after a kill,
# the main-job runs, the two-process run) share it. Many tests compile the same tiny programs
# again in a fresh process; a cache hit loads the executable instead (test_checkpoint.py:
# 193 -> 103 CPU s). A user's own JAX_COMPILATION_CACHE_DIR is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller; workers inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="emigm-jax-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    # The xdist workers start after this: they (and their subprocesses, which then skip the
    # re-exec) run with malloc on huge pages, as the main job does (emigm_jax/host_memory.py).
    from emigm_jax.host_memory import tunables_for_this_host
    _tunables = tunables_for_this_host()
    if _tunables is not None:
        os.environ["GLIBC_TUNABLES"] = _tunables


def tiny_config(head: str = "diffusion", arch: str = "mae", ladders: bool = False):
    """``ladders``: keep base's encoder and loss ladders. Off by default because every ladder
    rung is one more compiled branch of the train step (10 + 3 by default, several times the
    compile time of the plain step); tests/test_buckets.py proves the ladders exact and
    tests/test_golden.py and tests/test_plan.py run the shipped configs with them on."""
    from configs import base

    c = base.get_config()
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.num_heads = 32, 1, 1, 4
    m.buffer_size, m.num_classes = 4, 10
    m.image_size, m.latent_stride, m.latent_channels = 16, 4, 3  # 4x4 grid = 16 tokens
    m.head_depth, m.head_width, m.diffusion_batch_mul = 2, 32, 2
    m.arch, m.head = arch, head
    m.attn_dropout = m.proj_dropout = 0.0
    if head == "categorical":
        m.vocab_size = 7
    c.train.ladders = ladders
    if not ladders:
        m.encoder_buckets = m.loss_buckets = ()
    c.train.batch_size = 4
    return c


@pytest.fixture
def tiny():
    return tiny_config


# Scheduling for `pytest -n 2 --dist loadgroup` (README's test command): the slowest modules
# are handed out first, so the run does not end with one worker busy on a long test while the
# other idles. Modules whose module-scoped fixtures compile or train mark themselves
# `pytestmark = pytest.mark.xdist_group(...)`, so each fixture is built on one worker only.
SLOWEST_FIRST = ("test_plan.py", "test_sharding.py", "test_golden.py", "test_checkpoint.py",
                 "test_buckets.py", "test_main.py", "test_scan_layers.py", "test_recovery.py",
                 "test_layout_resume.py", "test_sweep_digits.py", "test_convert_emigm.py",
                 "test_fid.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module
