"""What a site keeps of what it trained on (drift monitoring's reference) grows with its data, not with
the study ids a coordinator sends: the profile is kept once per state of the data, each study a record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import handle_train
from client.profile import DATA_DIR, PROFILES_DIR, load_profile, record_training_profile
from client.site import SiteRuntime
from common.keys import Rec, Site
from common.models import build_model
from common.schema import SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig
from tests.plans import round_config


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _runtime(state, *, test_per_site=40) -> SiteRuntime:
    data = SiteDataConfig(
        format="synthetic",
        synthetic=SyntheticConfig(train_per_site=32, test_per_site=test_per_site),
    )
    policy = SitePolicyConfig(required=False)  # the site allows training without privacy
    return SiteRuntime.load(SiteConfig(site="hospital-a", data=data, privacy=policy, state_dir=str(state)))


def _train(rt: SiteRuntime, study_id: str) -> None:
    config = round_config(dp_enabled=False, study_id=study_id, batch_size=16)
    msg = Message(
        RecordDict(
            {Rec.ARRAYS: ArrayRecord(build_model("cnn28").state_dict()), Rec.CONFIG: ConfigRecord(config)}
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    assert handle_train(msg, rt).content[Rec.SITE][Site.REFUSED] == ""


def test_a_new_study_id_every_round_adds_a_small_record_not_another_copy_of_the_data(tmp_path):
    rt = _runtime(tmp_path)
    studies = [f"made-up-{i}" for i in range(4)]  # a coordinator inventing a study id per round

    for study in studies:
        _train(rt, study)

    folder = tmp_path / PROFILES_DIR
    (data,) = (folder / DATA_DIR).glob("*.npz")  # one copy of what the site trained on
    records = sorted(folder.glob("*.json"))
    assert [r.stem for r in records] == studies
    assert all(r.stat().st_size < 300 for r in records)
    first, *others = (load_profile(tmp_path, s) for s in studies)
    assert first["meta"]["study_id"] == studies[0] and first["path"] == str(data)
    for other, study in zip(others, studies[1:], strict=True):
        assert other["meta"]["study_id"] == study
        assert torch.equal(other["sample_x"], first["sample_x"]) and len(first["sample_x"]) == 40


def test_new_data_gets_a_profile_of_its_own(tmp_path):
    record_training_profile(tmp_path, "before", _runtime(tmp_path).data)
    record_training_profile(tmp_path, "after", _runtime(tmp_path, test_per_site=24).data)

    assert len(list((tmp_path / PROFILES_DIR / DATA_DIR).glob("*.npz"))) == 2
    before, after = load_profile(tmp_path, "before"), load_profile(tmp_path, "after")
    assert len(before["sample_x"]) == 40 and len(after["sample_x"]) == 24


def test_a_profile_kept_whole_by_an_earlier_fedward_is_still_read_and_kept(tmp_path):
    data = _runtime(tmp_path).data
    record_training_profile(tmp_path, "new", data)
    folder = tmp_path / PROFILES_DIR
    (shared,) = (folder / DATA_DIR).glob("*.npz")
    with np.load(shared) as z:  # the earlier layout: everything in <study id>.npz, its id in the meta
        arrays = dict(z)
    meta = json.loads(bytes(arrays["meta"]).decode()) | {"study_id": "old"}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez_compressed(folder / "old.npz", **arrays)

    record_training_profile(tmp_path, "old", data)  # the study trains again: its profile stays as it was

    assert not (folder / "old.json").exists()
    old = load_profile(tmp_path, "old")
    assert old["meta"]["study_id"] == "old" and old["path"] == str(folder / "old.npz")
    assert torch.equal(old["sample_x"], load_profile(tmp_path, "new")["sample_x"])
    assert load_profile(tmp_path, "never-trained-here") is None


def test_a_study_whose_data_profile_is_gone_has_none_until_it_trains_again(tmp_path):
    data = _runtime(tmp_path).data
    record_training_profile(tmp_path, "study", data)
    (kept,) = (tmp_path / PROFILES_DIR / DATA_DIR).glob("*.npz")
    kept.unlink()  # an operator's clean-up, or a state folder copied in part

    assert load_profile(tmp_path, "study") is None  # the monitor then asks for --reference, no crash

    record_training_profile(tmp_path, "study", data)
    assert kept.is_file() and load_profile(tmp_path, "study")["path"] == str(kept)


def test_a_record_is_read_only_for_the_study_it_names(tmp_path):
    record_training_profile(tmp_path, "a/b", _runtime(tmp_path).data)  # the same file name as "a_b"

    assert load_profile(tmp_path, "a/b") is not None
    assert load_profile(tmp_path, "a_b") is None
