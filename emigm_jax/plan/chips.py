"""Accelerator chips the plan knows, and the compile-only devices of a plan target.

Per-chip numbers (HBM capacity, peak dense bf16 FLOP/s, HBM bandwidth, interconnect
bandwidth) come from the vendors' published specification pages cited in ``source``. ICI/NVLink
figures are the per-chip totals as published (all links, both directions); the roofline uses
them as the rate at which a chip's collective bytes leave it, so collective times are lower
bounds. ``usable_hbm`` is what XLA reports as available (v5p: 95.74 GiB in its out-of-memory
message); where unknown it equals the capacity.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
from jax.experimental import topologies

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float          # capacity per chip (per device the mesh sees)
    peak_bf16_flops: float    # dense bf16 FLOP/s per chip
    hbm_bw: float             # bytes/s
    ici_bw: float             # bytes/s, interconnect per chip (all links, both directions)
    source: str


CHIPS = {
    "v4": Chip("TPU v4 (megacore: one device per chip)", 32 * GIB, 275e12, 1200e9, 300e9,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s); "
               "ICI 6 links x 50 GB/s: TPU v4 paper, Jouppi et al., ISCA 2023"),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9, 1200e9,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM2e, "
                "2765 GB/s, bidirectional ICI 1200 GB/s per chip)"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9, 200e9,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB HBM2, "
                "819 GB/s, ICI 1600 Gbit/s)"),
    "a100": Chip("NVIDIA A100 80GB SXM", 80e9, 312e12, 2039e9, 600e9,
                 "https://www.nvidia.com/en-us/data-center/a100/ (312 TFLOP/s bf16 dense, "
                 "2039 GB/s, NVLink 600 GB/s)"),
    "h100": Chip("NVIDIA H100 SXM", 80e9, 989e12, 3350e9, 900e9,
                 "https://www.nvidia.com/en-us/data-center/h100/ (989 TFLOP/s bf16 dense, "
                 "3.35 TB/s, NVLink 900 GB/s)"),
}


def cpu_chip(memory_gib: float) -> Chip:
    """Fake CPU devices: a configurable memory limit, the v5p's rates (so estimates compare)."""
    v5p = CHIPS["v5p"]
    return Chip(f"cpu (fake device, {memory_gib:g} GiB limit, v5p rates)", memory_gib * GIB,
                v5p.peak_bf16_flops, v5p.hbm_bw, v5p.ici_bw, "plan.hbm_gib; rates: " + v5p.source)


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str                  # as given, e.g. 'tpu:v5p:4x4x8' or 'cpu:8'
    platform: str              # 'tpu' | 'cpu'
    devices: Sequence[jax.Device]
    chip: Chip

    @property
    def num_devices(self) -> int:
        return len(self.devices)


_TPU = re.compile(r"tpu:(v4|v5p|v5e):(\d+(?:x\d+){1,2})")
_CPU = re.compile(r"cpu:(\d+)")


def resolve_target(spec: str, hbm_gib: float = 0.0) -> Target:
    """'tpu:<chip>:<topology>' -> libtpu's compile-only devices; 'cpu:N' -> N host devices.

    ``hbm_gib`` > 0 replaces the chip's memory limit (a budget below the HBM, or the size of
    a fake CPU device, 16 GiB when 0).
    """
    m = _TPU.fullmatch(spec)
    if m:
        chip, topo = m.groups()
        try:
            # libtpu exposes v4's two TensorCores as two devices unless asked for megacore,
            # which is how JAX runs v4 (one device per chip).
            kwargs = {"chip_config_name": "megacore"} if chip == "v4" else {}
            devices = topologies.get_topology_desc(topology_name=f"{chip}:{topo}",
                                                   platform="tpu", **kwargs).devices
        except Exception as e:  # pylint: disable=broad-except
            raise RuntimeError(
                f"plan.target={spec!r} needs libtpu for compile-only TPU devices ({e}); "
                f"install it with pip install -e '.[tpu]' or use plan.target='cpu:N'") from e
        limit = CHIPS[chip]
        if hbm_gib > 0:
            limit = dataclasses.replace(limit, name=f"{limit.name}, {hbm_gib:g} GiB budget",
                                        hbm_bytes=hbm_gib * GIB)
        return Target(spec, "tpu", list(devices), limit)
    m = _CPU.fullmatch(spec)
    if m:
        n = int(m.group(1))
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(
                f"plan.target={spec!r} needs {n} CPU devices but this process has "
                f"{len(devices)}; run the plan entry point (it sets the count before jax "
                f"starts) or set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return Target(spec, "cpu", devices[:n], cpu_chip(hbm_gib if hbm_gib > 0 else 16.0))
    raise ValueError(f"plan.target={spec!r} is invalid: expected 'tpu:v4|v5p|v5e:<topology>' "
                     f"(e.g. 'tpu:v5p:4x4x8') or 'cpu:N'")
