"""NFE-vs-quality sweep on the digits default: grid, Pareto front, files, resumption.

The model here has random weights, so only the plumbing and the counts are asserted; that more
NFE gives better quality is measured on a trained digits run (benchmarks/RESULTS.md).
"""
import csv
import json

import numpy as np
import pytest

from emigm_jax.evaluation import digits_sweep as ds
from emigm_jax.evaluation import sweep as sw

# One xdist worker for the whole module (README's --dist loadgroup): its module
# fixtures compile or train once.
pytestmark = pytest.mark.xdist_group("test_sweep_digits")


def _tiny_digits_config(**sweep):
    import ml_collections
    from configs import digits
    c = digits.get_config()
    m = c.model
    m.width, m.enc_depth, m.dec_depth, m.head_depth, m.head_width = 32, 1, 1, 1, 32
    c.sample.solver_steps, c.sample.solver_order = 1, 1  # the cheapest sampler to compile
    c.sample.batch_size = 64
    c.sweep = ml_collections.ConfigDict(dict(num_iters=(1, 2), cfg_scales=(1.0, 2.0),
                                             cfg_intervals=((0.0, 1.0),), num_images=50))
    c.sweep.update(sweep)
    return c


@pytest.fixture(scope="module")
def setup():
    import jax
    from emigm_jax import sharding
    from emigm_jax.models import init_params
    config = _tiny_digits_config()
    mesh = sharding.make_mesh(config.mesh)
    params = jax.jit(lambda key: init_params(config, key))(jax.random.key(0))  # eager: 4x slower
    return config, params, mesh


# ----------------------------------------------------------------------------- pure pieces
def test_pareto_front_closed_form():
    nfe = [1, 2, 2, 4, 8, 8]
    fd = [9.0, 5.0, 6.0, 5.0, 1.0, np.nan]
    # (2, 6) is beaten by (2, 5); (4, 5) by (2, 5); nan is never on the front
    assert sw.pareto_front(nfe, fd).tolist() == [True, True, False, False, True, False]
    acc = [0.1, 0.5, 0.4, 0.5, 0.9, 0.95]
    assert sw.pareto_front(nfe, acc, higher_is_better=True).tolist() == [
        True, True, False, False, False, True]
    assert sw.pareto_front([3, 3], [1.0, 1.0]).tolist() == [True, True]  # ties: both kept


def test_settings_grid_and_errors():
    c = _tiny_digits_config(num_iters=(1, 4, 16, 32, 64, 4),
                            cfg_intervals=((0.0, 1.0), (0.1, 0.3)), cfg_scales=(1.0, 2.0))
    s = sw.sweep_settings(c)
    assert s["num_iters"] == [1, 4, 16]  # 16 tokens: 32 and 64 dropped, duplicates removed
    points = sw.grid_points(s)
    # cfg 1 ignores the interval: one family of 3; cfg 2: two families of 3
    assert len(points) == 9
    assert [p.family for p in points[:4]] == ["no CFG"] * 3 + ["cfg 2 on (0, 1]"]
    assert points[-1].name == "iter16_cfg2_t0.1-0.3"
    assert points[0] == sw.GridPoint(1, 1.0, 0.0, 1.0)  # no CFG: interval normalised
    before = c.sample.to_dict()
    cfg = points[-1].apply(c)
    assert (cfg.sample.num_iter, cfg.sample.cfg_scale, cfg.sample.cfg_t_min,
            cfg.sample.cfg_t_max) == (16, 2.0, 0.1, 0.3)
    assert c.sample.to_dict() == before  # the original config is untouched
    with pytest.raises(ValueError, match=r"cfg_intervals entry \(0.5, 0.2\)"):
        sw.sweep_settings(_tiny_digits_config(cfg_intervals=((0.5, 0.2),)))
    with pytest.raises(ValueError, match=r"exceeds the 16 tokens"):
        sw.sweep_settings(_tiny_digits_config(num_iters=(32,)))
    bad = _tiny_digits_config()
    with bad.unlocked():
        bad.sweep.num_iter = (1,)
    with pytest.raises(ValueError, match=r"unknown config.sweep fields \['num_iter'\]"):
        sw.sweep_settings(bad)
    assert ds.digits_labels(25).tolist() == list(np.repeat(np.arange(10), 3))


# ----------------------------------------------------------------------------- end to end
def test_digits_sweep_writes_files_and_resumes(setup, tmp_path, monkeypatch, caplog):
    from PIL import Image
    config, params, mesh = setup
    run = tmp_path / "run"
    res = sw.sweep(config, params, str(run), mesh)  # data.source='digits' -> digits scorer
    rows = res["rows"]
    assert [(r["num_iter"], r["cfg_scale"]) for r in rows] == [(1, 1.0), (2, 1.0), (1, 2.0),
                                                                (2, 2.0)]
    # measured NFE: one pass per step, two on guided steps (interval (0, 1] guides all)
    assert [r["nfe"] for r in rows] == [1, 2, 2, 4]
    assert all(r["nfe"] == r["nfe_expected"] for r in rows)
    for r in rows:
        assert 0.0 <= r["class_accuracy"] <= 1.0 and np.isfinite(r["fd"]) and r["fd"] > 0
        assert r["real_class_accuracy"] > 0.95 and 0 < r["real_fd"] < r["fd"]
        assert r["seconds_per_image"] > 0 and r["compile_seconds"] > 0 and not r["reused"]
    assert res["num_images"] == 50

    out = run / "sweep"
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and [int(t["nfe"]) for t in table] == [1, 2, 2, 4]
    assert float(table[3]["fd"]) == pytest.approx(rows[3]["fd"])
    assert any(t["pareto"] for t in table)  # the cheapest point is on both fronts
    assert "fd" in table[0]["pareto"] and "class_accuracy" in table[0]["pareto"]
    md = (out / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| num_iter | cfg_scale | nfe | class_accuracy | fd |")
    assert len(md) == 2 + 4 + 2 and md[-1].startswith("Real data (50 images)")
    with Image.open(out / "nfe_vs_fid.png") as im:
        im.load()
        assert im.size[0] > 500 and im.size[1] > 300
    assert sorted(p.name for p in (out / "points").iterdir()) == sorted(
        f"{p}.json" for p in ("iter1_cfg1_t0-1", "iter2_cfg1_t0-1", "iter1_cfg2_t0-1",
                              "iter2_cfg2_t0-1"))

    # Resumption: a rerun samples nothing; a grown grid samples only the new point. (The
    # stand-in sampler returns the real data's tokens: no compile for the new point.)
    from emigm_jax import sampling
    from emigm_jax.data.digits import digits_tokenizer, load_digits_splits
    real = digits_tokenizer(config).encode(load_digits_splits().train_images[:50])
    calls = []

    def counting(params_, labels, cfg, mesh_, seed):
        calls.append(int(cfg.sample.num_iter))
        return real[:len(labels)], {"nfe": sampling.expected_nfe(cfg.sample),
                                    "compile_seconds": 0.0, "sample_seconds": 1e-3}

    monkeypatch.setattr(ds, "sample_digits", counting)
    again = sw.sweep(config, params, str(run), mesh)
    assert calls == [] and all(r["reused"] for r in again["rows"])
    assert [r["fd"] for r in again["rows"]] == [r["fd"] for r in rows]
    grown = _tiny_digits_config(num_iters=(1, 2, 3), cfg_scales=(1.0,))
    res3 = sw.sweep(grown, params, str(run), mesh)
    assert calls == [3] and [r["reused"] for r in res3["rows"]] == [True, True, False]
    assert res3["rows"][2]["nfe"] == 3 and res3["rows"][2]["fd"] < rows[0]["fd"]
    # Other weights: nothing is reused.
    import jax
    other = jax.tree.map(lambda x: x * 1.01, params)
    calls.clear()
    sw.sweep(_tiny_digits_config(num_iters=(1,), cfg_scales=(1.0,)), other, str(run), mesh)
    assert calls == [1]
    assert "iter1_cfg1_t0-1.json is stale (changed: params)" in caplog.text
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["num_iter"] for r in saved["rows"]] == [1]


def test_sweep_point_reproduces_the_sampler_and_the_scorer(setup):
    """The sweep's sampling loop is the training report's: same labels, batches and keys."""
    import jax
    from emigm_jax import sampling, sharding
    from emigm_jax.evaluation import digits_metric
    from emigm_jax.data.digits import digits_tokenizer
    config, params, mesh = setup
    cfg = sw.GridPoint(2, 2.0, 0.0, 1.0).apply(config)
    labels = ds.digits_labels(20)
    tokens, info = ds.sample_digits(params, labels, cfg, mesh, seed=1)
    pad = np.concatenate([labels, np.zeros(44, np.int32)])  # one batch of sample.batch_size
    glabels = jax.device_put(pad, sharding.batch_sharding(mesh))
    ref, ref_info = sampling.sample(params, glabels, jax.random.fold_in(jax.random.key(1), 0),
                                    cfg)
    np.testing.assert_allclose(tokens, np.asarray(ref)[:20], rtol=1e-5, atol=1e-5)
    assert info["nfe"] == int(ref_info["nfe"]) == sampling.expected_nfe(cfg.sample) == 4
    images = digits_tokenizer(cfg).decode(tokens)
    assert images.shape == (20, 8, 8)
    s = digits_metric.score_samples(images, labels)
    assert 0.0 <= s["sample_class_accuracy"] <= 1.0


def test_presets_cross_the_grid_and_write_their_own_table(setup, tmp_path, monkeypatch):
    """sweep.presets: one family per sample preset, each applied before the grid's fields."""
    config, params, mesh = setup
    c = _tiny_digits_config(num_iters=(1, 2), cfg_scales=(1.0,),
                            presets=("default", "ddpm"), out_dir="study")
    with c.unlocked():
        c.sample_presets = {"ddpm": {"head_sampler": "ddpm", "ddpm_steps": 3, "num_iter": 99}}
    s = sw.sweep_settings(c)
    assert s["presets"] == [("default", ()),
                            ("ddpm", (("ddpm_steps", 3), ("head_sampler", "ddpm"),
                                      ("num_iter", 99)))]
    points = sw.grid_points(s)
    assert [(p.preset, p.num_iter) for p in points] == [("default", 1), ("default", 2),
                                                        ("ddpm", 1), ("ddpm", 2)]
    assert points[2].name == "ddpm_iter1_cfg1_t0-1" and points[2].family == "ddpm, no CFG"
    cfg = points[3].apply(c)  # the preset, then the grid: num_iter is the grid's
    assert (cfg.sample.head_sampler, cfg.sample.ddpm_steps, cfg.sample.num_iter) == ("ddpm", 3, 2)
    assert points[0].apply(c).sample.head_sampler == "dpm_solver"

    from emigm_jax import sampling
    seen = []

    def stand_in(params_, labels, cfg_, mesh_, seed):
        seen.append((cfg_.sample.head_sampler, int(cfg_.sample.num_iter)))
        tokens = np.zeros((len(labels), 16, 4), np.float32)
        return tokens, {"nfe": sampling.expected_nfe(cfg_.sample), "compile_seconds": 0.0,
                        "sample_seconds": 1e-3}

    monkeypatch.setattr(ds, "sample_digits", stand_in)
    res = sw.sweep(c, params, str(tmp_path), mesh)
    assert seen == [("dpm_solver", 1), ("dpm_solver", 2), ("ddpm", 1), ("ddpm", 2)]
    assert [r["preset"] for r in res["rows"]] == ["default"] * 2 + ["ddpm"] * 2
    md = (tmp_path / "study" / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| preset | num_iter | cfg_scale | nfe |")
    assert (tmp_path / "study" / "points" / "ddpm_iter2_cfg1_t0-1.json").exists()
    assert not (tmp_path / "sweep").exists()

    with pytest.raises(ValueError, match=r"presets entry 'nope' is not in config.sample_presets"):
        sw.sweep_settings(_tiny_digits_config(presets=("nope",)))
    with pytest.raises(ValueError, match=r"out_dir='../x'"):
        sw.sweep_settings(_tiny_digits_config(out_dir="../x"))
    bad = _tiny_digits_config(presets=("typo",))
    with bad.unlocked():
        bad.sample_presets = {"typo": {"num_iterz": 3}}
    with pytest.raises(ValueError, match=r"sets unknown fields \['sample.num_iterz'\]"):
        sw.sweep_settings(bad)
