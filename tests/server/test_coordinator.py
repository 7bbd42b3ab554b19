"""The coordinator's checks on updates, its strategies, and how it reports site errors."""

import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.models import build_model
from common.schema import StudyConfig
from server.coordinator import make_strategy
from server.replies import check_update, short_reason


@pytest.fixture
def reference() -> ArrayRecord:
    return ArrayRecord(build_model("cnn28").state_dict())


def test_a_finite_update_of_the_right_shape_is_accepted(reference):
    assert check_update(ArrayRecord(build_model("cnn28", seed=5).state_dict()), reference) is None


def test_an_update_with_nan_is_rejected_naming_the_array(reference):
    state = build_model("cnn28").state_dict()
    state["head.weight"][0, 0] = float("nan")
    assert "head.weight" in check_update(ArrayRecord(state), reference)
    assert "NaN" in check_update(ArrayRecord(state), reference)


def test_an_update_from_another_model_is_rejected(reference):
    assert "keys differ" in check_update(ArrayRecord(build_model("resnet10").state_dict()), reference)
    assert "no model arrays" in check_update(None, reference)
    wide = ArrayRecord(build_model("cnn28-wide").state_dict())
    assert "shape" in check_update(wide, reference)


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
def test_strategies_are_flowers_own(name, cls):
    study = StudyConfig()
    study.strategy.name = name
    study.strategy.proximal_mu = 0.3
    strategy = make_strategy(study)
    assert type(strategy) is cls
    assert strategy.min_train_nodes == study.min_sites
    if name == "fedprox":
        assert strategy.proximal_mu == 0.3


def test_client_tracebacks_are_shortened_to_their_message():
    reason = "Traceback...\\n  File x\\nClientAppException occurred. Message: [ValueError('bad label 7')]'>"
    assert short_reason(reason).endswith("ValueError('bad label 7')")
    assert len(short_reason("x" * 5000)) == 400
