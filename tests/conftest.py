"""Shared fixtures: the project root, the real MedMNIST folder, and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    """The real MedMNIST files: FEDWARD_DATA, else ../shared/data. Missing data fails, never skips."""
    folder = Path(os.environ.get("FEDWARD_DATA") or ROOT.parent / "shared" / "data")
    if not (folder / "pneumoniamnist.npz").is_file():
        pytest.fail(
            f"MedMNIST data not found in {folder}: set FEDWARD_DATA to the folder holding "
            f"pneumoniamnist.npz and breastmnist.npz (../shared/data in this workplace)."
        )
    return folder


def run_fedward(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI exactly as a user would, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
