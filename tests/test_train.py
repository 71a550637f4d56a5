"""Train state, optimizer recipe, train step (EMA, accumulation, non-finite guard), loop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from emigm_jax import sharding as shd
from emigm_jax import train
from emigm_jax.config_validation import ConfigError, validate_config
from tests.multiprocess_worker import tiny_digits_config

# ----------------------------------------------------------------------------- stand-in model


def toy_init(rng):
    k1, k2 = jax.random.split(rng)
    return {"enc": {"kernel": jax.random.normal(k1, (64, 8)) * 0.1, "bias": jnp.zeros((8,))},
            "diffloss": {"kernel": jax.random.normal(k2, (8, 64)) * 0.1}}


def toy_mask(params):
    return {"enc": {"kernel": True, "bias": False}, "diffloss": {"kernel": False}}


def toy_loss(params, batch, rng, config, train=True):
    """Reconstruction MSE of flattened tokens; noise from rng so the key matters."""
    x = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
    x = x + 0.01 * jax.random.normal(rng, x.shape)
    h = jnp.tanh(x @ params["enc"]["kernel"] + params["enc"]["bias"])
    loss = jnp.mean((h @ params["diffloss"]["kernel"] - x) ** 2)
    return loss, {"mask_ratio": jnp.float32(0.5)}


def det_loss(params, batch, rng, config, train=True):
    """Deterministic per-example-mean loss (gradient of a mean over rows is additive)."""
    del rng
    x = batch["tokens"].reshape(batch["tokens"].shape[0], -1)
    h = jnp.tanh(x @ params["enc"]["kernel"] + params["enc"]["bias"])
    loss = jnp.mean((h @ params["diffloss"]["kernel"] - x) ** 2)
    return loss, {}


def toy_batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.normal(size=(b, 16, 4)).astype(np.float32),
            "label": rng.integers(0, 10, size=(b,)).astype(np.int32)}


# ----------------------------------------------------------------------------- schedule


def test_lr_is_scaled_by_batch_and_warms_up_linearly():
    c = tiny_digits_config({"optim.base_lr": 1e-4, "train.batch_size": 512,
                            "optim.warmup_steps": 10})
    assert train.peak_lr(c) == pytest.approx(2e-4)
    s = train.lr_schedule(c, 10_000)
    np.testing.assert_allclose([float(s(i)) for i in (0, 5, 10, 11, 10_000)],
                               [0.0, 1e-4, 2e-4, 2e-4, 2e-4], rtol=1e-6)
    c.optim.warmup_steps = -1  # fall back to epochs: 1000 examples / 512 -> 2 steps/epoch
    c.optim.warmup_epochs = 2
    assert train.warmup_steps(c, 1000) == 4
    assert float(train.lr_schedule(c, 1000)(2)) == pytest.approx(1e-4)
    c.train.num_steps, c.train.epochs = -1, 3
    assert train.total_steps(c, 1000) == 6
    c.train.num_steps = 7
    assert train.total_steps(c, 1000) == 7


def test_cosine_decay_after_warmup_matches_closed_form():
    c = tiny_digits_config({"optim.base_lr": 1e-4, "train.batch_size": 512,
                            "optim.warmup_steps": 10, "train.num_steps": 110,
                            "optim.decay": "cosine"})
    s, peak = train.lr_schedule(c, 10_000), 2e-4
    steps = np.array([0, 5, 10, 35, 60, 85, 110])
    k = np.clip(steps - 10, 0, 100)
    want = np.where(steps < 10, peak * steps / 10, peak * 0.5 * (1 + np.cos(np.pi * k / 100)))
    np.testing.assert_allclose([float(s(int(i))) for i in steps], want, rtol=1e-5, atol=1e-12)
    assert float(s(110)) == pytest.approx(0.0, abs=1e-12)
    c.optim.decay = "linear"
    with pytest.raises(ConfigError, match="optim.decay"):
        validate_config(c)


# ----------------------------------------------------------------------------- optimizer


def test_adamw_clip_and_mask_match_float64_reference():
    c = tiny_digits_config({"optim.base_lr": 0.05, "train.batch_size": 256,
                            "optim.warmup_steps": 0, "optim.weight_decay": 0.1})
    lr, b1, b2, eps, wd, clip = 0.05, 0.9, 0.95, 1e-8, 0.1, 3.0
    opt = train.make_optimizer(c, train.lr_schedule(c, 1000), toy_mask)
    params = toy_init(jax.random.key(0))
    state = opt.init(params)
    ref = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    mask = toy_mask(None)
    m = jax.tree.map(np.zeros_like, ref)
    v = jax.tree.map(np.zeros_like, ref)
    rng = np.random.default_rng(1)
    for t in range(1, 4):
        scale = 5.0 if t < 3 else 0.01  # clipping active on steps 1-2, inactive on 3
        grads = jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32),
                             params)
        upd, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, upd)
        g64 = jax.tree.map(lambda g: np.asarray(g, np.float64), grads)
        norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(g64)))
        g64 = jax.tree.map(lambda g: g * min(1.0, clip / norm), g64)
        m = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, g64)
        v = jax.tree.map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, g64)
        ref = jax.tree.map(
            lambda p, m_, v_, k: p - lr * ((m_ / (1 - b1 ** t)) / (np.sqrt(v_ / (1 - b2 ** t)) + eps)
                                           + (wd * p if k else 0.0)), ref, m, v, mask)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


def test_default_weight_decay_mask_spares_head_and_1d_params():
    """Zero gradients: only weight decay moves params, and only the transformer's >=2-D ones."""
    c = tiny_digits_config({"optim.base_lr": 0.256, "train.batch_size": 256,
                            "optim.warmup_steps": 0, "optim.weight_decay": 0.5})
    from emigm_jax.models import param_shapes  # the real model's tree; values don't matter
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype),
                          param_shapes(c))
    opt = train.make_optimizer(c, train.lr_schedule(c, 1000))
    upd, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    decayed, spared = 0, 0
    flat_p = jax.tree.leaves(jax.device_get(params))
    flat_u = jax.tree_util.tree_flatten_with_path(jax.device_get(upd))[0]
    for (path, u), p in zip(flat_u, flat_p):
        name = shd.path_str(path)
        if "diffloss" in name or p.ndim < 2:
            np.testing.assert_array_equal(u, 0.0, err_msg=name)
            spared += 1
        else:
            np.testing.assert_allclose(u, -0.256 * 0.5 * p, rtol=1e-5, err_msg=name)
            decayed += 1
    assert decayed > 5 and spared > 5


# ----------------------------------------------------------------------------- train step


def _step_setup(config, loss=toy_loss):
    sched = train.lr_schedule(config, 1000)
    opt = train.make_optimizer(config, sched, toy_mask)
    state = train.init_train_state(toy_init(jax.random.key(0)), opt, jax.random.key(1))
    return opt, jax.jit(train.make_train_step(config, opt, sched, loss)), state


def test_step_updates_ema_counts_and_reports_metrics():
    c = tiny_digits_config({"optim.ema_decay": 0.9, "optim.warmup_steps": 4})
    _, step, state = _step_setup(c)
    before = state
    state, metrics = step(state, toy_batch())
    assert int(state.step) == 1
    for e0, p1, e1 in zip(jax.tree.leaves(before.ema_params), jax.tree.leaves(state.params),
                          jax.tree.leaves(state.ema_params)):
        np.testing.assert_allclose(e1, 0.9 * e0 + 0.1 * p1, rtol=1e-6, atol=1e-7)
    assert set(metrics) >= {"loss", "grad_norm", "lr", "mask_ratio", "nonfinite"}
    assert float(metrics["lr"]) == 0.0  # lr of step 0 under warmup
    state, metrics = step(state, toy_batch())
    assert float(metrics["lr"]) == pytest.approx(train.peak_lr(c) / 4)
    # the step's randomness is a function of the step number only
    s2 = train.init_train_state(toy_init(jax.random.key(0)), _step_setup(c)[0], jax.random.key(1))
    _, m_a = step(s2, toy_batch())
    _, m_b = step(s2.replace(step=jnp.int32(5)), toy_batch())
    assert float(m_a["loss"]) != float(m_b["loss"])


def test_train_step_is_one_program_at_its_rung():
    """The step hands the loss a ladder-free config at its rung (full capacity by default),
    whatever train.ladders says; sampling keeps model.encoder_buckets."""
    seen = []

    def spy(params, batch, rng, config, train=True):
        m = config.model
        seen.append((tuple(m.encoder_buckets), tuple(m.loss_buckets), m.encoder_capacity,
                     m.loss_capacity))
        return toy_loss(params, batch, rng, config, train)

    for rung in (train.StepRung(), train.StepRung(12, 9)):
        c = tiny_digits_config({"model.encoder_buckets": (0.5,), "model.loss_buckets": (0.75,),
                                "train.ladders": True})
        sched = train.lr_schedule(c, 1000)
        opt = train.make_optimizer(c, sched, toy_mask)
        state = train.init_train_state(toy_init(jax.random.key(0)), opt, jax.random.key(1))
        jax.jit(train.make_train_step(c, opt, sched, spy, rung=rung))(state, toy_batch())
        assert tuple(c.model.encoder_buckets) == (0.5,)  # the caller's config is untouched
    assert seen == [((), (), 0, 0), ((), (), 12, 9)]
    # a custom loss gets one full-capacity program, its mask drawn on device
    assert not train.uses_host_masks(c, spy) and train.uses_host_masks(c, None)


def test_nonfinite_steps_are_skipped_and_counted():
    def nan_loss(params, batch, rng, config, train=True):
        loss, m = toy_loss(params, batch, rng, config, train)
        return jnp.where(batch["label"][0] < 0, jnp.nan, loss), m

    c = tiny_digits_config()
    _, step, state = _step_setup(c, nan_loss)
    good, bad = toy_batch(), toy_batch()
    bad["label"][0] = -1
    state, _ = step(state, good)
    snap = state
    for _ in range(3):
        state, m = step(state, bad)
        assert float(m["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves((snap.params, snap.ema_params, snap.opt_state)),
                    jax.tree.leaves((state.params, state.ema_params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (int(state.step), int(state.nonfinite_streak), int(state.nonfinite_max_streak),
            int(state.nonfinite_total)) == (4, 3, 3, 3)
    state, m = step(state, good)
    assert float(m["nonfinite"]) == 0.0
    assert (int(state.nonfinite_streak), int(state.nonfinite_max_streak),
            int(state.nonfinite_total)) == (0, 3, 3)
    assert not np.array_equal(np.asarray(state.params["enc"]["kernel"]),
                              np.asarray(snap.params["enc"]["kernel"]))


def test_microbatches_take_interleaved_rows():
    x = jnp.arange(12).reshape(6, 2)
    mb = train._split_microbatches({"x": x}, 3)["x"]  # pylint: disable=protected-access
    np.testing.assert_array_equal(mb[1], np.asarray(x)[1::3])


def test_gradient_accumulation_equals_full_batch():
    c1 = tiny_digits_config({"train.grad_accum": 1})
    c4 = tiny_digits_config({"train.grad_accum": 4})
    _, step1, s1 = _step_setup(c1, det_loss)
    _, step4, s4 = _step_setup(c4, det_loss)
    for i in range(2):
        s1, m1 = step1(s1, toy_batch(16, i))
        s4, m4 = step4(s4, toy_batch(16, i))
        assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
        assert float(m4["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- the loop


def test_loop_logs_checkpoints_and_resumes(tmp_path):
    c = tiny_digits_config({"train.num_steps": 6, "train.log_every": 2,
                            "checkpoint.every_steps": 4})
    kw = dict(loss_fn=toy_loss, init_params_fn=toy_init, weight_decay_mask=toy_mask)
    r = train.train(c, tmp_path, **kw)
    assert (r.step, r.start_step, r.preempted) == (6, 0, False)
    rows = [json.loads(l) for l in open(tmp_path / "train_log.jsonl")]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert {"loss", "lr", "grad_norm", "mask_ratio", "steps_per_sec"} <= set(rows[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [4, 6]
    # a longer run in the same workdir resumes at 6 and equals an uninterrupted 9-step run
    c.train.num_steps = 9
    r2 = train.train(c, tmp_path, **kw)
    assert (r2.start_step, r2.step) == (6, 9)
    r3 = train.train(c, tmp_path / "fresh", **kw)
    for a, b in zip(jax.tree.leaves(r2.state), jax.tree.leaves(r3.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loop_stops_after_consecutive_nonfinite_steps(tmp_path):
    def always_nan(params, batch, rng, config, train=True):
        return jnp.float32(jnp.nan) + 0 * toy_loss(params, batch, rng, config)[0], {}

    c = tiny_digits_config({"train.num_steps": 20, "train.log_every": 1,
                            "train.max_nonfinite_steps": 3, "checkpoint.every_steps": 0})
    with pytest.raises(FloatingPointError, match="non-finite for 3 consecutive steps"):
        train.train(c, tmp_path, loss_fn=always_nan, init_params_fn=toy_init,
                    weight_decay_mask=toy_mask)


def test_prepare_batch_encodes_inputs_inside_the_step():
    """Image sources: a frozen encoder (aux weights, own rng stream) makes the tokens on device."""
    c = tiny_digits_config()
    sched = train.lr_schedule(c, 1000)
    opt = train.make_optimizer(c, sched, toy_mask)

    def prepare(aux, batch, rng):
        del rng  # a real encoder samples the KL posterior with it
        return {"tokens": batch["image"] * aux["scale"], "label": batch["label"]}

    enc = jax.jit(train.make_train_step(c, opt, sched, det_loss, prepare))
    plain = jax.jit(train.make_train_step(c, opt, sched, det_loss))
    s0 = train.init_train_state(toy_init(jax.random.key(0)), opt, jax.random.key(1))
    b = toy_batch()
    s_enc, m_enc = enc(s0, {"image": b["tokens"], "label": b["label"]}, {"scale": jnp.float32(2.0)})
    s_ref, m_ref = plain(s0, {"tokens": b["tokens"] * 2.0, "label": b["label"]})
    assert float(m_enc["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-6)
    for a, r in zip(jax.tree.leaves(s_enc.params), jax.tree.leaves(s_ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-6, atol=1e-7)
