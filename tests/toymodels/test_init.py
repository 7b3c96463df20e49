"""toymodels/__init__.py: the public face resolves every name to the module that owns it, and the package's
modules import one another without a cycle (every import counts, the ones inside functions too)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import toymodels

PACKAGE = Path(toymodels.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _targets(tree: ast.AST) -> set[str]:
    """The toymodels modules an AST imports (``from toymodels import x``: the submodule x if there is one, else
    the package face ``toymodels``), imports under ``if TYPE_CHECKING:`` excluded."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("toymodels.")}
            out |= {"__init__" for a in node.names if a.name == "toymodels"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "toymodels":
                out |= {a.name if a.name in MODULES else "__init__" for a in node.names}
            elif node.module.startswith("toymodels."):
                out.add(node.module.split(".")[1])
    return out


def import_graph() -> dict[str, set[str]]:
    return {name: _targets(ast.parse((PACKAGE / f"{name}.py").read_text())) for name in [*MODULES, "__init__"]}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_toymodels():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle in toymodels: {' -> '.join(find_cycle(graph))}"


def test_no_module_imports_the_package_face():
    graph = import_graph()
    bad = {m: sorted(t & {"__init__"}) for m, t in graph.items() if m != "__init__"}
    assert not {m: t for m, t in bad.items() if t}, bad


def test_train_py_is_gone():
    """train.py was split into config / seeds / setup / losses / callback_base / loop (issue 15); no alias remains."""
    assert "train" not in import_graph()


def test_the_cycle_check_can_fail():
    assert find_cycle({"train": {"sweep"}, "sweep": {"batched"}, "batched": {"train"}}) == [
        "batched", "train", "sweep", "batched"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    lazy = ast.parse("def f():\n    from toymodels import sweep\n    from toymodels.loop import finetune\n")
    assert _targets(lazy) == {"sweep", "loop"}


@pytest.mark.parametrize("name", toymodels.__all__)
def test_public_names_come_from_their_home(name):
    value = getattr(toymodels, name)
    assert value.__module__ == toymodels._HOMES[name], (name, value.__module__)
    assert name in dir(toymodels)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        toymodels.no_such_name  # noqa: B018


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported with no toymodels module loaded before it (in one fresh interpreter): what a cycle that
    only import order hides would fail."""
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'toymodels' or m.startswith('toymodels.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module('toymodels.' + name)\nprint('OK')\n")
    out = subprocess.run([sys.executable, "-c", code, *MODULES], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_the_layout_docstring_lists_every_module():
    missing = [m for m in MODULES if f"{m}.py" not in toymodels.__doc__]
    assert not missing, f"toymodels/__init__.py's layout does not mention {missing}"
