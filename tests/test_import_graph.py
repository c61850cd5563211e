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
