"""`flwr run .` runs the same ServerApp and ClientApp through Flower's own CLI and local SuperLink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _stop_local_superlink(flwr_home: Path) -> None:
    """Stop the SuperLink that `flwr run` started for this FLWR_HOME (it outlives the CLI)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"FLWR_HOME={flwr_home}".encode() in environ and b"flower-superlink" in cmdline:
            os.kill(int(proc.name), signal.SIGTERM)


@pytest.mark.slow
def test_flwr_run_dot_runs_the_apps_in_simulation(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 2\n"
    )
    out = tmp_path / "run"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    try:
        proc = subprocess.run(
            [
                "flwr",
                "run",
                ".",
                "local",
                "--stream",
                "-c",
                f"num-rounds=2 num-sites=2 out-dir='{out}'",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _stop_local_superlink(home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert set(results["final"]["sites"]) == {"hospital-a", "hospital-b"}
