"""Entry points re-execute once with glibc malloc on transparent huge pages, which cuts the
page faults of large host buffers (emigm_jax/host_memory.py)."""
import ast
import os
import subprocess
import sys

import pytest

from emigm_jax.host_memory import TUNABLE, tunables_for_this_host, tunables_with_huge_pages
from tests.conftest import ROOT

ON = f"{TUNABLE}=1"
HOST_CAN = tunables_for_this_host({}) is not None  # Linux, glibc >= 2.35, THP not 'never'


def test_tunable_value_for_each_host():
    new = (2, 36)
    assert tunables_with_huge_pages({}, new, "madvise") == ON
    assert tunables_with_huge_pages({}, new, "always") == ON
    kept = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert tunables_with_huge_pages(kept, new, "madvise") == f"glibc.malloc.arena_max=2:{ON}"
    # nothing to do: already set (by the user, or before the re-exec), opted out, THP off,
    # glibc too old or not glibc
    assert tunables_with_huge_pages({"GLIBC_TUNABLES": f"a=1:{TUNABLE}=0"}, new, "madvise") is None
    assert tunables_with_huge_pages({"EMIGM_JAX_HUGE_PAGES": "0"}, new, "madvise") is None
    assert tunables_with_huge_pages({}, new, "never") is None
    assert tunables_with_huge_pages({}, new, "") is None
    assert tunables_with_huge_pages({}, (2, 34), "madvise") is None
    assert tunables_with_huge_pages({}, None, "madvise") is None


PROBE = """
import os, resource, sys
from emigm_jax.host_memory import use_huge_pages
print("start", os.getpid(), flush=True)
use_huge_pages()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # a fresh 64 MiB malloc block each time (above the mmap threshold), filled
    block = bytearray(b"x") * (64 << 20)  # (not numpy: it advises its own arrays already)
    del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults)
"""


def _probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_changes, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")
    starts = [line.split(" ")[1] for line in out if line.startswith("start ")]
    pid, tunables, faults = out[-2].split(" ")
    assert set(starts) == {pid}, (starts, pid)  # execve keeps the process
    return len(starts), tunables, int(faults)


@pytest.mark.skipif(not HOST_CAN, reason="needs Linux, glibc >= 2.35 and THP not 'never'")
def test_reexec_sets_the_tunable_once_and_cuts_page_faults():
    starts, tunables, faults_on = _probe()
    assert starts == 2 and tunables == ON  # one re-exec, then no loop
    starts, tunables, faults_off = _probe(EMIGM_JAX_HUGE_PAGES="0")
    assert starts == 1 and tunables == ""
    # 8 x 64 MiB: 131072 faults in 4 KiB pages, 256 in 2 MiB pages
    assert faults_off > 100_000, faults_off
    assert faults_on < faults_off / 4, (faults_on, faults_off)


def test_main_reexecs_before_it_imports_jax():
    tree = ast.parse(open(os.path.join(ROOT, "emigm_jax", "main.py")).read())
    lines = {"reexec": None, "jax": None}
    for node in tree.body:
        if isinstance(node, ast.If) and "use_huge_pages" in ast.unparse(node):
            lines["reexec"] = lines["reexec"] or node.lineno
        if isinstance(node, ast.Import) and any(a.name == "jax" for a in node.names):
            lines["jax"] = lines["jax"] or node.lineno
    assert lines["reexec"] and lines["jax"] and lines["reexec"] < lines["jax"], lines
