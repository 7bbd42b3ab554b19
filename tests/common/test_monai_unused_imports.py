"""MONAI loads without the optional packages fedward never uses through it (MLflow, matplotlib's
pyplot, SciPy's signal, scikit-learn), and each still works when imported afterwards."""

from __future__ import annotations

from common.monai_unused_imports import UNUSED
from tests.conftest import python_in_a_fresh_process


def test_fedward_loads_monai_without_them_and_each_imports_afterwards():
    probe = (
        "import importlib, importlib.util, sys\n"
        f"unused = {list(UNUSED)!r}\n"
        "assert all(importlib.util.find_spec(m) is not None for m in unused), 'the test extra installs them'\n"
        "import client.train\n"  # the training recipe: MONAI's transforms and networks
        "print('monai' in sys.modules, [m for m in unused if m in sys.modules])\n"
        "import mlflow, matplotlib.pyplot, scipy.signal, sklearn.metrics\n"
        "print(callable(mlflow.start_run), callable(matplotlib.pyplot.figure), callable(scipy.signal.hilbert),"
        " callable(sklearn.metrics.roc_curve))\n"
    )

    assert python_in_a_fresh_process(probe).splitlines() == ["True []", "True True True True"]


def test_without_fedward_first_monai_loads_them():
    """What the finder saves: MONAI imported on its own loads them all (were this not so, the
    finder would be needless for that one and the test above could not fail)."""
    probe = f"import sys, monai\nprint([m for m in {list(UNUSED)!r} if m not in sys.modules])"
    assert python_in_a_fresh_process(probe) == "[]"
