"""Lower and compile the real train step and sampler for a target from abstract inputs.

Nothing is allocated on the target: the state, batch and sampler inputs are
``ShapeDtypeStruct``s carrying their shardings on a mesh built by ``sharding.make_mesh`` over
the target's (compile-only) devices, and XLA's compiled executable reports per-device memory,
cost and the partitioned HLO.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from emigm_jax import sharding as shd
from emigm_jax import train as train_lib
from emigm_jax.models import init_params, param_shapes, seq_len, token_dim
from emigm_jax.plan.chips import Target
from emigm_jax.plan.hlo import Collective, collectives, matmul_flops
from emigm_jax.sampling import make_sampler


@dataclasses.dataclass
class Compiled:
    """What one compile-only run says about a program on the target (numbers per chip)."""
    what: str                 # 'train' | 'sample'
    mesh: tuple[int, int]     # (data, fsdp)
    remat: bool
    batch: int                # global batch
    fits: bool
    compile_s: float
    memory: dict[str, float] = dataclasses.field(default_factory=dict)
    flops: float = 0.0          # XLA cost analysis (each loop body once)
    matmul_flops: float = 0.0   # matmuls with loop trips (hlo.matmul_flops)
    bytes_accessed: float = 0.0
    state_bytes: float = 0.0  # the sharded arguments' own bytes (state + batch) per chip
    collectives: list[Collective] = dataclasses.field(default_factory=list)
    error: str = ""

    @property
    def per_chip_batch(self) -> int:
        return self.batch // (self.mesh[0] * self.mesh[1])


def variant(config, mesh: tuple[int, int], remat: bool, batch: int, what: str = "train"):
    """A copy of ``config`` with the mesh, remat and global batch of one plan point."""
    c = config.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp = int(mesh[0]), int(mesh[1])
    c.model.remat = bool(remat)
    if what == "train":
        c.train.batch_size = int(batch)
    else:
        c.sample.batch_size = int(batch)
    return c


def sharded_bytes(tree) -> float:
    """Bytes one device holds of ``tree``'s ShapeDtypeStructs under their shardings."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        dtype = leaf.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a typed key: its raw data
            raw = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
            shape, dtype = shape + raw.shape[len(leaf.shape):], raw.dtype
        total += float(np.prod(shape)) * jnp.dtype(dtype).itemsize
    return total


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


def _train_inputs(config, mesh):
    schedule = train_lib.lr_schedule(config, int(config.data.num_train_images))
    optimizer = train_lib.make_optimizer(config, schedule)
    rules = shd.rules_from_config(config)
    _, state, shardings = train_lib.create_sharded_state(
        config, mesh, optimizer, functools.partial(init_params, config), rules,
        initialize=False)
    b, n = int(config.train.batch_size), seq_len(config)
    rows = shd.batch_sharding(mesh)
    if config.model.head == "categorical":
        tokens = jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=rows)
    else:
        tokens = jax.ShapeDtypeStruct((b, n, token_dim(config)), jnp.float32, sharding=rows)
    batch = {"tokens": tokens, "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)}
    step = train_lib.jit_train_step(train_lib.make_train_step(config, optimizer, schedule),
                                    shardings, mesh)
    return step, (state, batch)


def _sample_inputs(config, mesh):
    shapes = param_shapes(config)
    params = _abstract(shapes, shd.named_shardings(shapes, mesh, shd.rules_from_config(config)))
    b = int(config.sample.batch_size)
    labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shd.batch_sharding(mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=shd.replicated(mesh))
    sampler = jax.jit(shd.with_mesh_context(make_sampler(config), mesh))
    return sampler, (params, labels, key)


def compile_point(config, target: Target, what: str = "train", hlo_path: str = "") -> Compiled:
    """Compiles the train step (or sampler) of ``config`` (its mesh, remat, batch) on ``target``.

    ``hlo_path``: also write the compiled HLO text there (for reading or re-analysis).
    """
    mesh_shape = shd.mesh_shape(config.mesh, target.num_devices)
    mesh = shd.make_mesh(config.mesh, target.devices)
    batch = int(config.train.batch_size if what == "train" else config.sample.batch_size)
    out = Compiled(what, mesh_shape, bool(config.model.remat), batch, False, 0.0)
    fn, args = (_train_inputs if what == "train" else _sample_inputs)(config, mesh)
    out.state_bytes = sharded_bytes(args)
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "exceeds" not in msg:
            raise
        out.compile_s, out.error = time.perf_counter() - t0, msg.strip().splitlines()[0][:400]
        return out
    out.compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    mem = {k: float(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    out.memory = mem
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    out.flops = float(cost.get("flops", 0.0))
    out.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w", encoding="utf-8") as f:
            f.write(text)
    out.collectives = collectives(text)
    out.matmul_flops = matmul_flops(text)
    out.fits = mem["total"] <= target.chip.hbm_bytes
    if not out.fits:
        out.error = (f"needs {mem['total'] / 2**30:.2f} GiB per chip, more than the "
                     f"{target.chip.hbm_bytes / 2**30:.2f} GiB limit")
    return out


def largest_batch(config, target: Target, what: str = "train", max_per_chip: int = 4096,
                  known: tuple[Compiled, ...] = ()) -> tuple[int, int, list[Compiled]]:
    """(largest per-chip batch that fits, the next size up (which does not), the runs).

    Memory grows about linearly with the batch, so two compiles give a line whose crossing
    of the limit is the first guess; compiles at the guess and one above then move the
    bracket until b fits and b + 1 does not (a few compiles instead of a bisection). The
    second value is 0 when even ``max_per_chip`` fits. ``known``: runs of this config already
    compiled (the sweep's), reused instead of compiled again (an eMIGM-H compile takes minutes).
    """
    n = target.num_devices
    mesh = shd.mesh_shape(config.mesh, n)
    runs = {k.per_chip_batch: k for k in known}

    def run(per_chip: int) -> Compiled:
        if per_chip not in runs:
            runs[per_chip] = compile_point(
                variant(config, mesh, config.model.remat, per_chip * n, what), target, what)
        return runs[per_chip]

    def guess() -> int:
        pts = sorted((b, r.memory["total"]) for b, r in runs.items() if r.memory)
        if len(pts) < 2:
            return 2 * max(runs)
        (b0, m0), (b1, m1) = pts[-2], pts[-1]
        slope = max((m1 - m0) / (b1 - b0), 1.0)
        return int((target.chip.hbm_bytes - m1) // slope) + b1

    lo, hi = 0, 0  # largest known to fit, smallest known not to
    b = max(1, int(config.train.batch_size if what == "train" else config.sample.batch_size)
            // n)
    for _ in range(32):
        b = min(max(b, lo + 1), max_per_chip if not hi else hi - 1)
        if run(b).fits:
            lo = b
        else:
            hi = b
        if (hi and hi == lo + 1) or lo == max_per_chip:
            break
        b = guess() if (not hi or lo) else max(1, b // 2)
        if hi and b >= hi:
            b = hi - 1
        if b <= lo:
            b = lo + 1
    return lo, hi, [runs[k] for k in sorted(runs)]


def factorisations(n: int) -> list[tuple[int, int]]:
    """Every (data, fsdp) with data * fsdp == n."""
    return [(n // f, f) for f in range(1, n + 1) if n % f == 0]


def sweep(config, target: Target, meshes: list[tuple[int, int]], remats: list[bool],
          what: str = "train") -> list[Compiled]:
    """One compile per (mesh, remat) at the config's global batch."""
    batch = int(config.train.batch_size if what == "train" else config.sample.batch_size)
    return [compile_point(variant(config, m, r, batch, what), target, what)
            for m in meshes for r in remats]


__all__ = ["Compiled", "variant", "sharded_bytes", "compile_point", "largest_batch",
           "factorisations", "sweep"]
