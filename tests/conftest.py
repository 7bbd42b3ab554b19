"""Shared fixtures: the project root, the real MedMNIST folder, and a way to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


ALL_CORES: set[int] = set()  # an xdist worker's cores before it was pinned to its share


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers) each worker runs on its own share of the
    cores, and so does every process its tests start (they inherit it): torch, Ray and the simulated
    sites size themselves by it (server.ray_session.usable_cores), so two workers' trainings never
    fight over the same cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    ALL_CORES.update(cores)
    share = cores[int(worker[2:]) % count :: count]
    if share:  # fewer cores than workers: they share them all
        os.sched_setaffinity(0, share)


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end (slow) tests first, each file's tests kept together and in order: two
    workers then start the long files early and end on short ones instead of one waiting for the
    other's last long file. (`make test` passes `--no-loadscope-reorder`: pytest-xdist would otherwise
    hand out the files with the most tests first, and a file of one long test, such as the site
    isolation run, came last.)"""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort


@pytest.fixture(scope="module")
def every_core():
    """For a module whose tests start many single-threaded processes at once (a deployment's
    SuperLink, SuperNodes, site services and per-message ClientApps): its worker may use every core
    while it runs (its sites train with one thread each), then goes back to its share."""
    share = os.sched_getaffinity(0) if ALL_CORES else None
    if share is not None:
        os.sched_setaffinity(0, ALL_CORES)
    yield
    if share is not None:
        os.sched_setaffinity(0, share)


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


def python_in_a_fresh_process(code: str, *args: str, timeout: float = 300) -> str:
    """Run `code` with `python -c` from the project root, as a new process starts (nothing imported
    yet); its stdout. A failure fails the test with the process's stderr."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


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
