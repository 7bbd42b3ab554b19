"""MONAI imported without the optional packages it would load for features fedward never uses.

Importing any part of MONAI imports all of it (its package walks every subpackage), and some of its
modules import optional packages at once whenever they are installed (`UNUSED`):

- MLflow (fedward's `mlflow` extra, which the test extra includes), for MONAI's MLflow handler
  (fedward's own tracking is server/tracking.py);
- matplotlib's `pyplot`, for MONAI's Jupyter plots and image-display helpers (fedward draws its own
  plots with matplotlib's `Figure`, and `fedward predict` imports pyplot itself);
- SciPy's `signal`, for MONAI's ultrasound confidence map and notch-filter transforms;
- scikit-learn, for MONAI's embedding-collapse metric (fedward's statistics import what they use of
  it themselves, where they need it).

Measured on 2 cores, in fresh processes (2026-12-07, medians of 3): `import monai` alone takes 4.4
CPU-seconds; after fedward's packages 2.5 (3.4 with MLflow alone hidden). Opacus imports SciPy's
`signal` too, where a process loads it (a private round, privacy accounting, a network with layers
Opacus's validator checks: common.opacus_compat).

That is paid in every process that trains, evaluates or reads images. `install()`, run when
fedward's `common` and `client` packages are imported (so before any of their modules imports
MONAI), puts an import finder first on `sys.meta_path` that answers "not installed" to these modules
(`UNUSED`) while MONAI's package itself is being imported, and to nothing else: MONAI then notes
each as a missing optional package, as it does where it is not installed, and every later import
(server.tracking, `fedward predict`'s heat maps, a user's own code) gets the real one. The visible
difference: in a process that imported fedward before MONAI, MONAI's own `MLFlowHandler`, its
Jupyter and display helpers (`monai.visualize.matshow3d`, `blend_images`), those transforms and that
metric say their package is missing. The import system's flag belongs to the process, not to a
thread: another thread importing one of these for the first time while MONAI is being imported would
be told it is missing as well (fedward's commands import MLflow in their own thread,
`Tracker.check`, before anything loads MONAI).
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec

UNUSED = ("mlflow", "matplotlib.pyplot", "scipy.signal", "sklearn")  # each with its submodules


class _HideWhileMonaiImports:
    """A meta path finder: the modules in UNUSED are not found while MONAI's package is initializing."""

    @staticmethod
    def find_spec(name: str, path=None, target=None) -> ModuleSpec | None:
        if _unused(name) and _monai_initializing():
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while MONAI is imported)", name=name)
        return None  # every other import, and these at any other time, is found as usual


def _unused(name: str) -> bool:
    return any(name == hidden or name.startswith(hidden + ".") for hidden in UNUSED)


def _monai_initializing() -> bool:
    """Whether MONAI's package is being imported now: the import system marks a module's spec
    `_initializing` while it runs the module's code (CPython's importlib, 3.4 on)."""
    spec = getattr(sys.modules.get("monai"), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process; nothing when MONAI is already in."""
    if "monai" not in sys.modules and _HideWhileMonaiImports not in sys.meta_path:
        sys.meta_path.insert(0, _HideWhileMonaiImports)
