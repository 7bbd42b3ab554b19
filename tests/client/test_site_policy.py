"""The site decides: a coordinator's request weaker than the site's policy in any field is refused,
naming the field, through the real ClientApp handlers; nothing is trained and the ledger is untouched.
A site that allows non-private training says so in its own config, and then trains."""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import handle_evaluate, handle_train
from client.ledger import SiteAccountant
from client.profile import PROFILES_DIR, profile_path
from client.site import SiteRuntime
from common.config import ConfigError, load_site
from common.keys import Met, Rec, Site
from common.models import build_model
from common.privacy import PrivacyKey, request_config
from common.schema import PrivacyConfig, SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig
from tests.plans import round_config

POLICY = SitePolicyConfig(max_epsilon=3.0, delta=1e-5, min_noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _runtime(tmp_path, **policy) -> SiteRuntime:
    data = SiteDataConfig(format="synthetic", synthetic=SyntheticConfig(train_per_site=48, test_per_site=8))
    privacy = SitePolicyConfig(**{**POLICY.__dict__, **policy})
    return SiteRuntime.load(
        SiteConfig(site="hospital-a", data=data, privacy=privacy, state_dir=str(tmp_path))
    )


def _private(**asked) -> dict:
    asked = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, **asked}
    return round_config(dp_enabled=True, batch_size=16) | request_config(PrivacyConfig(enabled=True, **asked))


def _train(rt: SiteRuntime, config: dict):
    msg = Message(
        RecordDict(
            {Rec.ARRAYS: ArrayRecord(build_model("cnn28").state_dict()), Rec.CONFIG: ConfigRecord(config)}
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    return handle_train(msg, rt).content


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (round_config(dp_enabled=False), "privacy.required"),
        (_private(poisson_sampling=False), "Poisson sampling"),
        (_private(noise_multiplier=0.5), "privacy.min_noise_multiplier 1"),
        (_private(max_grad_norm=2.0), "privacy.max_grad_norm 1"),
        (_private(delta=1e-4), "privacy.delta 1e-05"),
        (
            _private(noise_multiplier=1.0, target_epsilon=50.0) | {"planned-rounds": 50},
            "privacy.max_epsilon 3",
        ),
        (_private() | {"proximal-mu": 0.1}, "proximal-mu 0.1"),  # Opacus would drop FedProx's term
    ],
    ids=["no-dp", "no-poisson", "less-noise", "larger-clip", "larger-delta", "over-budget", "fedprox"],
)
def test_a_request_weaker_than_the_policy_is_refused_naming_the_field(tmp_path, config, field):
    rt = _runtime(tmp_path)
    if field == "privacy.max_epsilon 3":  # a budget almost spent: one more round does not fit
        SiteAccountant(tmp_path).record_round(
            round=1,
            steps=60,
            sample_rate=1 / 3,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=1e-5,
            study="earlier",
        )
    before = SiteAccountant(tmp_path).ledger.entries()

    reply = _train(rt, config)

    reason = reply[Rec.SITE][Site.REFUSED]
    assert field in reason, reason
    assert "This site trains only with differential privacy" in reason  # and says what it allows
    assert Rec.ARRAYS not in reply
    assert SiteAccountant(tmp_path).ledger.entries() == before
    assert not (tmp_path / PROFILES_DIR).exists()  # nor a profile of its images: a refusal writes nothing


def test_a_request_at_the_policys_limits_trains_and_is_counted(tmp_path):
    rt = _runtime(tmp_path, max_epsilon=10.0)

    reply = _train(rt, _private())

    assert reply[Rec.SITE][Site.REFUSED] == "" and Rec.ARRAYS in reply
    assert [e.kind for e in SiteAccountant(tmp_path).ledger.entries()] == ["count", "train"]
    assert len(list((tmp_path / PROFILES_DIR).glob("*.json"))) == 1  # drift's reference, once trained
    assert 0 < reply[Rec.METRICS][Met.EPSILON] <= 10.0


def test_a_refusal_that_tells_of_the_noised_count_is_charged_and_the_count_is_not_drawn_again(tmp_path):
    """Attack (an independent review's): a budget refusal names the round's sample rate, 1 / ceil(count
    / batch), so at batch 1 it reads off the site's noised training-set size. When every refused
    request drew the count afresh, uncharged, a coordinator asking again and again (under new study
    ids) averaged the noise away: 300 refusals put a 57-image site at 57.1 +- 0.6 with nothing in the
    ledger. The count is now charged when drawn, and asked again in a study the site answers with the
    count it drew; a new study is a new release, paid from the same budget until none is left."""
    rt = _runtime(tmp_path, max_epsilon=1.0, min_noise_multiplier=0.5)
    config = _private(noise_multiplier=0.5) | round_config(dp_enabled=True, batch_size=1, local_epochs=100)
    accountant = SiteAccountant(tmp_path)

    first, again = (_train(rt, config)[Rec.SITE][Site.REFUSED] for _ in range(2))

    (count,) = accountant.ledger.entries()
    assert (
        count.kind == "count"
        and "privacy.max_epsilon" in first
        and f"sample rate {1 / count.value:g}" in first
    )
    assert again == first  # the same count: nothing new to average
    studies = 1
    while "training-set size" not in (
        refusal := _train(rt, config | {"study-id": f"study-{studies}"})[Rec.SITE][Site.REFUSED]
    ):
        assert "privacy.max_epsilon" in refusal
        studies += 1
        assert studies < 100
    assert "releasing this study's training-set size (noise 10) would take the site past" in refusal
    counts = [e for e in accountant.ledger.entries() if e.kind == "count"]
    assert len(counts) == studies >= 2 and len({e.study for e in counts}) == studies
    assert accountant.epsilon(1e-5) <= 1.0  # every count that left is paid for, within the budget


def test_a_target_epsilon_the_count_alone_would_spend_is_refused_before_the_count_is_drawn(tmp_path):
    rt = _runtime(tmp_path, max_epsilon=50.0)
    config = round_config(dp_enabled=True, batch_size=16) | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=0.0, target_epsilon=1e-3)
    )

    reply = _train(rt, config)

    assert "leaves nothing for training" in reply[Rec.SITE][Site.REFUSED]
    assert SiteAccountant(tmp_path).ledger.entries() == []  # nothing drawn, nothing charged


def test_a_round_takes_and_counts_the_steps_and_sample_rate_its_budget_check_planned(tmp_path):
    """93 batches an epoch: Opacus's Poisson loader took int(1 / (1 / 93)) = 92 steps and its accountant
    counted 1 / 92, so the ledger held more than the budget check had allowed (found by an independent
    review). The study's count (93 at batch 1) is out already, so the plan is known exactly."""
    rt = _runtime(tmp_path, max_epsilon=50.0)
    accountant = SiteAccountant(tmp_path)
    accountant.record_round(round=0, kind="count", value=93.0, steps=1, sample_rate=1.0, noise_multiplier=10.0,
                            max_grad_norm=1.0, delta=1e-5, study="test-study")  # fmt: skip
    config = _private() | round_config(dp_enabled=True, batch_size=1, study_id="test-study")

    reply = _train(rt, config)

    assert reply[Rec.SITE][Site.REFUSED] == ""
    assert (reply[Rec.METRICS][Met.STEPS], reply[Rec.METRICS][Met.SAMPLE_RATE]) == (93, 1 / 93)
    trained = accountant.ledger.entries()[-1]
    assert (trained.kind, trained.steps, trained.sample_rate) == ("train", 93, 1 / 93)


def test_a_study_id_of_any_characters_names_one_file_in_the_state_folder(tmp_path):
    """The coordinator names the study; the site keeps a record per study under that name, for drift
    monitoring. For a 300-byte id the file system refused the name ('File name too long'), so the
    study had no reference profile (an independent review found it). 249 characters, 489 bytes."""
    rt = _runtime(tmp_path, max_epsilon=50.0)
    study_id = "../" * 3 + "é" * 240

    reply = _train(rt, _private() | {"study-id": study_id})

    assert reply[Rec.SITE][Site.REFUSED] == ""
    (record,) = (tmp_path / PROFILES_DIR).glob("*.json")  # the study's record, beside the data profiles
    assert record == profile_path(tmp_path, study_id) and len(record.name.encode()) < 255
    assert json.loads(record.read_text())["study_id"] == study_id


def test_a_study_id_longer_than_a_site_keeps_is_refused_before_anything(tmp_path):
    """Every ledger line holds its study's id, and the ledger is read whole before each line: a
    coordinator's 500 KB id would make each of its lines that long."""
    rt = _runtime(tmp_path, max_epsilon=50.0, required=False)
    config = _private() | {"study-id": "x" * 257}

    trained = _train(rt, config)
    msg = Message(RecordDict({Rec.ARRAYS: ArrayRecord(build_model("cnn28").state_dict()),
                              Rec.CONFIG: ConfigRecord(config)}), dst_node_id=1, message_type=MessageType.EVALUATE)  # fmt: skip
    evaluated = handle_evaluate(msg, rt).content

    for reply in (trained, evaluated):
        assert "257 characters" in reply[Rec.SITE][Site.REFUSED]
    assert SiteAccountant(tmp_path).ledger.entries() == []
    assert not (tmp_path / PROFILES_DIR).exists()


def test_a_site_that_allows_non_private_training_trains_without_it(tmp_path):
    rt = _runtime(tmp_path, required=False)

    reply = _train(rt, round_config(dp_enabled=False))

    assert reply[Rec.SITE][Site.REFUSED] == "" and Rec.ARRAYS in reply
    assert reply[Rec.METRICS][Met.NUM_EXAMPLES] == 48
    (line,) = SiteAccountant(tmp_path).ledger.entries()  # written before the exact reply left
    assert (line.kind, line.noise_multiplier, line.max_grad_norm) == ("train-nonprivate", 0.0, 0.0)


def test_after_a_round_without_privacy_the_site_reports_its_epsilon_as_unbounded(tmp_path):
    """The exact release is in the ledger: every later reply (a refusal, a private round) says the
    training images' epsilon is infinite, while the budget check still bounds what DP rounds spend."""
    rt = _runtime(tmp_path, required=False, max_epsilon=50.0)
    assert _train(rt, round_config(dp_enabled=False))[Rec.SITE][Site.REFUSED] == ""

    refused = _train(rt, _private(noise_multiplier=0.5))  # less noise than the policy
    private = _train(rt, _private())

    assert "min_noise_multiplier" in refused[Rec.SITE][Site.REFUSED]
    assert refused[Rec.METRICS][Met.EPSILON] == float("inf")
    assert private[Rec.SITE][Site.REFUSED] == "" and private[Rec.METRICS][Met.EPSILON] == float("inf")
    accountant = SiteAccountant(tmp_path)
    assert 0 < accountant.epsilon(1e-5) < 50.0  # the private lines, which max_epsilon bounds
    assert accountant.spent(1e-5) == float("inf")


def test_the_coordinators_seed_does_not_decide_the_noise(tmp_path):
    rt = _runtime(tmp_path, max_epsilon=50.0)
    config = _private() | {"seed": 7}

    first, second = (_train(rt, config)[Rec.ARRAYS].to_torch_state_dict() for _ in range(2))

    assert not all((first[k] == second[k]).all() for k in first)  # same inputs, fresh noise


def test_a_malformed_privacy_request_is_refused_not_a_crash(tmp_path):
    rt = _runtime(tmp_path)
    config = _private()
    config[PrivacyKey.MAX_GRAD_NORM] = "large"

    reply = _train(rt, config)

    assert "dp-max-grad-norm" in reply[Rec.SITE][Site.REFUSED]


@pytest.mark.parametrize(
    ("asked", "field"),
    [
        ({"local_epochs": 10_000_000}, "limits.max_local_epochs 100"),
        ({"augment_views": 100_000, "augment": True}, "limits.max_augment_views 32"),
        ({"batch_size": 0}, "batch_size 0 is not a positive number"),
        # a review's attack on memory: the whole data set's 32 views in one step (tens of GB)
        ({"batch_size": 10**6, "augment_views": 32, "augment": True}, "limits.max_step_images 2048"),
        (
            {"batch_size": 4096, "max_physical_batch": 128, "augment_views": 32, "augment": True},
            "limits.max_step_images 2048",
        ),
    ],  # fmt: skip
    ids=["epochs", "views", "no-batch", "memory", "memory-physical"],
)
def test_a_round_asking_more_work_than_the_sites_limits_is_refused_before_any(tmp_path, asked, field):
    """A coordinator that asks for ten million local epochs at a noise so high the budget allows
    them (the review's attack: epsilon 0.4 for 4e8 steps) would hold the site, and the ledger's lock
    every other study waits for, for ever; the site's own limits refuse it first."""
    rt = _runtime(tmp_path, max_epsilon=1.0, min_noise_multiplier=1.0)
    config = _private(noise_multiplier=1e4) | round_config(**{"dp_enabled": True, "batch_size": 1, **asked})

    t0 = time.perf_counter()
    reply = _train(rt, config)

    assert field in reply[Rec.SITE][Site.REFUSED] and Rec.ARRAYS not in reply
    assert time.perf_counter() - t0 < 30 and SiteAccountant(tmp_path).ledger.entries() == []


def test_a_large_logical_batch_cut_into_physical_ones_within_the_limit_trains(tmp_path):
    rt = _runtime(tmp_path, max_epsilon=50.0)
    config = _private() | round_config(dp_enabled=True, batch_size=4096, max_physical_batch=16)

    reply = _train(rt, config)

    assert reply[Rec.SITE][Site.REFUSED] == "" and Rec.ARRAYS in reply


def test_a_sites_own_limits_come_from_its_config(tmp_path):
    (tmp_path / "site.yaml").write_text(
        "site: hospital-a\ndata: {format: synthetic}\nlimits: {max_local_epochs: 2}\n"
        f"state_dir: {tmp_path / 'state'}\nprivacy: {{required: false}}\n"
    )
    rt = SiteRuntime.load(load_site(tmp_path / "site.yaml"))

    refused = _train(rt, round_config(dp_enabled=False, local_epochs=3))[Rec.SITE][Site.REFUSED]
    trained = _train(rt, round_config(dp_enabled=False, local_epochs=2))

    assert "local_epochs 3 is more than this site's limits.max_local_epochs 2" in refused
    assert trained[Rec.SITE][Site.REFUSED] == "" and Rec.ARRAYS in trained


@pytest.mark.parametrize("value", ["0", "-5", "2.5"])
def test_a_site_limit_that_is_not_a_whole_number_of_at_least_one_is_named(tmp_path, value):
    (tmp_path / "site.yaml").write_text(
        f"site: hospital-a\ndata: {{format: synthetic}}\nlimits: {{max_images_per_patient: {value}}}\n"
    )
    with pytest.raises(ConfigError, match="limits.max_images_per_patient"):
        load_site(tmp_path / "site.yaml")
