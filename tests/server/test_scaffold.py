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
            seen.append({"site": name, "round": int(msg.content[Rec.CONFIG][Cfg.SERVER_ROUND]),
                         "lr": float(msg.content[Rec.CONFIG][Cfg.LR]), "sent": arrays,
                         "back": {k: v.numpy().astype(np.float64) for k, v in reply.content[Rec.ARRAYS].items()},
                         "steps": int(reply.content[Rec.METRICS][Met.STEPS])})  # fmt: skip
        return reply

    return answer


def _grid(seen: list[dict], first_node: int = 1) -> LocalGrid:
    return LocalGrid(
        {first_node + i: _recording(seen, first_node + i, name, i) for i, name in enumerate(SITES)}
    )


def _sent_correction(record: dict) -> dict[str, np.ndarray]:
    return {
        k[len(CORRECTION_PREFIX) :]: v for k, v in record["sent"].items() if k.startswith(CORRECTION_PREFIX)
    }


def _by_hand(seen: list[dict], rounds: int) -> dict[tuple[int, str], dict]:
    """SCAFFOLD's option II, written out: the correction c - c_i each site should get in each round,
    from the updates of the rounds before (c_i+ = c_i - c + (x - y_i) / (K_i lr), c the mean c_i)."""
    params = [k for k in seen[0]["sent"] if not k.startswith(CORRECTION_PREFIX)]
    c = {k: 0.0 for k in params}
    ci = {site: {k: 0.0 for k in params} for site in SITES}
    expected = {}
    for r in range(1, rounds + 1):
        done = [s for s in seen if s["round"] == r]
        for s in done:
            expected[r, s["site"]] = {k: c[k] - ci[s["site"]][k] for k in params}
        for s in done:  # with the correction the site was actually sent (zero for a node not yet known)
            got, k_lr = _sent_correction(s), s["steps"] * s["lr"]
            ci[s["site"]] = {k: (s["sent"][k] - s["back"][k]) / k_lr - got[k] for k in params}
        c = {k: sum(ci[site][k] for site in SITES) / len(SITES) for k in params}
    return expected


def _run(grid: LocalGrid, study: StudyConfig, out, resume: bool = False) -> dict:
    run_study(grid, study, out, spec=model_spec(study), n_sites=len(grid.nodes), resume=resume)
    return json.loads((out / RESULTS_FILE).read_text())


def test_each_site_is_sent_scaffolds_correction_and_replies_with_the_model_only(tmp_path):
    seen: list[dict] = []
    results = _run(_grid(seen), _study(rounds=3), tmp_path)
    assert results["status"] == "completed" and len(seen) == 9
    expected = _by_hand(seen, rounds=3)
    for s in seen:
        got = _sent_correction(s)
        assert got.keys() == expected[s["round"], s["site"]].keys()  # every trainable weight, nothing else
        for k, v in got.items():
            assert np.allclose(v, expected[s["round"], s["site"]][k], rtol=1e-4, atol=1e-6), (s["round"], k)
        assert not any(k.startswith(CORRECTION_PREFIX) for k in s["back"])  # the model only goes back
    late = [s for s in seen if s["round"] == 3]
    assert all(np.abs(v).max() > 0 for s in late for v in _sent_correction(s).values())
    # the corrections of a round sum to zero over the sites (c is the mean of the c_i)
    assert np.allclose(sum(_sent_correction(s)["head.weight"] for s in late), 0.0, atol=1e-4)


def test_a_resumed_study_keeps_each_sites_control_though_its_node_comes_back_with_a_new_id(tmp_path):
    seen: list[dict] = []
    _run(_grid(seen), _study(rounds=2), tmp_path)
    resumed = _run(_grid(seen, first_node=11), _study(rounds=4), tmp_path, resume=True)  # new node ids
    assert resumed["status"] == "completed" and [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]
    third, fourth = [s for s in seen if s["round"] == 3], [s for s in seen if s["round"] == 4]
    # round 3: the new nodes are not known by name yet, so no site is sent another site's correction
    assert all(np.abs(v).max() == 0 for s in third for v in _sent_correction(s).values())
    expected = _by_hand(seen, rounds=4)
    for s in fourth:  # then each site's own c - c_i again, its c_i kept across the restart
        got = _sent_correction(s)["head.weight"]
        assert np.abs(got).max() > 0
        assert np.allclose(got, expected[4, s["site"]]["head.weight"], rtol=1e-4, atol=1e-6)


def test_scaffold_with_site_local_normalization_is_refused_naming_both():
    study = _study(rounds=1)
    study.strategy.local_norm = True
    with pytest.raises(ConfigError, match=r"scaffold.*strategy\.local_norm"):
        validate_study(study)
