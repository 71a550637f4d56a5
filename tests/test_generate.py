"""The one generation loop: padding, keys per batch, resumption at a batch boundary."""
import jax
import numpy as np
import pytest

from emigm_jax import sampling
from emigm_jax import sharding as shd
from emigm_jax.models import random_params
from tests.conftest import tiny_config

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_generate")


@pytest.fixture(scope="module")
def setup():
    c = tiny_config("categorical", arch="single")
    c.model.dec_depth = 0
    c.sample.num_iter, c.sample.batch_size = 3, 4
    c.sample.order, c.sample.cfg_scale = "confidence", 1.0
    mesh = shd.make_mesh(c.mesh)
    return c, random_params(c, seed=3), mesh


def test_batches_are_padded_keyed_by_offset_and_resumable(setup):
    config, params, mesh = setup
    labels = np.arange(10, dtype=np.int32) % 7
    tokens, nfe, times = sampling.generate(params, labels, config, mesh, seed=5, progress=False)
    assert tokens.shape == (10, 16) and nfe == 3 and times.compile_seconds > 0
    # batch 2 (rows 8, 9 + 2 padded rows) is the sampler on fold_in(key(5), 8)
    pad = np.array([labels[8], labels[9], 0, 0], np.int32)
    ref, _ = sampling.sample(params, jax.device_put(pad, shd.batch_sharding(mesh)),
                             jax.random.fold_in(jax.random.key(5), 8), config)
    np.testing.assert_array_equal(tokens[8:], np.asarray(ref)[:2])
    # resuming at a batch boundary draws exactly the uninterrupted run's tail
    tail = [(b.start, b.count, np.asarray(b.tokens)[:b.count]) for b in
            sampling.generate_batches(params, labels, config, mesh, 5, start=4, progress=False)]
    assert [(s, n) for s, n, _ in tail] == [(4, 4), (8, 2)]
    np.testing.assert_array_equal(np.concatenate([t for _, _, t in tail]), tokens[4:])
    with pytest.raises(ValueError, match="start=3 is not a multiple of the batch size 4"):
        next(sampling.generate_batches(params, labels, config, mesh, 5, start=3))
