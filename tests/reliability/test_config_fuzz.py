"""A small fuzz of the shipped study configs: random key removals and type changes must always end in
a clear ConfigError (or a valid study), never a traceback, before anything trains."""

from __future__ import annotations

import copy
import os
import random

import pytest
import yaml

from common.config import ConfigError, load_study
from server.simulate import preflight
from tests.conftest import ROOT

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "site" not in yaml.safe_load(p.read_text()))
WRONG_VALUES = ["abc", -1, 0, 1.5, True, None, [], {}, [1, "x"], {"a": 1}, "", 10**9, float("nan")]


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


def _mutate(doc: dict, rng: random.Random) -> tuple[dict, str]:
    doc = copy.deepcopy(doc)
    path = rng.choice(list(_paths(doc)))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.3:
        del parent[path[-1]]
        return doc, f"removed {'.'.join(map(str, path))}"
    value = rng.choice(WRONG_VALUES)
    parent[path[-1]] = value
    return doc, f"{'.'.join(map(str, path))} = {value!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_mutated_configs_end_in_a_clear_error_or_a_valid_study(config, tmp_path, medmnist_dir):
    original = yaml.safe_load(config.read_text())
    rng = random.Random(config.name)
    for i in range(int(os.environ.get("FUZZ_N", 60))):
        doc, change = _mutate(original, rng)
        path = tmp_path / f"{i}-{config.name}"
        path.write_text(yaml.safe_dump(doc))
        try:
            study = load_study(path, data_dir=str(medmnist_dir))
            preflight(study, tmp_path / f"out-{i}")
        except ConfigError as err:
            message = str(err)
            assert message and "Traceback" not in message, change
        except Exception as err:  # noqa: BLE001 - any other exception is the bug this test looks for
            pytest.fail(f"{config.name} with {change}: {type(err).__name__}: {err}")
