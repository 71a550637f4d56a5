"""The grain input pipeline: shuffling, epochs, per-process sharding, iterator state."""
import numpy as np
import pytest

from emigm_jax.data import pipeline
from emigm_jax.data.digits import ArraySource
from tests.multiprocess_worker import tiny_digits_config


def _source(n=10):
    return ArraySource(x=np.arange(n), y=np.arange(n) * 10)


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_each_epoch_is_a_fresh_permutation_and_seeded():
    ds = pipeline.build_dataset(_source(10), global_batch=5, seed=3)
    it = pipeline.to_iterator(ds)
    xs = np.concatenate([b["x"] for b in _take(it, 6)])  # 3 epochs
    epochs = xs.reshape(3, 10)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(10))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert not np.array_equal(epochs[0], np.arange(10))
    again = np.concatenate([b["x"] for b in _take(pipeline.to_iterator(ds), 6)])
    np.testing.assert_array_equal(again, xs)  # deterministic for a seed
    other = pipeline.build_dataset(_source(10), global_batch=5, seed=4)
    assert not np.array_equal(np.concatenate([b["x"] for b in _take(pipeline.to_iterator(other), 2)]),
                              xs[:10])
    # fields stay aligned through shuffle and batch
    b = next(pipeline.to_iterator(ds))
    np.testing.assert_array_equal(b["y"], b["x"] * 10)


def test_iterator_state_restores_exactly():
    ds = pipeline.build_dataset(_source(10), global_batch=4, seed=1)
    it = pipeline.to_iterator(ds)
    _take(it, 3)
    state = it.get_state()
    rest = _take(it, 5)
    it2 = pipeline.to_iterator(ds)
    it2.set_state(state)
    for a, b in zip(rest, _take(it2, 5)):
        np.testing.assert_array_equal(a["x"], b["x"])


@pytest.mark.parametrize("procs", [2, 4])
def test_process_shards_tile_the_global_batch(procs):
    """Rows of process p are rows [p*b, (p+1)*b) of the 1-process global batch."""
    gb = 8
    single = _take(pipeline.to_iterator(pipeline.build_dataset(_source(13), global_batch=gb,
                                                                seed=7)), 5)
    per_proc = [_take(pipeline.to_iterator(pipeline.build_dataset(
        _source(13), global_batch=gb, seed=7, process_index=p, process_count=procs)), 5)
        for p in range(procs)]
    for step in range(5):
        stitched = np.concatenate([per_proc[p][step]["x"] for p in range(procs)])
        np.testing.assert_array_equal(stitched, single[step]["x"])
        assert per_proc[0][step]["x"].shape == (gb // procs,)


def test_random_transform_is_seeded_by_global_index():
    def noisy(ex, rng):
        return {"x": ex["x"], "y": ex["y"] + rng.integers(0, 1000)}
    one = _take(pipeline.to_iterator(pipeline.build_dataset(
        _source(10), global_batch=4, seed=2, random_transform=noisy)), 3)
    two = [_take(pipeline.to_iterator(pipeline.build_dataset(
        _source(10), global_batch=4, seed=2, random_transform=noisy, process_index=p,
        process_count=2)), 3) for p in range(2)]
    for s in range(3):
        np.testing.assert_array_equal(np.concatenate([two[0][s]["y"], two[1][s]["y"]]),
                                      one[s]["y"])
    assert not all(np.array_equal(b["y"], b["x"] * 10) for b in one)


def test_eval_mode_without_repeat_or_shuffle():
    ds = pipeline.build_dataset(_source(10), global_batch=4, seed=0, shuffle=False, repeat=False,
                                drop_remainder=False)
    got = [b["x"] for b in pipeline.to_iterator(ds)]
    np.testing.assert_array_equal(np.concatenate(got), np.arange(10))
    assert [len(g) for g in got] == [4, 4, 2]


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        pipeline.build_dataset(_source(), global_batch=8, seed=0, process_count=3)
    with pytest.raises(ValueError, match="empty"):
        pipeline.build_dataset(_source(0), global_batch=2, seed=0)
    c = tiny_digits_config()
    c.data.source = "lmdb"
    with pytest.raises(ValueError, match="data.source='lmdb'"):
        pipeline.make_source(c)


def test_digits_train_iterator_batches():
    c = tiny_digits_config({"train.batch_size": 12})
    it, n = pipeline.make_train_iterator(c, process_index=1, process_count=2)
    assert n == 1437
    b = next(it)
    assert b["tokens"].shape == (6, 16, 4) and b["tokens"].dtype == np.float32
    assert b["label"].shape == (6,) and b["label"].dtype == np.int32
    assert it.get_state() == {"next_index": 1}
