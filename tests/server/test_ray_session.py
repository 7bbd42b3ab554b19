"""A simulation sizes its sites by the cores its process may use (its CPU affinity, as a container's
cpuset or `taskset` gives it), not by every core of the machine; its Ray session starts no idle workers."""

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


def test_the_session_starts_no_idle_workers_beside_the_sites():
    """Ray would prestart a worker per core for the first driver, which no site's actor uses (they lack
    the session's runtime_env): each imports Ray's worker and idles. The session asks Ray not to.
    Watched on the real processes while a site's actor runs."""
    probe = (
        "import os, time, pathlib, ray\n"
        "from common.config import load_study\n"
        "from server.processes import process_tree\n"
        "from server.ray_session import one_ray_session\n"
        "with one_ray_session(load_study('configs/demo.yaml')):\n"
        "    @ray.remote(num_cpus=1)\n"
        "    class Site:\n"
        "        def pid(self):\n"
        "            return os.getpid()\n"
        "    site = Site.remote()\n"
        "    ray.get(site.pid.remote())\n"
        "    time.sleep(3)\n"  # prestarted workers start with the driver: up by now
        "    for pid in process_tree(os.getpid()):\n"  # this session's: Ray's raylet is our child
        "        try:\n"
        "            name = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\\0')[0].decode()\n"
        "        except OSError:\n"
        "            continue\n"  # gone since the tree was read
        "        if name.startswith('ray::'): print(name)\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=180
    )

    assert done.returncode == 0, done.stderr[-3000:]
    workers = [name for name in done.stdout.split() if "Agent" not in name]  # Ray's own agents aside
    assert workers == ["ray::Site"], done.stdout
