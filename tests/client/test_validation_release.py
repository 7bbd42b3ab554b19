"""A coordinator that asks again and again for the validation split's evaluation (the operating point's
data) gets no more than the site's evaluation budget allows: each release is noised afresh and charged
to the same ledger and budget as test evaluations, replaying a round number buys nothing, and once the
budget is spent neither split is released."""

from __future__ import annotations

from dataclasses import replace

from client.ledger import SiteAccountant
from client.site import SiteRuntime
from client.train import predict as PREDICT
from common.keys import Cfg, Met
from common.models import build_model
from common.privacy import rdp_epsilon
from common.schema import (
    EvaluationPolicyConfig,
    SiteConfig,
    SiteDataConfig,
    SitePolicyConfig,
    SyntheticConfig,
)
from tests.plans import round_config


def _site(tmp_path) -> SiteRuntime:
    data = SiteDataConfig(
        format="synthetic", synthetic=SyntheticConfig(train_per_site=32, test_per_site=40, val_per_site=40)
    )
    policy = SitePolicyConfig(
        evaluation=EvaluationPolicyConfig(release="dp_histogram", noise=2.0, max_epsilon=5.0)
    )
    return SiteRuntime.load(SiteConfig(site="hospital-a", data=data, privacy=policy, state_dir=str(tmp_path)))


def test_repeated_validation_requests_are_each_charged_until_the_budget_refuses(tmp_path):
    site, weights = _site(tmp_path), build_model("cnn28", seed=0).state_dict()
    ask_val = round_config(round=7) | {Cfg.EVAL_SPLIT: "val"}  # the same round, asked again and again
    replies = [site.evaluate(ask_val, weights) for _ in range(6)]

    released = [r for r in replies if not r.refused]
    entries = [e for e in SiteAccountant(str(tmp_path)).ledger.entries() if e.kind == "evaluation"]
    assert 2 <= len(released) < 6 and len(entries) == len(released)  # one ledger line per release
    spent = rdp_epsilon([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], delta=1e-5)
    assert spent <= 5.0 and "privacy.evaluation.max_epsilon 5" in replies[-1].refused
    hists = [r.metrics[Met.SCORE_HIST] for r in released]
    assert hists[0] != hists[1]  # fresh noise each time, not one draw repeated

    test_reply = site.evaluate(round_config(round=8), weights)  # the test split shares the budget
    assert test_reply.refused and "evaluation epsilon" in test_reply.refused
    assert len([e for e in SiteAccountant(str(tmp_path)).ledger.entries() if e.kind == "evaluation"]) == len(
        entries
    )


def test_a_patient_level_site_releases_its_validation_split_per_patient(tmp_path):
    site, weights = _site(tmp_path), build_model("cnn28", seed=0).state_dict()
    d = site.data
    with_patients = dict(train_patients=[f"P{i // 3}" for i in range(len(d.train_y))],
                         test_patients=[f"T{i // 3}" for i in range(len(d.test_y))])  # fmt: skip
    ask_val = round_config(round=1) | {Cfg.EVAL_SPLIT: "val"}

    site.data = replace(d, **with_patients)  # validation images without their patients: refused
    assert "no patient list" in site.evaluate(ask_val, weights).refused
    site.data = replace(d, **with_patients, val_patients=[f"V{i // 3}" for i in range(len(d.val_y))])
    reply = site.evaluate(ask_val, weights)
    assert not reply.refused and reply.metrics[Met.PRIVACY_UNIT] == 1  # released per patient


def test_once_the_budget_is_spent_a_refusal_predicts_on_no_image(tmp_path, monkeypatch):
    """A refusal must take as long with 40 test images as with 4000: were the images predicted first,
    its duration would tell their exact number to a coordinator's app timing it, uncharged."""
    import client.site

    site, weights = _site(tmp_path), build_model("cnn28", seed=0).state_dict()
    predicted: list[int] = []

    def counting_predict(model, x, *args, **kwargs):
        predicted.append(len(x))
        return PREDICT(model, x, *args, **kwargs)

    monkeypatch.setattr(client.site, "predict", counting_predict)
    replies = [site.evaluate(round_config(round=r), weights) for r in range(1, 7)]

    refused = [r for r in replies if r.refused]
    assert refused and all("evaluation epsilon" in r.refused for r in refused)
    assert predicted == [40] * (len(replies) - len(refused))  # the released ones only
