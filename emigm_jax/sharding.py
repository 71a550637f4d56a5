"""Device mesh, parameter sharding rules, global batches, and multi-host start-up.

One code path from a laptop CPU to a TPU pod: every array lives on a 2-D mesh with axes
``('data', 'fsdp')``. The batch is split over both axes (every device holds different
examples); parameters and optimizer state are split over ``fsdp`` only (ZeRO-3 style: XLA
all-gathers a weight where it is used and reduce-scatters its gradient). Which dimension of
a parameter is split is decided by regex rules on its path, with a shape-based default:
the largest dimension divisible by the fsdp size, else replicated.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# A rule maps a regex (re.search on the '/'-joined parameter path) to a PartitionSpec-like
# tuple (entries None, 'fsdp', 'data' or a tuple of axes) or the string 'auto' (shape-based
# default) or 'replicate'. The first matching rule wins; unmatched paths use 'auto'.
Rule = tuple[str, Any]
# Parameters of a scanned block stack (``model.scan_layers``) carry a leading layer axis; it is
# never split (the scan slices it one layer at a time), the rules apply to the rest.
STACKED_PATH = re.compile(r"_blocks/block/")
# Transformer block stacks all-gather their weights per block (per layer inside a scan).
BLOCK_PATH = re.compile(r"_blocks/block(_\d+)?/")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) from ``config.mesh``; ``-1`` in one axis means "all remaining devices"."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh.data and config.mesh.fsdp cannot both be -1")
    for name, v in (("data", data), ("fsdp", fsdp)):
        if v == 0 or v < -1:
            raise ValueError(f"config.mesh.{name}={v} is invalid: expected a positive integer "
                             f"or -1 (use all remaining devices)")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise ValueError(
                f"config.mesh.{'fsdp' if data == -1 else 'data'}={known} does not divide the "
                f"{num_devices} available devices")
        data, fsdp = (num_devices // known, known) if data == -1 else (known, num_devices // known)
    if data * fsdp != num_devices:
        raise ValueError(
            f"mesh shape (data={data}, fsdp={fsdp}) needs {data * fsdp} devices but "
            f"{num_devices} are available ({jax.default_backend()}); set config.mesh.data/fsdp "
            f"so that data * fsdp == {num_devices} (or one of them to -1)")
    return data, fsdp


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all (global) devices with GSPMD ('auto') axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def path_str(path) -> str:
    """'/'-joined names of a pytree key path, e.g. 'backbone/encoder_blocks_0/attn/qkv/kernel'."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def default_spec(shape: Sequence[int], fsdp: int, axis: str = "fsdp",
                 min_size: int = 0) -> P:
    """Largest dimension divisible by ``fsdp`` goes over ``axis``; otherwise replicated.

    Ties go to the leading dimension. Arrays with fewer than ``min_size`` elements stay
    replicated (sharding them saves nothing and costs a collective).
    """
    if fsdp <= 1 or not shape or int(np.prod(shape)) < min_size:
        return P()
    candidates = [(d, -i) for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
    if not candidates:
        return P()
    _, neg_i = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_i] = axis
    return P(*spec)


def _as_spec(rule_value, shape, fsdp, min_size, path) -> P:
    if isinstance(rule_value, P):
        spec = rule_value
    elif rule_value == "auto":
        return default_spec(shape, fsdp, min_size=min_size)
    elif rule_value == "replicate":
        return P()
    elif isinstance(rule_value, (tuple, list)):
        spec = P(*rule_value)
    else:
        raise ValueError(f"sharding rule value {rule_value!r} for {path!r} is invalid: expected "
                         f"'auto', 'replicate', a PartitionSpec or a tuple of axis names")
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {tuple(spec)} for {path!r} has more entries than the "
                         f"array's {len(shape)} dims (shape {tuple(shape)})")
    return spec


def partition_specs(tree, mesh: Mesh, rules: Iterable[Rule] = (), min_size: int = 0):
    """PartitionSpec for every leaf of ``tree`` (arrays or ShapeDtypeStructs) from the rules.

    ``mesh`` only needs a ``.shape`` mapping of axis sizes (a Mesh or an AbstractMesh).

    Applies to parameters and, unchanged, to optimizer state (Adam's mu/nu have the
    parameter's shape and a path that ends in the parameter's path, so the same regexes and
    the same shape default give them the parameter's spec).
    """
    compiled = [(re.compile(pattern), value) for pattern, value in rules]
    fsdp = mesh.shape["fsdp"]

    def spec_for(path, leaf):
        full_shape = tuple(getattr(leaf, "shape", ()))
        name = path_str(path)
        stacked = bool(STACKED_PATH.search(name)) and len(full_shape) > 1
        shape = full_shape[1:] if stacked else full_shape
        for pattern, value in compiled:
            if pattern.search(name):
                spec = _as_spec(value, shape, fsdp, min_size, name)
                break
        else:
            spec = default_spec(shape, fsdp, min_size=min_size)
        if stacked:
            spec, shape = P(None, *spec), full_shape
        for dim, axes in zip(shape, spec):
            size = int(np.prod([mesh.shape[a] for a in
                                ((axes,) if isinstance(axes, str) else (axes or ()))]))
            if dim % size:
                raise ValueError(f"sharding spec {tuple(spec)} for {name!r} splits a dim of size "
                                 f"{dim} over {size} devices; shape {shape}")
        return spec

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def named_shardings(tree, mesh: Mesh, rules: Iterable[Rule] = (), min_size: int = 0):
    """NamedSharding for every leaf of ``tree`` (see ``partition_specs``)."""
    specs = partition_specs(tree, mesh, rules, min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def rules_from_config(config) -> list[Rule]:
    """``config.mesh.rules`` (optional): sequence of (regex, spec) pairs."""
    return [tuple(r) for r in config.mesh.rules]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def with_mesh_context(fn, mesh: Mesh):
    """``fn`` traced with ``mesh`` in context, so ``constrain_rows``/``gather_weights`` act."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped


def _batch_mesh_size() -> int:
    """Devices over the batch axes of the mesh in context (``jax.set_mesh``); 0 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not all(a in mesh.axis_names for a in BATCH_AXES):
        return 0
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def constrain_rows(x: jax.Array) -> jax.Array:
    """Keeps ``x``'s leading (batch-row) dim split over (data, fsdp) inside a jitted step.

    Why: with only the parameters sharded, GSPMD may keep each weight shard in place and move
    the batch's activations to it instead (tensor-parallel style); pinning the rows at block
    and head boundaries keeps every device on its own examples. A no-op outside a mesh
    context (``jax.set_mesh``) or when the rows do not split evenly.
    """
    n = _batch_mesh_size()
    if n <= 1 or not x.ndim or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


def _fsdp_spec(shape: Sequence[int]) -> P:
    """The parameter layout of ``partition_specs``' shape default on the mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    return default_spec(shape, int(mesh.shape["fsdp"]))


@jax.custom_vjp
def _gather(w: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(w, P())


def _gather_fwd(w):
    return _gather(w), None


def _gather_bwd(_, g):
    # The cotangent is a partial sum over each device's rows: asking for it in the
    # parameter's own fsdp layout lets XLA reduce-scatter it instead of all-reducing it.
    return (jax.lax.with_sharding_constraint(g, _fsdp_spec(g.shape)),)


_gather.defvjp(_gather_fwd, _gather_bwd)


def gather_weights(tree, skip_blocks: bool = False, dtype=None):
    """FSDP's weight all-gather at the point of use; its gradient is reduce-scattered.

    A transformer block applies it to its own weights (per layer inside a scan); callers of
    the model apply it to the full parameter tree with ``skip_blocks=True`` so that embeddings
    and heads are gathered once while the block stacks are left to gather layer by layer.
    ``dtype``: matrices (>= 2-D) are cast to it before the gather (the compute dtype: layers
    cast them anyway, and the gather then moves half the bytes in bfloat16).
    A no-op outside a mesh context with an fsdp axis > 1.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names or mesh.shape["fsdp"] <= 1:
        return tree

    def one(path, w):
        if not getattr(w, "ndim", 0) or (skip_blocks and BLOCK_PATH.search(path_str(path) + "/")):
            return w
        if dtype is not None and w.ndim >= 2 and jnp.issubdtype(w.dtype, jnp.floating):
            w = w.astype(dtype)
        return _gather(w)
    return jax.tree_util.tree_map_with_path(one, tree)


def check_batch_size(global_batch: int, mesh: Mesh, name: str = "train.batch_size",
                     grad_accum: int = 1) -> None:
    """The one batch check: the global batch must split evenly into ``grad_accum``
    micro-batches, each over the mesh's devices, and over the processes."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch % grad_accum or (global_batch // grad_accum) % n_dev or global_batch % n_proc:
        raise ValueError(
            f"config.{name}={global_batch} must be divisible by train.grad_accum={grad_accum} "
            f"times the {n_dev} devices of the mesh {dict(mesh.shape)}, i.e. a multiple of "
            f"{grad_accum * n_dev}, and by the {n_proc} processes")


def global_batch(local_batch, mesh: Mesh):
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the batch.

    Each process passes its own ``B / process_count`` rows; rows of process p become rows
    [p*b, (p+1)*b) of the global array (the layout ``data.pipeline`` reads in).
    """
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()

    def to_global(x):
        x = np.asarray(x)
        shape = (x.shape[0] * n_proc,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(to_global, local_batch)


# ---------------------------------------------------------------------------------------------
# Multi-host start-up.

_CLUSTER_ENV = (
    # (variable, meaning): any of these with a value > 1 means jax.distributed can auto-detect
    # a multi-process job (jax's own cluster detection reads the same environments).
    ("SLURM_NTASKS", "Slurm"),
    ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("JAX_NUM_PROCESSES", "explicit env"),
)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process (gathered when not addressable)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _auto_cluster() -> str | None:
    """Name of a detected multi-process environment, or None for a single process."""
    for var, name in _CLUSTER_ENV:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return name
        except ValueError:
            continue
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "Cloud TPU pod"
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "TPU multislice"
    return None


def _cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend need an implementation (default: none).

    Harmless on GPU/TPU hosts (only the CPU client reads it); must precede backend start-up,
    so it cannot ask ``jax.default_backend()`` first.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           mode: str = "auto") -> bool:
    """Starts jax.distributed when this is a multi-process job; returns whether it did.

    Explicit flags (coordinator address, process count and id) always win. Otherwise, in
    ``mode='auto'``, jax's cluster auto-detection is used when a multi-process environment
    (TPU pod, Slurm, Open MPI) is visible; a plain single-process run starts nothing.
    ``local_device_ids`` selects this process's devices (default: jax's choice, which on
    Slurm/MPI GPU clusters is one GPU per process, the local rank's).
    Must run before anything touches devices.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode={mode!r}; expected 'auto', 'on' or 'off'")
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "multi-process flags must be given together: --coordinator_address, "
                f"--num_processes, --process_id (got {coordinator_address!r}, "
                f"{num_processes!r}, {process_id!r})")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                             f"{num_processes})")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids)
        return True
    if mode == "off":
        return False
    cluster = _auto_cluster()
    if cluster is None and mode == "auto":
        return False
    logging.info("initialising jax.distributed (auto-detect: %s)", cluster)
    _cpu_collectives()
    # On Slurm/MPI jax defaults to one device per process (local_device_ids = [local rank]);
    # pass all local GPU ids for one process per node.
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return True
