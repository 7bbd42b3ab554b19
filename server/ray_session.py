"""The Ray session fedward's simulations run in: the resources each site gets, and one session for
all the federations of a `fedward study` (or the one of a `fedward simulate`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from common.schema import StudyConfig


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, `taskset`), which
    children and Ray's workers inherit, not every core of the machine (os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def backend_config(study: StudyConfig) -> dict:
    cores = usable_cores()
    n_gpus = torch.cuda.device_count()
    cpus = min(study.simulation.client_cpus or cores, cores)
    gpus = study.simulation.client_gpus
    if gpus < 0:
        gpus = 1.0 if n_gpus else 0.0
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": gpus},
        "init_args": {
            "num_cpus": cores,
            "num_gpus": n_gpus,
            "logging_level": "ERROR",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }


@contextlib.contextmanager
def one_ray_session(study: StudyConfig) -> Iterator[None]:
    """Run all of the study's federations in one Ray session.

    Flower starts Ray for every simulation and shuts it down at the end (8-10 s each on 2 cores); a
    study runs up to 2 + (number of sites) federations. So Ray is started once here, with the
    settings `server.simulate.backend_config` gives Flower; Flower's Ray backend then finds it up and
    skips `ray.init`, and its `ray.shutdown()` after each simulation is deferred to the study's end.
    Each simulation still starts and ends its own site processes (Ray actors); no idle workers are
    started beside them.
    """
    import ray

    config = backend_config(study)
    threads = str(config["client_resources"]["num_cpus"])
    os.environ["FEDWARD_SITE_THREADS"] = threads
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray.is_initialized():  # someone else's session: leave it as it is
        yield
        return
    # Ray prestarts a worker per core for the first driver; they lack the runtime_env below, so no
    # site's actor can use them: each only imports Ray's worker and idles (about 0.5 CPU-s apiece)
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "FEDWARD_SITE_THREADS": threads}},
        **config["init_args"],
    )
    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()
