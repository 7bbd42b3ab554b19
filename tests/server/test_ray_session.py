"""A simulation sizes its sites by the cores its process may use (its CPU affinity, as a container's
cpuset or `taskset` gives it), not by every core of the machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_sites_get_the_cores_the_process_is_given_not_the_machines():
    probe = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"  # one core, as taskset -c would
        "from common.config import load_study\n"
        "from server.ray_session import backend_config\n"
        "config = backend_config(load_study('configs/demo.yaml'))\n"
        "print(config['client_resources']['num_cpus'], config['init_args']['num_cpus'])\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
