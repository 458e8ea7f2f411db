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
