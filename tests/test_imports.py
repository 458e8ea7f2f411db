"""The library stays a library: every resrl module imports without Prefect and MLflow, and
the CLI is the only resrl module that reaches for the orchestration layer (flows/, tasks/)."""
import re
import subprocess
import sys

from conftest import ROOT

MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in (ROOT / "resrl").rglob("*.py"))


def test_every_resrl_module_imports_without_prefect_or_mlflow():
    code = ("import importlib, sys\n"
            "for name in ('prefect', 'mlflow', 'flows', 'tasks'):\n"
            "    sys.modules[name] = None  # any import of them raises ImportError\n"
            f"for module in {MODULES!r}:\n"
            "    importlib.import_module(module)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
    assert {"resrl", "resrl.cli", "resrl.trainer", "resrl.checkpoint"} <= set(MODULES)


def test_only_the_cli_imports_the_orchestration_layer():
    pattern = re.compile(r"^\s*(from|import)\s+(prefect|mlflow|flows|tasks)\b", re.MULTILINE)
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "resrl").rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["resrl/cli.py"]


def _resrl_imports() -> dict[str, set[str]]:
    """module -> the resrl modules it imports anywhere (top level or inside a function)."""
    import ast

    paths = {name: ROOT / (name.replace(".", "/") + ".py") for name in MODULES}
    paths.update({name: ROOT / name.replace(".", "/") / "__init__.py" for name in MODULES
                  if not paths[name].is_file()})
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if full in paths else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None (depth-first search, colours white/grey/black)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        colour[node] = "black"
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_resrl_modules():
    """Counting imports inside functions too: a lazy import hides a cycle from Python, not from a reader."""
    graph = _resrl_imports()
    assert graph["resrl.session"] >= {"resrl.ranks", "resrl.data_parallel"}  # the parser sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # the lower layers know nothing of the ones that use them
    assert not graph["resrl.ranks"] & {"resrl.session", "resrl.trainer", "resrl.data_parallel", "resrl.config"}
    assert not graph["resrl.trainer"] & {"resrl.session", "resrl.data_parallel", "resrl.ranks"}
    assert "resrl.algorithms.advantages" not in graph["resrl.trainer"]  # token weights come from the registry
