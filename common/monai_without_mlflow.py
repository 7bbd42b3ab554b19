"""MONAI imported without MLflow.

Importing any part of MONAI imports all of it (its package walks every subpackage), its MLflow
handler among them, and that imports MLflow whenever MLflow is installed (fedward's `mlflow` extra,
which the test extra includes): about a second of CPU in every process that trains, evaluates or reads
images, for a handler fedward never uses (its experiment tracking is server/tracking.py's own).

`install()`, run when fedward's `common` and `client` packages are imported (so before any of their
modules imports MONAI), puts an import finder first on `sys.meta_path` that answers "not installed"
to MLflow's modules while MONAI's package itself is being imported, and to nothing else: MONAI then
notes MLflow as a missing optional package, as it does without the extra, and every later `import
mlflow` (server.tracking, a user's own code) gets the real one. The one visible difference: MONAI's own
`MLFlowHandler`, in a process that imported fedward before MONAI, says MLflow is missing. The import
system's flag belongs to the process, not to a thread: another thread importing MLflow for the first
time while MONAI is being imported would be told it is missing as well (fedward's commands import it
in their own thread, `Tracker.check`, before anything loads MONAI).
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec


class _HideMlflowWhileMonaiImports:
    """A meta path finder: MLflow's modules are not found while MONAI's package is initializing."""

    @staticmethod
    def find_spec(name: str, path=None, target=None) -> ModuleSpec | None:
        if name.partition(".")[0] == "mlflow" and _monai_initializing():
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while MONAI is imported)", name=name)
        return None  # every other import, and MLflow at any other time, is found as usual


def _monai_initializing() -> bool:
    """Whether MONAI's package is being imported now: the import system marks a module's spec
    `_initializing` while it runs the module's code (CPython's importlib, 3.4 on)."""
    spec = getattr(sys.modules.get("monai"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process; nothing when MONAI is already in."""
    if "monai" not in sys.modules and _HideMlflowWhileMonaiImports not in sys.meta_path:
        sys.meta_path.insert(0, _HideMlflowWhileMonaiImports)
