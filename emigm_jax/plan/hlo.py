"""Collectives of a compiled (optimised, partitioned) HLO module, with counts and bytes.

Each collective instruction is read from the module text with its result shapes, replica
group size and the source op that caused it (``metadata op_name``, ``source_file:line``).
Instructions inside a while-loop body (a ``lax.scan``, e.g. over layers) run once per trip:
their count is multiplied by the loop's trip count (nested loops multiply): XLA's
``known_trip_count`` where the module states it, else the integer bound the loop condition
compares against (scans count from 0). TPU emits a reduce-scatter as a fusion
``all-reduce-scatter`` (an all-reduce whose result each device slices in place): it is
reported as a reduce-scatter, with the op name of the fusion that calls it.

Per-chip traffic per execution, for a group of n devices and payload S bytes (the full
buffer: all-gather's output, reduce-scatter's input, all-reduce's operand): all-gather and
all-to-all (n-1)/n S, reduce-scatter (n-1)/n S, all-reduce 2 (n-1)/n S (reduce-scatter then
all-gather), collective-permute S. These are ring/bucket algorithm volumes, a lower bound.
"""
from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")
_DTYPE = r"[a-z]+\d*[a-z0-9]*"  # f32, bf16, f8e4m3fn, ...
_SHAPE = re.compile(r"\b(" + _DTYPE + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_REF = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)="
                  r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONST = re.compile(r"s32\[\]\S* constant\((\d+)\)")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')


@dataclasses.dataclass
class Collective:
    kind: str
    shapes: list[tuple[str, tuple[int, ...]]]   # (dtype, dims) of the payload buffers
    group: int                                  # devices per replica group
    count: int                                  # executions per step (loop trips included)
    op_name: str
    source: str

    @property
    def payload_bytes(self) -> int:
        return sum(DTYPE_BYTES.get(dt, 4) * _prod(dims) for dt, dims in self.shapes)

    @property
    def traffic_bytes(self) -> float:
        """Bytes one chip sends per execution (see module doc)."""
        n, s = max(self.group, 1), self.payload_bytes
        if self.kind == "collective-permute":
            return float(s)
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * (n - 1) / n * s

    @property
    def elements(self) -> list[int]:
        return [_prod(dims) for _, dims in self.shapes]


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(x) for x in dims.split(",") if x))
            for dt, dims in _SHAPE.findall(text) if dt in DTYPE_BYTES]


def _group_size(line: str) -> int:
    m = _MESH_GROUPS.search(line)  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2))]))
    m = _IOTA_GROUPS.search(line)
    if m:
        return int(m.group(2))
    m = _LIST_GROUPS.search(line)
    return len(m.group(1).split(",")) if m and m.group(1) else 1


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, name = "", None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            if m:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    entry = name
                continue
        if name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps, entry


def _loop_bound(cond_lines: list[str]) -> int:
    """The integer a scan's loop condition compares its counter against (1 if unclear)."""
    consts = [int(v) for line in cond_lines for v in _CONST.findall(line)]
    return max(consts) if consts else 1


def _call_edges(comps: dict[str, list[str]], callers: dict[str, str]):
    """parent -> [(child, executions per parent run, conditional id or None)]: loop bodies
    run their trip count, calls once; the branches of one conditional share an id (one of
    them runs)."""
    edges = collections.defaultdict(list)
    for parent, lines in comps.items():
        for i, line in enumerate(lines):
            refs = dict((k, c) for k, c in _REF.findall(line))
            trip = _TRIP.search(line)
            n = int(trip.group(1)) if trip else _loop_bound(comps.get(refs.get("condition"), []))
            op = _OP_NAME.search(line)
            for kind, child in refs.items():
                branch = (parent, i) if kind.endswith("_computation") else None
                edges[parent].append((child, n if kind == "body" else 1, branch))
                if op and child not in callers:
                    callers[child] = op.group(1)
            for group in _BRANCHES.findall(line):
                for child in group.split(","):
                    edges[parent].append((child.strip().lstrip("%"), 1, (parent, i)))
    return edges


def _multipliers(comps: dict[str, list[str]], entry: str,
                 callers: dict[str, str]) -> dict[str, int]:
    """Executions of each computation per run of the entry (trip counts multiply; every
    branch of a conditional is counted, as each may run)."""
    edges = _call_edges(comps, callers)
    order, seen = [], set()

    def visit(c):  # post-order DFS; the call graph is a DAG
        if c in seen:
            return
        seen.add(c)
        for child, _, _ in edges.get(c, ()):
            visit(child)
        order.append(c)
    visit(entry)
    mult = collections.defaultdict(int, {entry: 1})
    for c in reversed(order):
        for child, factor, _ in edges.get(c, ()):
            mult[child] += mult[c] * factor
    return mult


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction reachable from the entry computation."""
    comps, entry = _computations(hlo_text)
    callers: dict[str, str] = {}
    mult = _multipliers(comps, entry, callers)
    out = []
    for name, lines in comps.items():
        if not mult.get(name):
            continue
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            result, kind, start = m.group(1), m.group(2), m.group(3)
            shapes = _shapes(result)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"
            if start and kind in ("all-gather", "collective-permute") and len(shapes) > 1:
                shapes = shapes[len(shapes) // 2:]  # (operands..., outputs...)
            if kind == "reduce-scatter":  # payload is the input: operands follow the '('
                operands = line[m.end():].split("),")[0]
                shapes = _shapes(operands) or shapes
            op = _OP_NAME.search(line)
            src = _SOURCE.search(line)
            out.append(Collective(kind, shapes, _group_size(line), mult[name],
                                  op.group(1) if op else callers.get(name, "?"),
                                  f"{src.group(1)}:{src.group(2)}" if src else "?"))
    return out


_MATMUL = re.compile(r"=\s*(\S+)\s+(dot|convolution)\(([^)]*)\)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=[^_]*_([^-]*)->")
_WINDOW = re.compile(r"window=\{[^}]*(stride|dilate|pad=|reversal)")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)")
_PARAM = re.compile(r"([\w.\-]+):\s*(" + _DTYPE + r"\[[\d,]*\])")  # header parameters


def _operand_dims(operands: str, table: dict[str, str]) -> list[tuple[int, ...]]:
    """Dims of each operand: printed inline (``f32[4,8] %x``) or looked up by name."""
    dims = []
    for op in operands.split(","):
        op = op.strip()
        shape = _shapes(op) or _shapes(table.get(op.split()[-1].lstrip("%"), "")) if op else []
        if shape:
            dims.append(shape[0][1])
    return dims


def _matmul_flops(line: str, table: dict[str, str]) -> float:
    """2 x output elements x contraction size of one dot or convolution instruction."""
    m = _MATMUL.search(line)
    if not m:
        return 0.0
    out, kind = _shapes(m.group(1)), m.group(2)
    operands = _operand_dims(re.sub(r"\{[\d,]*\}", "", m.group(3)), table)
    if not out or len(operands) < 2:
        return 0.0
    if kind == "dot":
        dims = _CONTRACT.search(line)
        k = _prod(operands[0][int(i)] for i in dims.group(1).split(",") if i) if dims else 1
    else:  # TPU's matmuls as convolutions: the kernel's dims other than 'o' are contracted
        if _WINDOW.search(line):
            return 0.0  # strided / dilated / padded: TPU's lowering of small batched products
        labels = _DIM_LABELS.search(line)
        k = _prod(d for d, c in zip(operands[1], labels.group(1)) if c != "o") if labels else 1
    return 2.0 * _prod(out[0][1]) * k


def matmul_flops(hlo_text: str) -> float:
    """Matmul FLOPs per run of the module, each loop body counted once per trip.

    XLA's ``cost_analysis`` counts a while loop's body once, so a layer scan's FLOPs come out
    divided by the depth; this count multiplies by the trip counts as ``collectives`` does.
    A conditional (``lax.switch``, ``lax.cond``) runs one branch: its most expensive branch
    is counted, an upper bound (a capacity ladder's top rung).
    Counted: dots and plain convolutions (TPU's dense layers and their weight gradients); not
    counted: the strided, dilated or padded convolutions TPU makes of attention's small
    batched products (4 T^2 D per block, a few percent of a block's 24 T D^2).
    """
    comps, entry = _computations(hlo_text)
    edges = _call_edges(comps, {})
    table = dict(_PARAM.findall(hlo_text))  # instruction and parameter names are module-unique
    for line in hlo_text.splitlines():
        d = _DEF.match(line)
        if d:
            table[d.group(1)] = d.group(2)
    own = {name: sum(_matmul_flops(line, table) for line in lines)
           for name, lines in comps.items()}
    memo: dict[str, float] = {}

    def per_run(c: str) -> float:
        if c not in memo:
            total, branches = own.get(c, 0.0), collections.defaultdict(list)
            for child, factor, conditional in edges.get(c, ()):
                if conditional is None:
                    total += factor * per_run(child)
                else:
                    branches[conditional].append(per_run(child))
            memo[c] = total + sum(max(b) for b in branches.values())
        return memo[c]
    return float(per_run(entry))


def summarize(cols: list[Collective]) -> dict[str, dict[str, float]]:
    """kind -> {'count': executions per step, 'bytes': per-chip traffic per step}."""
    out = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
    for c in cols:
        out[c.kind]["count"] += c.count
        out[c.kind]["bytes"] += c.count * c.traffic_bytes
    return out
