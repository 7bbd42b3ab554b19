"""What leaves a site: model arrays and aggregate metrics only, never file names, patient ids or
per-image values. The real ClientApp handlers answer real Flower Messages for a DICOM site."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import handle_evaluate, handle_train
from client.site import runtime_for
from common.config import load_site
from common.keys import Cfg, Met, Rec, Site
from common.metrics import HIST_BINS
from common.models import build_model
from tests.common.test_sources import write_dicom_site
from tests.plans import round_config


@pytest.fixture
def site(tmp_path):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    return load_site(write_dicom_site(tmp_path / "site", name="hospital-x", patients=8, size=32, seed=3))


def _config(rnd: int) -> ConfigRecord:
    return ConfigRecord(round_config(round=rnd))


def _strings(content: RecordDict) -> list[str]:
    out = list(content.keys())
    for record in content.values():
        for key, value in record.items():
            out.append(key)
            out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return out


def test_site_replies_carry_only_arrays_and_aggregate_numbers(site):
    rt = runtime_for(site)
    arrays = ArrayRecord(build_model("cnn28").state_dict())
    train = Message(RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: _config(1)}), dst_node_id=1,
                    message_type=MessageType.TRAIN)  # fmt: skip
    evaluate = Message(RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: _config(1)}), dst_node_id=1,
                       message_type=MessageType.EVALUATE)  # fmt: skip
    replies = [handle_train(train, rt).content, handle_evaluate(evaluate, rt).content]

    sheet = (Path(site.source_path).parent / site.data.labels).read_text().splitlines()[1:]
    private = {cell for line in sheet for cell in line.split(",")[:2] if cell}  # file, patient_id
    assert len(private) > 10
    # the only lists a reply may hold, each of a size fixed by the model, never by the data
    allowed_lists = {Met.CONFUSION: 2 * 2, Met.SCORE_HIST: 2 * 2 * HIST_BINS}
    for content in replies:
        for name, record in content.items():
            assert isinstance(record, ArrayRecord | MetricRecord | ConfigRecord), name
            if isinstance(record, ConfigRecord):  # the site's name and a refusal reason, nothing else
                assert set(record.keys()) == {Site.NAME, Site.REFUSED}
            if isinstance(record, MetricRecord):
                for key, value in record.items():
                    values = value if isinstance(value, list) else [value]
                    assert all(isinstance(v, int | float) for v in values), key
                    if isinstance(value, list):
                        assert len(value) == allowed_lists.get(key), f"{key}: a list of {len(value)} values"
        text = " ".join(_strings(content))
        assert not any(p in text for p in private)
    assert replies[0][Rec.SITE][Site.NAME] == "hospital-x"
    assert set(replies[1][Rec.METRICS].keys()) >= {"auc", "n-test", "confusion", "score-hist"}


def test_site_trains_with_its_own_class_balance_when_asked(site, monkeypatch):
    """The round config's class-balance flag reaches the site's loss, weighted by the site's own labels."""
    import client.train as train

    rt = runtime_for(site)
    seen = []
    real = train.make_criterion

    def spy(train_y, num_classes, balanced):
        crit = real(train_y, num_classes, balanced)
        seen.append((balanced, getattr(crit, "class_weights", None)))
        return crit

    monkeypatch.setattr(train, "make_criterion", spy)
    arrays = ArrayRecord(build_model("cnn28").state_dict())
    for balanced in (False, True):
        config = _config(1)
        config[Cfg.CLASS_BALANCE] = balanced
        msg = Message(RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: config}), dst_node_id=1,
                      message_type=MessageType.TRAIN)  # fmt: skip
        assert Rec.ARRAYS in handle_train(msg, rt).content
    assert [b for b, _ in seen] == [False, True]
    counts = torch.bincount(rt.data.train_y, minlength=2).double()
    assert torch.allclose(seen[1][1].double(), counts.sum() / (2 * counts))
