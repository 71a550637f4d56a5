"""Host memory on transparent huge pages: glibc malloc's ``hugetlb`` tunable, set at launch.

Why: XLA:CPU allocates each execution's buffers with malloc, and glibc serves every block
above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` that is faulted in 4 KiB at
a time and unmapped again when the step ends. The XS-256 train step takes ~1.3 M minor
faults per step that way, seconds of system time, and more on VMs that hand freed memory
back to the host. With ``glibc.malloc.hugetlb=1`` (glibc >= 2.35) malloc advises those
mappings for transparent huge pages: 9x fewer faults and a faster step (numbers and command:
benchmarks/RESULTS.md, "Host memory on huge pages"). Nothing else changes: the same
programs run on the same values.

glibc reads its tunables once, when the process starts, so ``use_huge_pages`` re-executes
the command (same pid, same arguments) with the tunable added, before JAX is imported.
``EMIGM_JAX_HUGE_PAGES=0`` turns this off.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "EMIGM_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def _glibc_version() -> tuple[int, ...] | None:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _thp_mode() -> str:
    """The kernel's THP mode, the bracketed word of ``[always] madvise never``; '' if none."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def tunables_with_huge_pages(environ: Mapping[str, str], glibc: tuple[int, ...] | None,
                             thp_mode: str) -> str | None:
    """The GLIBC_TUNABLES value to re-execute with, or None when nothing is to be done:
    opted out, not glibc >= 2.35, THP off (or unknown), or the tunable already set (by the
    user, or by this function before the re-exec)."""
    if environ.get(OPT_OUT, "1") == "0" or glibc is None or glibc < MIN_GLIBC:
        return None
    if thp_mode not in ("always", "madvise"):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == TUNABLE for item in current.split(":") if item):
        return None
    return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def tunables_for_this_host(environ: Mapping[str, str] | None = None) -> str | None:
    """``tunables_with_huge_pages`` for this process's OS, glibc and kernel."""
    if sys.platform != "linux":
        return None
    environ = os.environ if environ is None else environ
    return tunables_with_huge_pages(environ, _glibc_version(), _thp_mode())


def use_huge_pages() -> None:
    """Re-executes this process with malloc on huge pages when the tunable is missing.

    Call it first thing in an entry point. ``python -m emigm_jax.main`` calls it before JAX
    is imported, so the discarded start costs milliseconds; the benchmark scripts and the
    ``emigm`` console script call it after their imports, which costs that import once.
    """
    value = tunables_for_this_host()
    if value is None or not getattr(sys, "orig_argv", None):
        return
    env = dict(os.environ, GLIBC_TUNABLES=value)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
