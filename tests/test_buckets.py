"""Work-proportional ladders give the full-size results: encoder z, training loss and grads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emigm_jax import losses
from emigm_jax.buckets import count_ladder, rung_index, switch_on_count
from emigm_jax.config_validation import ConfigError, validate_config
from emigm_jax.models import build_model, encoder_ladder, init_params
from tests.conftest import tiny_config


def _perturbed(config, seed=0):
    """Non-zero params everywhere (init zeroes the head's output layers)."""
    params = init_params(config, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _full(config):
    c = config.copy_and_resolve_references()
    c.model.encoder_buckets = ()
    c.model.loss_buckets = ()
    return c


def test_count_ladder_and_rung_index():
    assert count_ladder(256, (1 / 16, 0.25, 0.5), 64) == (80, 128, 192, 320)
    assert count_ladder(16, (0.1, 0.12), 4, top=10) == (6, 10)  # ceil(1.6)=ceil(1.92)=2
    assert count_ladder(16, ()) == (16,)
    rungs = (5, 8, 20)
    got = [int(rung_index(jnp.int32(v), rungs)) for v in (0, 5, 6, 8, 9, 20, 25)]
    assert got == [0, 0, 1, 1, 2, 2, 2]
    # only the chosen branch's value comes back
    out = switch_on_count(jnp.int32(7), rungs, lambda r: (lambda x: x * r), jnp.float32(1.0))
    assert float(out) == 8.0


def test_default_ladders_and_validation():
    c = tiny_config(ladders=True)  # 16 tokens, 4 buffers
    assert encoder_ladder(c) == (5, 6, 7, 8, 10, 12, 14, 16, 20)
    assert encoder_ladder(tiny_config(arch="single", ladders=True)) == (20,)
    from configs import emigm_xs_256
    assert encoder_ladder(emigm_xs_256.get_config()) == (72, 80, 96, 112, 128, 160, 192, 224,
                                                         256, 320)
    for bad in ((0.5, 0.25), (0.0, 0.5), (0.5, 1.0), ("x",)):
        c.model.encoder_buckets = bad
        with pytest.raises(ConfigError, match="model.encoder_buckets"):
            validate_config(c)
    c.model.encoder_buckets = ()
    c.model.loss_buckets = (1.5,)
    with pytest.raises(ConfigError, match=r"config.model.loss_buckets=\(1.5,\) is invalid"):
        validate_config(c)


def test_bucketed_encoder_z_equals_full_capacity_for_many_masks():
    c = tiny_config(ladders=True)
    params = _perturbed(c)
    bucketed, full = build_model(c), build_model(_full(c))
    run = lambda m: jax.jit(lambda p, t, k, l: m.apply({"params": p}, t, k, l,
                                                       method="transformer"))
    zb, zf = run(bucketed), run(full)
    tokens = jax.random.normal(jax.random.key(1), (3, 16, 3))
    labels = jnp.array([1, 2, -1])
    rng = np.random.RandomState(0)
    seen = set()
    for i in range(24):
        # per-sample counts (the ladder takes the batch max), all rungs incl. 0 and 16 visible
        vis = rng.randint(0, 17, size=3) if i % 2 else np.full(3, i % 17)
        mask = np.ones((3, 16), bool)
        for r in range(3):
            mask[r, rng.permutation(16)[:vis[r]]] = False
        seen.add(int(rung_index(jnp.int32(4 + vis.max()), encoder_ladder(c))))
        a, b = np.asarray(zb(params, tokens, mask, labels)), np.asarray(zf(params, tokens, mask, labels))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
    assert seen == set(range(len(encoder_ladder(c))))


def test_loss_and_every_gradient_equal_full_capacity():
    """``loss_fn`` with a ladder (``lax.switch`` over rungs), per-sample counts; the train
    step's one-rung programs are checked by the host-dispatch test below."""
    c = tiny_config(ladders=True)
    c.mask.t_per = "sample"
    c.model.encoder_buckets, c.model.loss_buckets = (0.25,), (0.75,)  # 2 rungs each
    params = _perturbed(c)
    batch = {"tokens": jax.random.normal(jax.random.key(1), (4, 16, 3)),
             "label": jnp.array([0, 3, 5, 9])}

    def grads(config):
        fn = jax.jit(jax.value_and_grad(
            lambda p, r: losses.loss_fn(p, batch, r, config, train=True), has_aux=True))
        return fn

    gb, gf = grads(c), grads(_full(c))
    masked = set()
    for seed in range(6):
        rng = jax.random.key(seed)
        (lb, mb), db = gb(params, rng)
        (lf, mf), df = gf(params, rng)
        masked.add(round(float(mb["mask_ratio"]) * 16))
        np.testing.assert_allclose(float(lb), float(lf), rtol=1e-6)
        for k in ("mse", "vb", "token_loss"):
            np.testing.assert_allclose(float(mb[k]), float(mf[k]), rtol=1e-6)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(db),
                                jax.tree_util.tree_leaves(df)):
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6 * max(np.abs(y).max(), 1e-30),
                                       err_msg=jax.tree_util.keystr(path))
    # the encoder's small rung (4 + 4 slots: >= 12 masked) and both loss rungs (12 rows:
    # <= 12 masked; 16) ran
    assert min(masked) <= 12 and max(masked) >= 13, masked


def _shipped_sample_settings():
    """(name, head, sample section): the eMIGM paper presets (16 iterations and the
    many-step ``sample_presets``), the digits default and each discrete digits sampler (their
    study grids in ``sample_presets`` vary the reveal rule, not the network calls)."""
    import importlib
    out = []
    for name in ("emigm_xs_256", "digits", "digits_maskgit", "digits_maskgil", "digits_di",
                 "digits_mdm"):
        c = importlib.import_module(f"configs.{name}").get_config()
        out.append((name, c.model.head, c.sample.to_dict()))
        for preset, over in (c.sample_presets.items() if name.startswith("emigm") else ()):
            s = c.sample.to_dict()
            s.update(dict(over))
            out.append((f"{name}:{preset}", c.model.head, s))
    return out


@pytest.mark.parametrize("name,head,sample", _shipped_sample_settings(),
                         ids=[s[0] for s in _shipped_sample_settings()])
def test_sampling_with_ladders_equals_full_capacity(name, head, sample):
    from emigm_jax import sampling

    c = tiny_config(head=head, ladders=True)
    for k, v in sample.items():
        c.sample[k] = v
    c.sample.head_capacity = "auto"
    c.sample.head_chunk = 4  # reveals of 5-16 tokens: full chunks, then the remainder's rung
    c.model.encoder_buckets = (0.5,)  # 2 rungs (each is one more compiled encoder); the
    # default ladder: test_head_remainder_and_read_rows_equal_full_capacity
    params = _perturbed(c)
    full = _full(c)
    full.sample.head_capacity = "full"
    labels, rng = jnp.array([1, 7]), jax.random.key(3)
    tok_b, info_b = sampling.make_sampler(c)(params, labels, rng)
    tok_f, info_f = sampling.make_sampler(full)(params, labels, rng)
    np.testing.assert_array_equal(np.asarray(info_b["reveal_counts"]),
                                  np.asarray(info_f["reveal_counts"]))
    assert int(info_b["nfe"]) == int(info_f["nfe"])
    tok_b, tok_f = np.asarray(tok_b), np.asarray(tok_f)
    if head == "categorical":
        np.testing.assert_array_equal(tok_b, tok_f)
    else:
        np.testing.assert_allclose(tok_b, tok_f, rtol=1e-5, atol=1e-5 * np.abs(tok_f).max())


def test_head_remainder_and_read_rows_equal_full_capacity():
    """Reveals larger than a head chunk (full chunks, then the remainder's rung) and the
    decoder's last block on the revealed rows only: the tokens of the full-capacity sampler."""
    from emigm_jax import sampling

    c = tiny_config(ladders=True)
    c.sample.update(dict(num_iter=3, head_chunk=4, cfg_scale=3.0, cfg_t_min=0.0,
                         cfg_t_max=0.7, head_capacity="auto"))
    params = _perturbed(c, seed=4)
    full = _full(c)
    full.sample.head_capacity = "full"
    labels, rng = jnp.array([2, 5, -1]), jax.random.key(8)
    tok_b, info_b = sampling.make_sampler(c)(params, labels, rng)
    tok_f, info_f = sampling.make_sampler(full)(params, labels, rng)
    counts = np.asarray(info_b["reveal_counts"])
    np.testing.assert_array_equal(counts, np.asarray(info_f["reveal_counts"]))
    assert counts.max() > 4 and any(k % 4 for k in counts if k > 4), counts  # remainders ran
    assert sampling.guided_steps(c.sample).any()
    tok_b, tok_f = np.asarray(tok_b), np.asarray(tok_f)
    np.testing.assert_allclose(tok_b, tok_f, rtol=1e-5, atol=1e-5 * np.abs(tok_f).max())
    assert sampling.head_rows(c.sample, 16, 7) == 4 + 4 and sampling.head_rows(c.sample, 16, 9) == 8 + 1
    assert sampling.read_ladder(c.sample, 16) == (1, 2, 4, 8, 16)
    assert sampling.read_ladder(full.sample, 16) == ()


def test_host_dispatched_train_steps_equal_the_full_capacity_step():
    """train.ladders: the host draws each step's mask as the step itself would (micro-batches
    on interleaved rows) and runs the step compiled for the smallest rungs holding it; the
    metrics and parameters equal those of the full-capacity step, which draws on device."""
    from emigm_jax import sharding as shd
    from emigm_jax import train

    c = tiny_config(ladders=True)
    c.model.encoder_buckets, c.model.loss_buckets = (0.25,), (0.875,)  # rungs (8, 20), (14, 16)
    c.train.grad_accum, c.mask.t_min = 2, 0.0
    full = c.copy_and_resolve_references()
    full.train.ladders = False
    mesh = shd.make_mesh(c.mesh, jax.devices()[:1])
    sched = train.lr_schedule(c, 1000)
    opt = train.make_optimizer(c, sched)
    params = _perturbed(c)
    rng = np.random.RandomState(0)
    batches = [{"tokens": rng.normal(size=(4, 16, 3)).astype(np.float32),
                "label": rng.randint(0, 10, size=4).astype(np.int32)} for _ in range(2)]

    def run(config):
        state, _, sh = train.create_sharded_state(config, mesh, opt, lambda r: params)
        dispatch = train.make_step_dispatch(config, opt, sched, mesh, sh,
                                            shd.to_host(state.rng))
        metrics = []
        for step in range(10):  # steps 0-9 meet rungs (8, 16), (20, 16) and (20, 14)
            state, m = dispatch(state, step, batches[step % 2])
            metrics.append(jax.device_get(m))
        return state, metrics, dispatch

    s_host, m_host, d_host = run(c)
    s_full, m_full, d_full = run(full)
    assert d_full.compiled_rungs == (train.StepRung(),) and d_full.key_data is None
    rungs = d_host.compiled_rungs
    assert set(rungs) == {train.StepRung(8, 16), train.StepRung(20, 16), train.StepRung(20, 14)}
    for a, b in zip(m_host, m_full):
        assert a["mask_ratio"] == b["mask_ratio"] and a["t"] == b["t"]  # the same draw
        for k in ("loss", "token_loss", "mse", "vb", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-6, err_msg=k)
    for x, y in zip(jax.tree_util.tree_leaves(s_host.params),
                    jax.tree_util.tree_leaves(s_full.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_each_encoder_rung_meets_one_loss_rung_with_a_shared_count():
    """The default ladders at XS-256: every visible count 0..N (shared by the batch) maps to
    one rung pair per encoder rung, each pair holding the count exactly."""
    from configs import emigm_xs_256
    from emigm_jax import train
    from emigm_jax.models import loss_ladder

    c = emigm_xs_256.get_config()
    dispatch = train.StepDispatch(c, None, None, np.zeros(2, np.uint32))
    pairs = {}
    for visible in range(257):
        mask = np.zeros((2, 256), bool)
        mask[0, :256 - visible] = True
        mask[1, visible:] = True
        rung = dispatch.rung(mask)
        assert 64 + visible <= rung.encoder_capacity and 256 - visible <= rung.loss_rows
        pairs.setdefault(rung.encoder_capacity, set()).add(rung.loss_rows)
    assert tuple(pairs) == encoder_ladder(c) and all(len(v) == 1 for v in pairs.values())
    assert {r for v in pairs.values() for r in v} == set(loss_ladder(c))
