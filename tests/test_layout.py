"""The package's layout rules, checked on its source with ``ast``.

- Imports between the package's modules go one way: no cycle, counting imports made
  only for type checking (a type another module needs comes from a ``Protocol``).
- No module reads or calls another module's private names: not ``obj._name`` on anything
  but ``self``/``cls``, and no ``from .module import _name``. Each connection owns its
  state: only ``sender.py`` (writes and the close state) and ``connection.py`` (its
  thread, which extends the sender) touch a connection's lock, socket, frame queue or
  close state; no other class extends them.
- Every module opens with a docstring that says its job, and has ``__all__``.
- No module is longer than ``MAX_LINES``, so that each can be read in one sitting.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "wsroute_sync"
MODULES = sorted(p for p in PACKAGE.glob("*.py"))

#: Private names a module may use on objects that are not its own, each with why.
ALLOWED_PRIVATE: Set[Tuple[str, str]] = {
    # os._exit: the documented way for a forked worker to end without running the
    # parent's cleanup (atexit handlers, buffered files) a second time.
    ("workers.py", "_exit"),
    # namedtuple's documented method (the underscore only keeps it from field names).
    ("backplane.py", "_replace"),
    # socket.accept() is socket._accept() plus two enum conversions per call, which the
    # accept loop saves by calling the C method itself (stable since Python 3.3).
    ("accept.py", "_accept"),
}


#: The longest a module may be.
MAX_LINES = 500
#: Modules that may be longer, each with why.
LONG_MODULES: Set[str] = {
    # The synchronous client is the user's side of the wire, read on its own: it
    # extends simple-websocket's Client and documents each call in full.
    "client.py",
}


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _local_imports(path: pathlib.Path) -> Set[str]:
    """The package modules ``path`` imports, type-checking imports included."""
    found: Set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wsroute_sync."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return {name for name in found if (PACKAGE / f"{name}.py").exists()}


def test_no_import_cycles() -> None:
    graph: Dict[str, Set[str]] = {
        p.stem: _local_imports(p) - {p.stem} for p in MODULES if p.stem != "__init__"
    }
    for deps in graph.values():
        deps.discard("__init__")
    # Depth-first search for a back edge; report the cycle it closes.
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_reaching_into_other_modules_privates(path: pathlib.Path) -> None:
    tree = _tree(path)
    # Private names this module defines itself (methods, attributes it assigns): its own
    # classes may use each other's (pool.py's worker calls its pool back).
    own: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
    reaches = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if name in own or (path.name, name) in ALLOWED_PRIVATE:
                continue
            reaches.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    reaches.append(f"line {node.lineno}: imports {alias.name}")
    assert not reaches, f"{path.name} uses private names of other objects: {reaches}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_docstring_and_exports(path: pathlib.Path) -> None:
    tree = _tree(path)
    doc = ast.get_docstring(tree)
    assert doc, f"{path.name} has no docstring saying its job"
    if path.name != "__main__.py":
        assert any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            for node in tree.body
        ), f"{path.name} has no __all__"


def _lines(path: pathlib.Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("path", [p for p in MODULES if p.name not in LONG_MODULES],
                         ids=lambda p: p.name)
def test_modules_stay_short(path: pathlib.Path) -> None:
    assert _lines(path) <= MAX_LINES, f"{path.name} has {_lines(path)} lines (max {MAX_LINES})"


def test_long_modules_are_still_long() -> None:
    """A module leaves LONG_MODULES as soon as it is short again."""
    for name in sorted(LONG_MODULES):
        lines = _lines(PACKAGE / name)
        assert lines > MAX_LINES, f"{name} has {lines} lines: take it out of LONG_MODULES"


def test_only_connection_py_extends_a_connection() -> None:
    """Through ``self`` a subclass reaches all of a connection's state: the one subclass
    of the sender is ServerConnection, and nothing extends that."""
    extending = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).rpartition(".")[2] for base in node.bases}
                if bases & {"Sender", "ServerConnection"}:
                    extending.append((path.name, node.name))
    assert extending == [("connection.py", "ServerConnection")]


def _guide_map() -> List[str]:
    """The modules of the guide's "How it is built" table, top row first."""
    guide = (PACKAGE.parent / "docs" / "guide.md").read_text(encoding="utf-8")
    section = guide.split("\n## How it is built\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [row.split("`")[1].removesuffix(".py") for row in rows]


def test_the_guide_maps_every_module_in_import_order() -> None:
    """Each module imports only modules below it in the guide's table, so the table is
    the direction of the dependencies, and it names every module once."""
    order = _guide_map()
    modules = {p.stem for p in MODULES}
    assert len(order) == len(set(order)), "a module is listed twice"
    assert set(order) == modules, (
        f"docs/guide.md's map lacks {sorted(modules - set(order))}, "
        f"names {sorted(set(order) - modules)} that do not exist"
    )
    position = {name: i for i, name in enumerate(order)}
    upward = []
    for path in MODULES:
        for dep in _local_imports(path) - {path.stem}:
            if position[dep] <= position[path.stem]:
                upward.append(f"{path.name} imports {dep}.py, listed above it")
    assert not upward, upward
