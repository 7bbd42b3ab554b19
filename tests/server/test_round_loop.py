"""The coordinator's round loop over a Grid of our own: real sites (the ClientApp's handlers on small
synthetic sites) next to sites that send NaN, refuse, fail or stay silent, without Ray or a SuperLink.

What is checked is what lands in results.json: who trained, who failed and why, who was not asked to
evaluate, the privacy columns, the timing series, stopping below min_sites, and resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.ledger import TRAINING_KINDS, SiteAccountant
from common.config import ConfigError
from common.keys import Cfg, Met, Rec, Site
from common.model_spec import model_spec
from common.package import META_FILE, PACKAGE_DIR
from common.schema import (
    StudyConfig,
)
from server.coordinator import run_study
from server.report import build_report
from server.report.tables import run_table
from server.run_folder import RESULTS_FILE
from tests.local_grid import Behaviour, LocalGrid, honest


def sends_nan(name: str, index: int) -> Behaviour:
    real = honest(name, index)

    def answer(msg: Message) -> Message:
        reply = real(msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            state = reply.content[Rec.ARRAYS].to_torch_state_dict()
            state["head.weight"][0, 0] = float("nan")
            reply.content[Rec.ARRAYS] = ArrayRecord(state)
        return reply

    return answer


def silent_in_training(name: str, index: int) -> Behaviour:
    real = honest(name, index)
    return lambda msg: None if msg.metadata.message_type == MessageType.TRAIN else real(msg)


def refuses(name: str, index: int, epsilon: float) -> Behaviour:
    """Refuses to train (as a site whose budget is spent), evaluates as usual."""
    real = honest(name, index)

    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return real(msg)
        metrics = MetricRecord({Met.NUM_EXAMPLES: 0, Met.EPSILON: epsilon, Met.DELTA: 1e-5, Met.STEPS: 0})
        site = ConfigRecord({Site.NAME: name, Site.REFUSED: "privacy budget: spent"})
        return Message(RecordDict({Rec.METRICS: metrics, Rec.SITE: site}), reply_to=msg)

    return answer


def crashes(msg: Message) -> Message:
    return Message(
        Error(code=0, reason="Traceback ...\nMessage: site 'hospital-x' cannot read its data"), reply_to=msg
    )


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _study(rounds: int = 2, min_sites: int = 1) -> StudyConfig:
    study = StudyConfig(
        name="loop", rounds=rounds, min_sites=min_sites, round_timeout_s=1.0
    )  # for the silent
    study.model.name = "cnn28-small"
    study.train.batch_size = 16
    return study


def _run(grid: LocalGrid, study: StudyConfig, out, resume: bool = False) -> dict:
    run_study(grid, study, out, spec=model_spec(study), n_sites=len(grid.nodes), resume=resume)
    return json.loads((out / RESULTS_FILE).read_text())


def test_a_nan_update_and_a_silent_site_are_named_and_left_out(tmp_path):
    grid = LocalGrid(
        {1: honest("hospital-a", 0), 2: sends_nan("hospital-b", 1), 3: silent_in_training("hospital-c", 2)}
    )

    results = _run(grid, _study(rounds=2), tmp_path)

    assert results["status"] == "completed"
    for record in results["rounds"]:
        assert record["participants"] == ["hospital-a"]
        assert "NaN" in record["failed"]["hospital-b"] and "head.weight" in record["failed"]["hospital-b"]
        assert record["failed"]["hospital-c"].startswith("no reply within round_timeout_s")
        # the silent site is not asked to evaluate the round it missed; the NaN site is
        assert set(record["sites"]) == {"hospital-a", "hospital-b"}
    evaluations = [node for kind, node in grid.asked if kind == MessageType.EVALUATE]
    # the initial model, and (once) the final model on its validation split for the operating point
    assert evaluations.count(3) == 2
    timing = results["timing"]  # per round; a site that never took part in a round has no series
    assert all(t > 0 for t in timing["train_s"]["hospital-a"]) and len(timing["train_s"]["hospital-a"]) == 2
    assert "hospital-b" not in timing["train_s"] and "hospital-c" not in timing["train_s"]
    assert "hospital-c" not in timing["eval_s"] and len(timing["eval_s"]["hospital-b"]) == 2
    assert len(timing["round_s"]) == 2


def test_too_few_usable_updates_stop_the_study_saying_why(tmp_path):
    grid = LocalGrid({1: honest("hospital-a", 0), 2: crashes})

    results = _run(grid, _study(rounds=3, min_sites=2), tmp_path)

    assert results["status"] == "stopped"
    assert "min_sites=2" in results["stop_reason"] and "cannot read its data" in results["stop_reason"]
    assert results["rounds"] == [] and results["final"]["round"] == 0
    assert (tmp_path / "final_model.pt").is_file()


def test_privacy_columns_per_site_and_a_refusal_that_stops_nothing(tmp_path):
    grid = LocalGrid(
        {
            1: honest("hospital-a", 0, state_dir=str(tmp_path / "a")),
            2: refuses("hospital-b", 1, epsilon=2.5),
            3: honest("hospital-c", 2),  # no state_dir: no ledger, so it refuses itself
        }
    )
    study = _study(rounds=2)
    study.privacy.enabled = True

    results = _run(grid, study, tmp_path / "run")

    assert results["status"] == "completed"
    first, second = results["rounds"]
    assert first["participants"] == second["participants"] == ["hospital-a"]
    a1, a2 = first["sites"]["hospital-a"], second["sites"]["hospital-a"]
    (count,) = [e.value for e in SiteAccountant(tmp_path / "a").ledger.entries() if e.kind == "count"]
    assert a1["steps"] == math.ceil(count / 16)  # batches of the released, noised size (batch 16)
    assert 0 < a1["epsilon"] < a2["epsilon"] and a1["refused"] is None
    assert a1["noise_multiplier"] > 0 and a1["delta"] == study.privacy.delta
    b = second["sites"]["hospital-b"]
    assert (b["epsilon"], b["steps"], b["refused"]) == (2.5, 0, "privacy budget: spent")
    assert "state_dir" in second["sites"]["hospital-c"]["refused"]
    assert results["final"]["sites"]["hospital-a"]["epsilon"] == a2["epsilon"]


def test_a_site_whose_images_were_released_without_privacy_is_reported_unbounded(tmp_path):
    """hospital-a once trained without DP (its ledger says so): in a private study it trains, and
    results.json, the budget warning, the run's table and the model package say its epsilon is
    unbounded, as a word (JSON has no infinity; null means "not reported")."""
    SiteAccountant(tmp_path / "a").record_nonprivate(
        budget=TRAINING_KINDS, round=1, steps=3, delta=1e-5, study="an-earlier-plain-study"
    )
    grid = LocalGrid({1: honest("hospital-a", 0, state_dir=str(tmp_path / "a")),
                      2: honest("hospital-b", 1, state_dir=str(tmp_path / "b"))})  # fmt: skip
    study = _study(rounds=2)
    study.privacy.enabled = True

    results = _run(grid, study, tmp_path / "run")

    assert results["rounds"][-1]["participants"] == ["hospital-a", "hospital-b"]
    assert [r["sites"]["hospital-a"]["epsilon"] for r in results["rounds"]] == ["unbounded"] * 2
    assert results["final"]["sites"]["hospital-a"]["epsilon"] == "unbounded"
    assert 0 < results["final"]["sites"]["hospital-b"]["epsilon"] < study.privacy.target_epsilon
    (warning,) = results["warnings"]
    assert warning["site"] == "hospital-a" and "without differential privacy" in warning["message"]
    rows = {row[0].text: row[-1].text for row in run_table(results).rows}
    assert rows["hospital-a"] == "unbounded" and rows["hospital-b"] not in ("unbounded", "–")
    package = json.loads((tmp_path / "run" / PACKAGE_DIR / META_FILE).read_text())
    assert package["privacy"]["epsilon"]["hospital-a"] == "unbounded"
    report = build_report(tmp_path / "run").read_text()  # the report reads results.json as written
    assert "unbounded" in report


def test_rounds_with_seeded_noise_are_marked_not_private_in_the_ledger_and_results(tmp_path, caplog):
    grid = LocalGrid(
        {
            1: honest("hospital-a", 0, state_dir=str(tmp_path / "a"), repeatable_noise=True),
            2: honest("hospital-b", 1, state_dir=str(tmp_path / "b")),
        }
    )
    study = _study(rounds=1)
    study.privacy.enabled = True

    with caplog.at_level("WARNING"):
        (round_,) = _run(grid, study, tmp_path / "run")["rounds"]

    assert round_["sites"]["hospital-a"]["repeatable_noise"] is True
    assert round_["sites"]["hospital-b"]["repeatable_noise"] is False
    marks = {s: {e.kind: e.repeatable for e in SiteAccountant(tmp_path / s).ledger.entries()} for s in "ab"}
    assert marks["a"]["train"] is True and marks["b"]["train"] is False
    assert any("hospital-a" in r.getMessage() and "NOT private against the coordinator" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert not any("hospital-b" in r.getMessage() and "NOT private" in r.getMessage() for r in caplog.records)


def test_a_study_where_every_site_refuses_stops_at_round_one(tmp_path):
    grid = LocalGrid({1: honest("hospital-a", 0), 2: refuses("hospital-b", 1, epsilon=2.5)})
    study = _study(rounds=1)
    study.privacy.enabled = True  # hospital-a has no state_dir: it refuses too, with its own reason

    results = _run(grid, study, tmp_path)

    assert results["status"] == "stopped"
    stopped = results["stopped_rounds"][0]["refused"]
    assert stopped["hospital-b"] == "privacy budget: spent"
    assert "state_dir" in stopped["hospital-a"]


def test_resume_continues_after_the_last_round_and_refuses_a_changed_study(tmp_path):
    def grid() -> LocalGrid:
        return LocalGrid({1: honest("hospital-a", 0), 2: honest("hospital-b", 1)})

    first = _run(grid(), _study(rounds=1), tmp_path)
    resumed = _run(grid(), _study(rounds=2), tmp_path, resume=True)  # rounds may grow

    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert resumed["rounds"][0] == first["rounds"][0]  # round 1 kept, not trained again
    assert resumed["study_id"] == first["study_id"]
    changed = _study(rounds=3)
    changed.train.lr = 0.5
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in \['train'\]"):
        _run(grid(), changed, tmp_path, resume=True)


@pytest.mark.parametrize("weighting", ["examples", "sites"])
def test_the_global_model_is_the_mean_of_the_updates_weighted_by_size_or_by_site(tmp_path, weighting):
    from common.models import build_model

    grid = LocalGrid({1: honest("hospital-a", 0), 2: honest("hospital-b", 1, train_per_site=96)})
    sent = {}
    for node, behaviour in list(grid.nodes.items()):

        def spy(msg, behaviour=behaviour, node=node):
            reply = behaviour(msg)
            if msg.metadata.message_type == MessageType.TRAIN:
                sent[node] = reply.content[Rec.ARRAYS].to_torch_state_dict()
                reply.content[Rec.METRICS][Met.SITE_WEIGHT] = 100  # a site that would weigh more: ignored
            return reply

        grid.nodes[node] = spy

    study = _study(rounds=1)
    study.strategy.weighting = weighting
    _run(grid, study, tmp_path)

    model = build_model("cnn28-small")
    blob = torch.load(tmp_path / "final_model.pt", weights_only=False)
    model.load_state_dict(blob["state_dict"])
    a, b = sent[1]["head.weight"], sent[2]["head.weight"]
    expected = (32 * a + 96 * b) / 128 if weighting == "examples" else (a + b) / 2
    assert not torch.allclose(a, b, atol=1e-4)  # the two weightings give different models
    assert torch.allclose(model.state_dict()["head.weight"], expected, atol=1e-6)


def test_with_parameter_averaging_the_moving_average_of_the_global_models_is_evaluated_and_kept(tmp_path):
    grid = LocalGrid({1: honest("hospital-a", 0), 2: honest("hospital-b", 1)})
    study = _study(rounds=2)
    study.strategy.ema_decay = 0.5
    results = _run(grid, study, tmp_path)
    rounds = [torch.load(tmp_path / "checkpoints" / f"round-{r:04d}.pt", weights_only=False) for r in (1, 2)]
    first, second = (ck["arrays"]["head.weight"] for ck in rounds)  # each round's own global model
    blob = torch.load(tmp_path / "final_model.pt", weights_only=False)
    assert torch.allclose(blob["state_dict"]["head.weight"], 0.5 * first + 0.5 * second, atol=1e-6)
    assert torch.equal(rounds[1]["average"]["head.weight"], blob["state_dict"]["head.weight"])
    assert results["status"] == "completed" and not torch.equal(
        first, second
    )  # two different rounds averaged


def test_fedavgm_steps_the_global_model_with_momentum_over_the_rounds_and_checkpoints_it(tmp_path):
    grid = LocalGrid({1: honest("hospital-a", 0), 2: honest("hospital-b", 1)})
    sent, got = {}, {}  # per round: the global weights sent, the updates returned
    for node, behaviour in list(grid.nodes.items()):

        def spy(msg, behaviour=behaviour, node=node):
            reply = behaviour(msg)
            if msg.metadata.message_type == MessageType.TRAIN:
                rnd = int(msg.content[Rec.CONFIG][Cfg.SERVER_ROUND])
                sent[rnd] = msg.content[Rec.ARRAYS].to_torch_state_dict()["head.weight"]
                got.setdefault(rnd, {})[node] = reply.content[Rec.ARRAYS].to_torch_state_dict()["head.weight"]
            return reply

        grid.nodes[node] = spy

    study = _study(rounds=2)
    study.strategy.name, study.strategy.server_lr, study.strategy.server_momentum = "fedavgm", 0.5, 0.8
    _run(grid, study, tmp_path)

    x, momentum = sent[1], None
    for rnd in (1, 2):
        assert torch.allclose(sent[rnd], x, atol=1e-6)  # the site trains from the momentum step's model
        pseudo_gradient = x - (got[rnd][1] + got[rnd][2]) / 2
        momentum = pseudo_gradient if momentum is None else 0.8 * momentum + pseudo_gradient
        x = x - 0.5 * momentum
    blob = torch.load(tmp_path / "final_model.pt", weights_only=False)
    assert torch.allclose(blob["state_dict"]["head.weight"], x, atol=1e-5)
    ck = torch.load(tmp_path / "checkpoints" / "round-0002.pt", weights_only=False)
    names = list(ck["arrays"])
    kept = dict(zip(names, ck["strategy_state"]["momentum_vector"], strict=True))  # for --resume
    assert torch.allclose(torch.as_tensor(kept["head.weight"]), momentum, atol=1e-5)
