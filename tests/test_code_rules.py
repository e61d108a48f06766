"""Code-size and structure rules over the whole package, so they stay true.

- no module over 600 lines;
- no function with more than 8 parameters (``self``/``cls`` not counted; dataclass
  constructors are generated, so options objects are the way to pass many settings; click
  commands and Triton kernels have the signatures their frameworks dictate);
- no import cycle among the package's modules through module-level imports (imports inside
  functions are the lazy imports of heavy or optional stacks and do not count).

Known exceptions are listed with the work that removes them; the tests also fail when an
exception is no longer needed, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folders of the package (pyproject maps plugins/, export/, train/ into it).
FOLDERS = {"maskattn_deploy": "maskattn_deploy", "plugins": "maskattn_deploy.plugins"}
MAX_LINES = 600
MAX_PARAMS = 8

# module -> why it is still longer; remove the entry when the module is split.
LONG_MODULES: dict[str, str] = {}
# module:function -> why it still takes more parameters.
LONG_SIGNATURES: dict[str, str] = {}
# Signatures fixed by a framework: click passes one keyword per flag to a command, a Triton
# kernel's parameters are its launch arguments.
FRAMEWORK_DECORATORS = ("click.command", "click.group", "triton.jit")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _framework_signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d).startswith(FRAMEWORK_DECORATORS) for d in node.decorator_list)


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not _framework_signature(node):
                yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def _param_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


def test_modules_are_short() -> None:
    long = {}
    for path in _modules().values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            long[_rel(path)] = lines
    unexpected = {m: n for m, n in long.items() if m not in LONG_MODULES}
    assert not unexpected, f"modules over {MAX_LINES} lines: {unexpected}"
    stale = set(LONG_MODULES) - set(long)
    assert not stale, f"no longer over the limit, drop them from LONG_MODULES: {stale}"


def test_functions_take_few_parameters() -> None:
    wide = {}
    for path in _modules().values():
        for name, node in _functions(ast.parse(path.read_text())):
            count = _param_count(node)
            if count > MAX_PARAMS:
                wide[f"{_rel(path)}:{name}"] = count
    unexpected = {f: n for f, n in wide.items() if f not in LONG_SIGNATURES}
    assert not unexpected, f"functions with more than {MAX_PARAMS} parameters: {unexpected}"
    stale = set(LONG_SIGNATURES) - set(wide)
    assert not stale, f"no longer too wide, drop them from LONG_SIGNATURES: {stale}"


def _module_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules imported by ``name`` at module level (not in functions or
    ``if TYPE_CHECKING:``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _module_level_imports(path, name, known) for name, path in modules.items()}
    # A package's __init__ importing its own sub-modules is how packages export names;
    # a cycle through an __init__ and its children is not a design cycle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
