"""Structure facts of the package, checked on the source text (no imports, no compiling).

Why: layering, size and duplication rules only hold if a test fails the day they break.
The layers are those of docs/ARCHITECTURE.md: a module may import its own layer or lower.
"""
import ast
import collections
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "emigm_jax")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
REPEAT_RUN = 6
# Ported tokenizer networks follow their PyTorch originals block for block.
PORTED = ("emigm_jax/tokenizers/vae.py", "emigm_jax/tokenizers/vq.py",
          "emigm_jax/tokenizers/dcae.py")

# Longest matching prefix wins; 0 = foundation ... 4 = entry points (docs/ARCHITECTURE.md).
LAYERS = {
    "emigm_jax": 0,
    "emigm_jax.config_files": 0, "emigm_jax.schedules": 0, "emigm_jax.masking": 0,
    "emigm_jax.sharding": 0, "emigm_jax.diffusion": 0, "emigm_jax.buckets": 0,
    "emigm_jax.host_memory": 0,
    "emigm_jax.config_validation": 1, "emigm_jax.checkpoint": 1, "emigm_jax.workdir": 1,
    "emigm_jax.models": 1, "emigm_jax.tokenizers": 1, "emigm_jax.losses": 1,
    "emigm_jax.data": 1, "emigm_jax.evaluation.inception": 1, "emigm_jax.evaluation.metrics": 1,
    "emigm_jax.evaluation.reference": 1,
    "emigm_jax.convert": 2, "emigm_jax.sampling": 2, "emigm_jax.optim": 2,
    "emigm_jax.step_dispatch": 2,
    "emigm_jax.evaluation": 3, "emigm_jax.train": 3, "emigm_jax.data.cache_latents": 3,
    "emigm_jax.data.latent_dataset": 3, "emigm_jax.data.step_encoder": 3,
    "emigm_jax.plan": 3,
    "emigm_jax.main": 4, "emigm_jax.convert.__main__": 4,
}


def package_files() -> dict[str, str]:
    """Dotted module name -> path for every .py file under emigm_jax/."""
    out = {}
    for dirpath, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def imported_modules(tree: ast.AST, modules: dict[str, str]) -> set[str]:
    """Package modules a file imports (anywhere in it); ``from pkg import sub`` -> pkg.sub."""
    def nearest(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {nearest(a.name) for a in node.names if a.name.startswith("emigm_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("emigm_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else nearest(node.module))
    return found - {""}


def import_graph() -> dict[str, set[str]]:
    modules = package_files()
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = imported_modules(ast.parse(f.read()), modules) - {name}
    return graph


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)]


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path (empty if none), by depth-first search."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_cycle_finder_and_layer_lookup_work_on_known_inputs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    assert layer("emigm_jax.evaluation.metrics") == 1 and layer("emigm_jax.evaluation.sweep") == 3
    assert layer("emigm_jax.convert.__main__") == 4 and layer("emigm_jax.convert.vae") == 2
    tree = ast.parse("from emigm_jax.sampling import draws\nimport emigm_jax.models.mae as m\n")
    mods = {"emigm_jax.sampling": "", "emigm_jax.sampling.draws": "", "emigm_jax.models": "",
            "emigm_jax.models.mae": ""}
    assert imported_modules(tree, mods) == {"emigm_jax.sampling.draws", "emigm_jax.models.mae"}


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_downward_only():
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "emigm_jax" and not any(
        m == p or m.startswith(p + ".") for p in LAYERS if p != "emigm_jax"))
    assert not unplaced, f"modules without a layer (add them to LAYERS): {unplaced}"
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in graph.items() for d in deps if layer(d) > layer(m))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_configs_import_nothing_from_the_package():
    bad = []
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "configs", name), encoding="utf-8") as f:
                if re.search(r"^\s*(from|import) emigm_jax", f.read(), re.M):
                    bad.append(name)
    assert not bad, f"configs importing emigm_jax: {bad}"


def test_module_and_function_sizes():
    too_long = []
    for name, path in package_files().items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name}: {n} lines")
    assert not too_long, "\n".join(sorted(too_long))


def code_lines(text: str) -> list[tuple[str, int]]:
    """(whitespace-normalised line, line number), skipping blank, comment and import lines."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        s = " ".join(line.split())
        if s and not s.startswith(("#", "import ", "from ")):
            out.append((s, number))
    return out


def repeated_runs(files: dict[str, str], run: int = REPEAT_RUN) -> list[list[tuple[str, int]]]:
    """Places where the same ``run`` consecutive code lines occur more than once."""
    where = collections.defaultdict(list)
    for name, text in files.items():
        lines = code_lines(text)
        for i in range(len(lines) - run + 1):
            where[tuple(s for s, _ in lines[i:i + run])].append((name, lines[i][1]))
    return sorted(locs for locs in where.values() if len(locs) > 1)


def test_repeat_checker_finds_a_known_repeat():
    body = "a = 1\nb = 2\n# note\nc = 3\n\nd = 4\ne = 5\nf = 6\n"
    files = {"x.py": "import os\n" + body, "y.py": "z = 0\n" + body.replace("# note\n", "")}
    assert repeated_runs(files) == [[("x.py", 2), ("y.py", 2)]]
    assert repeated_runs({"x.py": body, "y.py": body.replace("f = 6", "f = 7")}) == []


def test_no_repeated_runs_of_lines_in_the_package():
    files = {}
    for name, path in package_files().items():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if rel not in PORTED:
            with open(path, encoding="utf-8") as f:
                files[rel] = f.read()
    runs = repeated_runs(files)
    assert not runs, f"{len(runs)} runs of {REPEAT_RUN}+ repeated lines, e.g. {runs[:5]}"


def expand_braces(item: str) -> list[str]:
    """``emigm_{xs,s}_256.py`` -> [emigm_xs_256.py, emigm_s_256.py] (one level, repeated)."""
    m = re.search(r"\{([^{}]*)\}", item)
    if not m:
        return [item]
    return [x for alt in m.group(1).split(",")
            for x in expand_braces(item[:m.start()] + alt + item[m.end():])]


def readme_layout_paths() -> list[str]:
    """Paths named in the README's layout table: first-column entries (bare names are in the
    directory of the row's first entry) and file names in the second column."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = []
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or "`" not in cells[1]:
            continue
        entries = re.findall(r"`([^`]+)`", cells[1])
        base = entries[0] if entries[0].endswith("/") else os.path.dirname(entries[0])
        names = entries + [e for e in re.findall(r"`([^`]+)`", cells[2])
                           if re.search(r"\.(py|sh|md)$", e)]
        for e in names:
            for p in expand_braces(e):
                paths.append(p if e == entries[0] or "/" in p else os.path.join(base, p))
    return paths


def architecture_paths() -> list[str]:
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
        text = f.read()
    return [p for p in re.findall(r"`([\w./-]+)`", text)
            if p.startswith(("emigm_jax/", "configs/", "tests/", "docs/", "benchmarks/"))]


@pytest.mark.parametrize("source", [readme_layout_paths, architecture_paths])
def test_documented_paths_exist(source):
    paths = source()
    assert len(paths) >= 10, f"{source.__name__} found only {paths}"
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"{source.__name__}: paths that do not exist: {missing}"
