"""MONAI loads without MLflow in fedward's processes (a second of CPU each), and MLflow still works."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_fedward_loads_monai_without_mlflow_and_mlflow_imports_afterwards():
    probe = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('mlflow') is not None, 'the test extra installs MLflow'\n"
        "import client.train\n"  # the training recipe: MONAI's transforms and networks
        "print('monai' in sys.modules, 'mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print(callable(mlflow.start_run), 'mlflow' in sys.modules)\n"
    )

    assert _fresh(probe).splitlines() == ["True False", "True True"]


def test_without_fedward_first_monai_loads_mlflow():
    """What the finder saves: MONAI imported on its own loads MLflow (were this not so, the finder
    would be needless and the test above could not fail)."""
    assert _fresh("import sys, monai\nprint('mlflow' in sys.modules)") == "True"
