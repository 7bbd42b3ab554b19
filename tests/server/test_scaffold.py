"""SCAFFOLD (server.scaffold) through the coordinator's real round loop and the sites' real handlers:
what each site is sent is SCAFFOLD's c - c_i, computed here by hand from the updates of the rounds
before; the sites' replies carry the model only; a resumed study goes on with the same controls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, MessageType
from flwr.supercore.task_identity import TaskIdentity

from common.config import ConfigError, validate_study
from common.keys import CORRECTION_PREFIX, Cfg, Met, Rec
from common.model_spec import model_spec
from common.schema import StudyConfig
from server.coordinator import run_study
from server.run_folder import RESULTS_FILE
from tests.local_grid import LocalGrid, honest

SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _study(rounds: int) -> StudyConfig:
    study = StudyConfig(name="scaffold", rounds=rounds, min_sites=3)
    study.model.name, study.strategy.name = "cnn28-small", "scaffold"
    study.train.batch_size, study.train.lr_decay = 16, 0.5  # each round its own learning rate
    return study


def _recording(seen: list[dict], node: int, name: str, index: int):
    real = honest(name, index)

    def answer(msg: Message) -> Message:
        reply = real(msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            arrays = {k: v.numpy().astype(np.float64) for k, v in msg.content[Rec.ARRAYS].items()}
            seen.append({"node": node, "round": int(msg.content[Rec.CONFIG][Cfg.SERVER_ROUND]),
                         "lr": float(msg.content[Rec.CONFIG][Cfg.LR]), "sent": arrays,
                         "back": {k: v.numpy().astype(np.float64) for k, v in reply.content[Rec.ARRAYS].items()},
                         "steps": int(reply.content[Rec.METRICS][Met.STEPS])})  # fmt: skip
        return reply

    return answer


def _by_hand(seen: list[dict], rounds: int) -> dict[tuple[int, int], dict]:
    """SCAFFOLD's option II, written out: the correction each node should get in each round."""
    nodes = sorted({s["node"] for s in seen})
    params = [k for k in seen[0]["sent"] if not k.startswith(CORRECTION_PREFIX)]
    c = {k: 0.0 for k in params}
    ci = {n: {k: 0.0 for k in params} for n in nodes}
    expected = {}
    for r in range(1, rounds + 1):
        for s in (s for s in seen if s["round"] == r):
            expected[r, s["node"]] = {k: c[k] - ci[s["node"]][k] for k in params}
        new_c = dict(c)
        for s in (s for s in seen if s["round"] == r):
            n, k_lr = s["node"], s["steps"] * s["lr"]
            new_ci = {k: ci[n][k] - c[k] + (s["sent"][k] - s["back"][k]) / k_lr for k in params}
            new_c = {k: new_c[k] + (new_ci[k] - ci[n][k]) / len(nodes) for k in params}
            ci[n] = new_ci
        c = new_c
    return expected


def _run(grid: LocalGrid, study: StudyConfig, out, resume: bool = False) -> dict:
    run_study(grid, study, out, spec=model_spec(study), n_sites=len(grid.nodes), resume=resume)
    return json.loads((out / RESULTS_FILE).read_text())


def test_each_site_is_sent_scaffolds_correction_and_replies_with_the_model_only(tmp_path):
    seen: list[dict] = []
    grid = LocalGrid({n: _recording(seen, n, name, n - 1) for n, name in enumerate(SITES, start=1)})
    results = _run(grid, _study(rounds=3), tmp_path)
    assert results["status"] == "completed" and len(seen) == 9
    expected = _by_hand(seen, rounds=3)
    for s in seen:
        got = {
            k[len(CORRECTION_PREFIX) :]: v for k, v in s["sent"].items() if k.startswith(CORRECTION_PREFIX)
        }
        assert got.keys() == expected[s["round"], s["node"]].keys()  # every trainable weight, nothing else
        for k, v in got.items():
            assert np.allclose(v, expected[s["round"], s["node"]][k], rtol=1e-4, atol=1e-6), (s["round"], k)
        assert not any(k.startswith(CORRECTION_PREFIX) for k in s["back"])  # the model only goes back
    late = [s for s in seen if s["round"] == 3]
    assert all(
        np.abs(v).max() > 0 for s in late for k, v in s["sent"].items() if k.startswith(CORRECTION_PREFIX)
    )
    # the corrections of a round sum to zero over the sites (c is the mean of the c_i)
    total = sum(s["sent"][CORRECTION_PREFIX + "head.weight"] for s in late)
    assert np.allclose(total, 0.0, atol=1e-4)


def test_a_resumed_study_goes_on_with_the_controls_it_had(tmp_path):
    seen: list[dict] = []
    grid = LocalGrid({n: _recording(seen, n, name, n - 1) for n, name in enumerate(SITES, start=1)})
    _run(grid, _study(rounds=2), tmp_path)
    resumed = _run(grid, _study(rounds=3), tmp_path, resume=True)
    assert resumed["status"] == "completed" and [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    third = [s for s in seen if s["round"] == 3]
    expected = _by_hand(seen, rounds=3)
    key = CORRECTION_PREFIX + "head.weight"
    for s in third:  # not zero, as a strategy that forgot its controls would send
        assert np.abs(s["sent"][key]).max() > 0
        assert np.allclose(s["sent"][key], expected[3, s["node"]]["head.weight"], rtol=1e-4, atol=1e-6)


def test_scaffold_with_site_local_normalization_is_refused_naming_both():
    study = _study(rounds=1)
    study.strategy.local_norm = True
    with pytest.raises(ConfigError, match=r"scaffold.*strategy\.local_norm"):
        validate_study(study)
