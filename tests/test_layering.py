"""The import structure: data flows one way, from the low layers to the CLI, and no module imports in a cycle.

Every module of `dovetail_jax/` and `simulator/` is parsed (never imported), and every import is counted,
the lazy ones inside functions and `importlib.import_module("...")` calls included. A second test keeps the
functions of the decoding loop, the benches and the CLI short enough to read.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dovetail_jax", "simulator")

# Units of dovetail_jax (its first-level modules and subpackages), low to high. A unit may import its own modules
# and any unit of a lower layer; units of one layer may import each other unless SEPARATE says otherwise.
LAYERS: tuple[frozenset[str], ...] = (
    # no JAX: the simulator shares these
    frozenset({"config", "errors", "paths", "plan", "stats", "argtypes", "progress"}),
    frozenset({"devices", "kernels", "machine"}),  # machine: what this host is and can do (measured)
    frozenset({"model"}),
    # io reads files into the model's parameter description (names and shapes checked against model/, draft
    # pytrees built from checkpoint tensors), so it sits above model/, which reads no files
    frozenset({"io", "speculation"}),
    frozenset({"decode"}),
    frozenset({"api"}),
    frozenset({"train", "bench"}),
    frozenset({"cli"}),
)
SEPARATE = {frozenset({"train", "bench"})}  # both sit beside the API; neither builds on the other
# What the simulator may use of dovetail_jax: the JAX-free low layer; its profiler also measures the runtime.
SIMULATOR_USES = LAYERS[0] - {"paths"}
SIMULATOR_PROFILE_USES = SIMULATOR_USES | {"devices", "machine", "model"}


def _layer(unit: str) -> int:
    for i, units in enumerate(LAYERS):
        if unit in units:
            return i
    raise AssertionError(f"dovetail_jax.{unit} is in no layer of tests/test_layering.py: add it to LAYERS")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _resolve(name: str, current: str, is_package: bool, level: int) -> str:
    if level:
        base = current.split(".")[: len(current.split(".")) - level + (1 if is_package else 0)]
        name = ".".join([*base, name] if name else base)
    return name


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in one file, the imported names resolved to modules where
    they are modules (`from dovetail_jax import api` is an import of `dovetail_jax.api`)."""
    current = _module_name(path)
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", current, is_package, node.level)
            subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            out += [(s, node.lineno) for s in subs] or [(base, node.lineno)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return out


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _unit(module: str) -> str | None:
    """The dovetail_jax unit of a module name (None for the package itself and for other packages)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "dovetail_jax" and len(parts) > 1 else None


def edge_violation(src: str, dst: str) -> str | None:
    """Why importing module `dst` from module `src` breaks the layering, or None."""
    top = dst.split(".")[0]
    if src.startswith("simulator"):
        if top == "jax" and src != "simulator.profile":
            return "the simulator runs without JAX (only simulator/profile.py measures with it)"
        if top != "dovetail_jax" or _unit(dst) is None:
            return None
        allowed = SIMULATOR_PROFILE_USES if src == "simulator.profile" else SIMULATOR_USES
        return None if _unit(dst) in allowed else f"the simulator may use only {', '.join(sorted(allowed))}"
    a, b = _unit(src), _unit(dst)
    if a is None:
        return None
    if top == "simulator":
        return None if a == "cli" else "only the CLI registers the simulator's commands"
    if top == "jax" and a in LAYERS[0]:
        return "the low layer is JAX-free: the simulator imports it"
    if b is None or a == b:
        return None
    if frozenset({a, b}) in SEPARATE:
        return f"{a} and {b} stand apart (move what both need to a lower layer)"
    if _layer(b) > _layer(a):
        return f"upward: {a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (the package `__init__` of a `from package import name` excluded
    when the name is a module)."""
    graph: dict[str, set[str]] = {}
    for f in _files():
        src = _module_name(f)
        graph[src] = {d for d, _ in imports_of(f) if d.split(".")[0] in PACKAGES and _is_module(d) and d != src}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a closed path of its nodes, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        a = _unit(src) or src.split(".")[0]
        units.setdefault(a, set()).update(_unit(d) or d.split(".")[0] for d in dsts)
    return {k: v - {k} for k, v in units.items()}


def test_no_upward_import():
    bad = [f"{f.relative_to(ROOT)}:{line}: imports {dst}: {why}"
           for f in _files() for dst, line in imports_of(f)
           if (why := edge_violation(_module_name(f), dst))]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules_or_units():
    graph = import_graph()
    for g, what in ((graph, "modules"), (_unit_graph(graph), "units")):
        cycle = find_cycle(g)
        assert cycle is None, f"import cycle between {what}: {' -> '.join(cycle)}"


def test_the_checks_can_fail():
    """The rules reject what they are meant to reject, and the cycle search finds a planted cycle."""
    assert edge_violation("dovetail_jax.bench.dovetail", "dovetail_jax.cli")
    assert edge_violation("dovetail_jax.train.pipeline", "dovetail_jax.bench.peers")
    assert edge_violation("dovetail_jax.config", "jax.numpy")
    assert edge_violation("simulator.profile", "dovetail_jax.bench.machine")
    assert edge_violation("simulator.engine", "jax")
    assert edge_violation("dovetail_jax.decode.dovetail", "simulator.engine")
    assert edge_violation("dovetail_jax.cli", "dovetail_jax.bench.dovetail") is None
    assert edge_violation("simulator.profile", "dovetail_jax.model.target") is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# --- function length -----------------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 60
SHORT = ("dovetail_jax/decode", "dovetail_jax/bench", "dovetail_jax/cli.py")


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (n lines)` of every function or method longer than `limit` lines (decorators and
    docstring included, nested functions counted inside their parent and on their own)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            n = node.end_lineno - first + 1
            if n > limit:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                out.append(f"{where}:{first} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("where", SHORT)
def test_functions_are_short(where):
    p = ROOT / where
    files = [p] if p.is_file() else sorted(p.rglob("*.py"))
    bad = [x for f in files for x in long_functions(f)]
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(bad)


def test_long_function_is_found(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    f = tmp_path / "probe.py"
    f.write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert [s.split(" ", 1)[1] for s in long_functions(f)] == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
