"""The package's import graph, read from the source with ``ast``: no circle, nothing reaching back up to
``parc_surgery/__init__``, no private name imported across files; and ``import parc_surgery`` stays lean.

Every ``import`` / ``from ... import`` inside ``parc_surgery/`` counts, at module level or inside a function
(a function-level import that closes a circle is still a circle); imports under ``if TYPE_CHECKING:`` do not
run and are left out.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import parc_surgery

ROOT = Path(parc_surgery.__file__).resolve().parent
PKG = "parc_surgery"

# Circles being removed (none now). An entry that no longer forms a circle fails the test below, so the list
# cannot go stale.
KNOWN_CIRCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PKG, *path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports there never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a package module in ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == PKG]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] != PKG:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                # ``from . import checkpoint`` imports the submodule, not a name of the package __init__
                out.append((sub, "", node.lineno) if sub in MODULES else (module, alias.name, node.lineno))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _edges() -> dict[str, set[str]]:
    return {m: {dep for dep, _, _ in deps if dep in MODULES and dep != m} for m, deps in GRAPH.items()}


def _circles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_graph_sees_the_package():
    # the walk itself: every module parsed, and known edges found (a broken resolver would pass vacuously)
    assert {"parc_surgery", "parc_surgery.api", "parc_surgery.blocks", "parc_surgery.ops.parc"} <= set(MODULES)
    edges = _edges()
    assert "parc_surgery.api" in edges["parc_surgery"]
    assert "parc_surgery.helpers" in edges["parc_surgery.flops"]
    assert "parc_surgery.carry" in edges["parc_surgery.blocks"]


def test_circle_finder_finds_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(edges) == [frozenset({"a", "b", "c"})]


def test_no_import_circle():
    circles = _circles(_edges())
    unexpected = [sorted(c) for c in circles if c not in KNOWN_CIRCLES]
    assert not unexpected, f"import circles: {unexpected}"
    stale = [sorted(c) for c in KNOWN_CIRCLES if c not in circles]
    assert not stale, f"KNOWN_CIRCLES lists circles that are gone (delete them): {stale}"


def test_nothing_imports_back_up_to_the_package_init():
    up = [
        f"{m}:{line} imports {what!r} from parc_surgery/__init__"
        for m, deps in GRAPH.items()
        if m != PKG
        for dep, what, line in deps
        if dep == PKG
    ]
    assert not up, up


def test_no_private_name_imported_across_files():
    # a name starting with "_" belongs to its file; shared helpers are public (parc_surgery.helpers & co.)
    allowed: set[tuple[str, str, str]] = set()  # none now; an allowance must name a file that still needs it
    private = {
        (m, dep, what)
        for m, deps in GRAPH.items()
        for dep, what, _ in deps
        if what.startswith("_") and not what.startswith("__")
    }
    assert not private - allowed, sorted(private - allowed)
    # an allowance whose import is gone must go too
    assert not allowed - private, f"stale allowances (delete them): {sorted(allowed - private)}"


LEAN = """
import json, sys, socket
def no_network(*a, **k):
    raise AssertionError("import parc_surgery opened a network connection")
socket.socket.connect = no_network
socket.create_connection = no_network
import torch.nn as nn
built = []
orig_init = nn.Module.__init__
def spy(self, *a, **k):
    if type(self) is not nn.Module:  # probe.py reads the attribute names of one bare nn.Module()
        built.append(type(self).__module__ + "." + type(self).__name__)
    orig_init(self, *a, **k)
nn.Module.__init__ = spy
import parc_surgery
heavy = ["transformers", "onnx", "onnxruntime", "onnxscript", "openvino", "executorch", "sklearn"]
print(json.dumps({"built": built, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def test_import_is_lean():
    # a fresh interpreter: importing the package builds no model, loads no optional runtime, opens no socket
    # (torchvision and PIL are not on the list: timm, a required dependency, imports them)
    out = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"built": [], "heavy": []}, got


def test_ships_py_typed():
    assert (ROOT / "py.typed").is_file()
    text = (ROOT.parent / "pyproject.toml").read_text()
    assert '"parc_surgery" = ["py.typed"]' in text
