"""What leaves a site: model arrays and aggregate metrics only, never file names or patient ids; and
from a private round nothing the epsilon does not cover (no exact size, no loss, no time). The real
ClientApp handlers answer real Flower Messages for a DICOM site."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import handle_evaluate, handle_train
from client.ledger import SiteAccountant
from client.site import runtime_for
from common.config import load_site
from common.keys import Cfg, Met, Rec, Site
from common.models import build_model
from common.privacy import request_config
from common.schema import PrivacyConfig
from tests.common.test_sources import write_dicom_site
from tests.plans import round_config

PRIVATE_METRICS = {
    "num-examples",
    "epsilon",
    "delta",
    "noise-multiplier",
    "steps",
    "sample-rate",
    "repeatable-noise",
    "privacy-unit",
}


@pytest.fixture
def site(tmp_path):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    path = write_dicom_site(
        tmp_path / "site", name="hospital-x", patients=8, size=32, seed=3, privacy={"required": False}
    )
    return load_site(path)


def _config(rnd: int, private: bool = False) -> ConfigRecord:
    config = round_config(round=rnd, dp_enabled=private)
    if private:
        config |= request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0))
    return ConfigRecord(config)


def _ask(rt, kind: str, config: ConfigRecord) -> RecordDict:
    arrays = ArrayRecord(build_model("cnn28").state_dict())
    msg = Message(RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: config}), dst_node_id=1, message_type=kind)
    return (handle_train if kind == MessageType.TRAIN else handle_evaluate)(msg, rt).content


def _strings(content: RecordDict) -> list[str]:
    out = list(content.keys())
    for record in content.values():
        for key, value in record.items():
            out.append(key)
            out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return out


def test_site_replies_carry_only_arrays_and_aggregate_numbers(site):
    rt = runtime_for(site)
    replies = [
        _ask(rt, MessageType.TRAIN, _config(1)),
        _ask(rt, MessageType.TRAIN, _config(1, private=True)),
        _ask(rt, MessageType.EVALUATE, _config(1)),
    ]

    sheet = (Path(site.source_path).parent / site.data.labels).read_text().splitlines()[1:]
    private = {cell for line in sheet for cell in line.split(",")[:2] if cell}  # file, patient_id
    assert len(private) > 10
    # the only lists a reply may hold, each of a size fixed by the model and the policy, never by the data:
    # this site's evaluation policy is the default, noised histograms of 16 bins of class 1's scores
    allowed_lists = {Met.SCORE_HIST: 2 * site.privacy.evaluation.bins}
    for content in replies:
        for name, record in content.items():
            assert isinstance(record, ArrayRecord | MetricRecord | ConfigRecord), name
            if isinstance(record, ConfigRecord):  # name, refusal reason, release kind, how it reads images
                assert set(record.keys()) == {Site.NAME, Site.REFUSED, Site.RELEASE, Site.INPUT}
                if record[Site.INPUT]:  # reading and preprocessing settings of the site config, nothing else
                    described = json.loads(record[Site.INPUT])
                    assert set(described) == {"format", "colour", "frame", "window", "volume", "preprocess"}
                    assert described["preprocess"] == dataclasses.asdict(site.data.preprocess)
            if isinstance(record, MetricRecord):
                for key, value in record.items():
                    values = value if isinstance(value, list) else [value]
                    assert all(isinstance(v, int | float) for v in values), key
                    if isinstance(value, list):
                        assert len(value) == allowed_lists.get(key), f"{key}: a list of {len(value)} values"
        text = " ".join(_strings(content))
        assert not any(p in text for p in private)
    assert replies[0][Rec.SITE][Site.NAME] == "hospital-x"
    assert set(replies[2][Rec.METRICS].keys()) == {
        "score-hist",
        "eval-noise",
        "eval-bins",
        "eval-epsilon",
        "privacy-unit",
    }  # no exact count and no time (it grows with the exact number of test images)


def test_a_private_rounds_reply_holds_only_what_its_epsilon_covers(site):
    rt = runtime_for(site)
    plain, private = (
        _ask(rt, MessageType.TRAIN, _config(1)),
        _ask(rt, MessageType.TRAIN, _config(1, private=True)),
    )

    assert plain[Rec.METRICS][Met.NUM_EXAMPLES] == len(rt.data.train_y)  # this site allows plain training
    assert {Met.TRAIN_LOSS, Met.TRAIN_S} <= set(plain[Rec.METRICS].keys())
    assert set(private[Rec.METRICS].keys()) == PRIVATE_METRICS  # no loss, no training time
    # the size it sends is the count it released, noised and charged to its ledger, once per study
    entries = SiteAccountant(site.state_dir).ledger.entries()
    count = [e for e in entries if e.kind == "count"]
    assert len(count) == 1 and count[0].noise_multiplier == site.privacy.count_noise
    assert private[Rec.METRICS][Met.NUM_EXAMPLES] == int(count[0].value)
    again = _ask(rt, MessageType.TRAIN, _config(2, private=True))
    assert again[Rec.METRICS][Met.NUM_EXAMPLES] == int(count[0].value)
    kinds = [e.kind for e in SiteAccountant(site.state_dir).ledger.entries()]
    assert kinds == ["train-nonprivate", "count", "train", "train"]
    # the plain round released the training images exactly: no epsilon bounds that, whatever came after
    assert private[Rec.METRICS][Met.EPSILON] == again[Rec.METRICS][Met.EPSILON] == float("inf")


def test_site_trains_with_its_own_class_balance_when_asked(site, monkeypatch):
    """The round config's class-balance flag reaches the site's loss, weighted by the site's own labels."""
    import client.train as train

    rt = runtime_for(site)
    seen = []
    real = train.make_criterion

    def spy(train_y, num_classes, balanced, task="classification"):
        crit = real(train_y, num_classes, balanced, task)
        seen.append((balanced, getattr(crit, "class_weights", None)))
        return crit

    monkeypatch.setattr(train, "make_criterion", spy)
    for balanced in (False, True):
        config = _config(1)
        config[Cfg.CLASS_BALANCE] = balanced
        assert Rec.ARRAYS in _ask(rt, MessageType.TRAIN, config)
    assert [b for b, _ in seen] == [False, True]
    counts = torch.bincount(rt.data.train_y, minlength=2).double()
    assert torch.allclose(seen[1][1].double(), counts.sum() / (2 * counts))


def test_an_evaluation_released_without_privacy_leaves_the_test_images_epsilon_unbounded(site):
    """A `summary` release is exact: it is written to the ledger before it leaves, and a protected
    release after it reports the test images' epsilon as infinite, not as its own noise's epsilon."""
    from client.site import SiteRuntime

    evaluation = site.privacy.evaluation
    summary = dataclasses.replace(site, privacy=dataclasses.replace(
        site.privacy, evaluation=dataclasses.replace(evaluation, release="summary")
    ))  # fmt: skip
    first = _ask(SiteRuntime.load(summary), MessageType.EVALUATE, _config(1))
    protected = _ask(SiteRuntime.load(site), MessageType.EVALUATE, _config(2))

    assert Met.AUC in first[Rec.METRICS] and Met.EVAL_EPSILON not in first[Rec.METRICS]
    assert protected[Rec.METRICS][Met.EVAL_EPSILON] == float("inf")
    lines = SiteAccountant(site.state_dir).ledger.entries()
    assert [e.kind for e in lines] == ["evaluation-nonprivate", "evaluation"]
    assert SiteAccountant(site.state_dir).spent(site.privacy.delta) == 0.0  # the training images: untouched
