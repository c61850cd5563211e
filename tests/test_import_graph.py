"""Stages sit side by side on shared plumbing: fine-tuning must not pull in selection."""

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SELECTION_MODULES = {"sealft.select", "sealft.seal", "sealft.bilevel", "sealft.baselines"}


def _loaded_by(module: str) -> set[str]:
    # A fresh interpreter: in this one the other tests have imported everything already.
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('sealft')))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    return set(done.stdout.split())


def test_finetune_does_not_import_selection():
    loaded = _loaded_by("sealft.finetune")
    assert "sealft.runtime" in loaded  # the check itself sees the shared plumbing
    assert not loaded & SELECTION_MODULES, sorted(loaded & SELECTION_MODULES)


def _imports_in(module_file: Path) -> set[str]:
    """Every sealft module a source file imports, at its top or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(module_file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            # `from sealft import select` imports a module through its package.
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("sealft")}


# stage module -> stage modules it must not import (no stage sits on top of another). The
# selection run's contract (selection_run: options and output files) is shared plumbing.
FORBIDDEN = {
    "score": {"sealft.select", "sealft.baselines"},
    "finetune": SELECTION_MODULES | {"sealft.score"},
    "select": {"sealft.score", "sealft.finetune"},
}


def test_no_stage_imports_another():
    bad = {stage: sorted(_imports_in(SRC / "sealft" / f"{stage}.py") & forbidden)
           for stage, forbidden in FORBIDDEN.items()}
    assert not any(bad.values()), bad


def test_the_rule_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "stage.py"
    source.write_text("def run():\n    from sealft.select import write_outputs\n")
    assert "sealft.select" in _imports_in(source)


def test_score_help_does_not_load_torch():
    code = "import sys, sealft.score; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    assert done.stdout.strip() == "False"
