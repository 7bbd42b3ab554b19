"""The Flower run config (`[tool.flwr.app.config]` in pyproject.toml) turned into a study config.

Used by the ServerApp (`flwr run .`) and, in simulation through `flwr run .`, by the ClientApp to
find its simulated site; in a deployment a site never reads the study from the run config.
"""

from __future__ import annotations

from pathlib import Path

from common.config import PROJECT_ROOT, load_study
from common.schema import StudyConfig


def resolve_path(value: str) -> Path:
    """A path from the run config: absolute, else relative to the current folder, else the project."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def study_from_run_config(run_config: dict) -> StudyConfig:
    data_dir = str(run_config.get("data-dir", "") or "")
    return load_study(
        resolve_path(str(run_config.get("study-config", "configs/demo.yaml"))),
        rounds=int(run_config.get("num-rounds", 0) or 0) or None,
        num_sites=int(run_config.get("num-sites", 0) or 0) or None,
        data_dir=str(resolve_path(data_dir)) if data_dir else None,
    )
