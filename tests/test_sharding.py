"""Mesh, sharding rules, and the sharded train step (8 fake devices; 2 processes over gloo).

Multi-device and multi-process checks run in subprocesses: XLA_FLAGS must be set before jax
is imported, and jax.distributed can only be initialised once per process.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from emigm_jax import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")


def _mesh(data=2, fsdp=4):
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp})


def _env(**extra):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- rules


def test_default_spec_picks_largest_divisible_dim():
    assert shd.default_spec((448, 1344), 4) == P(None, "fsdp")
    assert shd.default_spec((1344, 448), 4) == P("fsdp", None)
    assert shd.default_spec((1000, 448), 8) == P("fsdp", None)  # both divide; 1000 is larger
    assert shd.default_spec((1000, 448), 16) == P(None, "fsdp")  # only 448 divides
    assert shd.default_spec((6, 10), 4) == P()  # nothing divisible -> replicated
    assert shd.default_spec((8, 8), 4) == P("fsdp", None)  # tie -> leading dim
    assert shd.default_spec((3, 4), 4) == P(None, "fsdp")
    assert shd.default_spec((), 4) == P()
    assert shd.default_spec((1024,), 1) == P()  # no fsdp axis -> replicated
    assert shd.default_spec((16, 16), 4, min_size=1000) == P()


def test_rules_override_the_default_and_cover_optimizer_state():
    import jax
    tree = {"params": {"class_emb": {"embedding": jax.ShapeDtypeStruct((1000, 448), np.float32)},
                       "blk": {"qkv": {"kernel": jax.ShapeDtypeStruct((448, 1344), np.float32),
                                       "bias": jax.ShapeDtypeStruct((1344,), np.float32)}}},
            "mu": {"blk": {"qkv": {"kernel": jax.ShapeDtypeStruct((448, 1344), np.float32)}}},
            "count": jax.ShapeDtypeStruct((), np.int32)}
    rules = [(r"class_emb", "replicate"), (r"qkv/bias$", (None,))]
    specs = shd.partition_specs(tree, _mesh(), rules)
    assert specs["params"]["class_emb"]["embedding"] == P()
    assert specs["params"]["blk"]["qkv"]["kernel"] == P(None, "fsdp")
    assert specs["params"]["blk"]["qkv"]["bias"] == P(None)
    assert specs["mu"]["blk"]["qkv"]["kernel"] == P(None, "fsdp")  # same as its parameter
    assert specs["count"] == P()
    with pytest.raises(ValueError, match="splits a dim of size 1000 over 16"):
        shd.partition_specs(tree, _mesh(1, 16), [(r"class_emb", ("fsdp", None))])
    with pytest.raises(ValueError, match="rule value 'shard'"):
        shd.partition_specs(tree, _mesh(), [(r"class_emb", "shard")])


def test_mesh_shape_resolves_minus_one_and_rejects_mismatch():
    cfg = lambda d, f: types.SimpleNamespace(data=d, fsdp=f)  # noqa: E731
    assert shd.mesh_shape(cfg(-1, 4), 8) == (2, 4)
    assert shd.mesh_shape(cfg(2, -1), 8) == (2, 4)
    assert shd.mesh_shape(cfg(2, 4), 8) == (2, 4)
    with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
        shd.mesh_shape(cfg(3, 2), 8)
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 8"):
        shd.mesh_shape(cfg(-1, 3), 8)
    with pytest.raises(ValueError, match="cannot both be -1"):
        shd.mesh_shape(cfg(-1, -1), 8)
    with pytest.raises(ValueError, match="mesh.data=0"):
        shd.mesh_shape(cfg(0, 1), 8)


def test_distributed_flags_must_come_together():
    with pytest.raises(ValueError, match="must be given together"):
        shd.initialize_distributed("localhost:1234", None, 0)
    with pytest.raises(ValueError, match="process_id=2"):
        shd.initialize_distributed("localhost:1234", 2, 2)
    assert shd.initialize_distributed(mode="off") is False


# ----------------------------------------------------------------------------- 8 devices

_EIGHT_DEVICES = textwrap.dedent(r"""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from tests.multiprocess_worker import tiny_digits_config
    from emigm_jax import sharding as shd, train
    from emigm_jax.data import pipeline
    from emigm_jax.models import init_params

    def run(n_dev, data, fsdp):
        c = tiny_digits_config({"mesh.data": data, "mesh.fsdp": fsdp, "model.label_drop_prob": 0.1})
        mesh = shd.make_mesh(c.mesh, devices=jax.devices()[:n_dev])
        sched = train.lr_schedule(c, 1437)
        opt = train.make_optimizer(c, sched)
        state, _, sh = train.create_sharded_state(c, mesh, opt, lambda r: init_params(c, r))
        step = train.jit_train_step(train.make_train_step(c, opt, sched), sh, mesh)
        it, _ = pipeline.make_train_iterator(c, process_index=0, process_count=1)
        losses = []
        for _ in range(3):
            state, m = step(state, shd.global_batch(next(it), mesh))
            losses.append(float(m["loss"]))
        return losses, state

    l1, s1 = run(1, 1, 1)
    l8, s8 = run(8, 2, 4)
    report = {"loss1": l1, "loss8": l8, "max_param_diff": 0.0, "max_ema_diff": 0.0,
              "sharded": [], "replicated": []}
    for key, a, b in (("max_param_diff", s1.params, s8.params),
                      ("max_ema_diff", s1.ema_params, s8.ema_params)):
        report[key] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    mu = s8.opt_state[1][0].mu
    for (path, p), m in zip(jax.tree_util.tree_flatten_with_path(s8.params)[0],
                            jax.tree.leaves(mu)):
        name = shd.path_str(path)
        spec = tuple(p.sharding.spec)
        local = p.addressable_shards[0].data.shape
        entry = [name, list(p.shape), [str(s) for s in spec], list(local),
                 tuple(m.sharding.spec) == spec]
        (report["sharded"] if "fsdp" in spec else report["replicated"]).append(entry)
    report["batch_spec"] = str(shd.batch_sharding(s8.params["mask_token"].sharding.mesh).spec)
    print("REPORT" + json.dumps(report))
""")


def test_eight_device_step_matches_one_device_and_is_sharded():
    proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    np.testing.assert_allclose(report["loss8"], report["loss1"], rtol=1e-5, atol=1e-5)
    assert report["max_param_diff"] < 1e-5, report["max_param_diff"]
    assert report["max_ema_diff"] < 1e-5, report["max_ema_diff"]
    assert len(report["sharded"]) >= 10
    for name, shape, spec, local, opt_same in report["sharded"]:
        axis = spec.index("fsdp")
        assert local[axis] * 4 == shape[axis], name  # each device holds a quarter
        assert opt_same, f"optimizer state of {name} is not sharded like the parameter"
    names = {r[0] for r in report["sharded"]}
    assert any("qkv/kernel" in n for n in names)
    assert any("diffloss" in n for n in names)
    assert report["batch_spec"] == str(P(("data", "fsdp")))


# ----------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """Also the host's mask draw (train.ladders): each process hands its own rows of it."""
    steps = 3
    common = [sys.executable, WORKER, f"--steps={steps}",
              '--overrides={"checkpoint.every_steps": 2, "model.encoder_buckets": [0.5]}']
    port = _free_port()
    procs = [subprocess.Popen(common + [f"--workdir={tmp_path / 'multi'}",
                                        f"--out={tmp_path / 'multi.json'}",
                                        f"--coordinator=localhost:{port}", "--num_processes=2",
                                        f"--process_id={i}"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.Popen(common + [f"--workdir={tmp_path / 'single'}",
                                        f"--out={tmp_path / 'single.json'}"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    outs = [p.communicate(timeout=600)[0] for p in procs + [single]]
    for p, out in zip(procs + [single], outs):
        assert p.returncode == 0, out[-3000:]
    multi = json.loads((tmp_path / "multi.json").read_text())
    one = json.loads((tmp_path / "single.json").read_text())
    assert (multi["process_count"], multi["device_count"]) == (2, 2)
    assert (one["process_count"], one["device_count"]) == (1, 1)
    assert multi["step"] == one["step"] == steps
    # encoder rungs 2 + 8 = 10 and 18 slots; t_min 0.2 leaves <= 6 of 16 tokens visible
    assert multi["train_rungs"] == one["train_rungs"] == [[10, 16]]
    losses = lambda d: [json.loads(l)["loss"] for l in open(d / "train_log.jsonl")]  # noqa: E731
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"),
                               rtol=1e-5, atol=1e-6)
    a, b = np.load(tmp_path / "multi.json.npz"), np.load(tmp_path / "single.json.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # each process checkpointed its own data-iterator position
    data_dir = tmp_path / "multi" / "checkpoints" / str(steps) / "data"
    assert sorted(f.name for f in data_dir.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
