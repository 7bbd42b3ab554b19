"""FedBN-style personalization (`strategy.local_norm`): a site trains with and evaluates on its own
normalization parameters, keeps them in its state folder, and its replies carry them exactly as it
received them, private rounds included (checked on the Flower messages it sends)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import handle_evaluate, handle_train
from client.ledger import SiteAccountant
from client.local_norm import load_local, norm_keys
from client.site import SiteRuntime
from common.keys import Met, Rec
from common.models import build_model
from common.privacy import request_config
from common.schema import (
    EvaluationPolicyConfig,
    PrivacyConfig,
    SiteConfig,
    SiteDataConfig,
    SitePolicyConfig,
    SyntheticConfig,
)
from tests.plans import round_config


def _site(tmp_path) -> SiteRuntime:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
        1,
        1,
        1,
    )  # what Flower sets for a message
    data = SiteDataConfig(
        format="synthetic", synthetic=SyntheticConfig(train_per_site=64, test_per_site=40, val_per_site=0)
    )
    policy = SitePolicyConfig(
        required=False, max_epsilon=50.0, evaluation=EvaluationPolicyConfig(release="exact")
    )
    return SiteRuntime.load(SiteConfig(site="a", data=data, privacy=policy, state_dir=str(tmp_path)))


def _message(config: dict, weights: dict) -> Message:
    content = RecordDict({Rec.ARRAYS: ArrayRecord(weights), Rec.CONFIG: ConfigRecord(config)})
    return Message(content=content, message_type="train", dst_node_id=1)


def test_the_normalization_parameters_stay_at_the_site_and_go_back_as_received(tmp_path):
    site = _site(tmp_path)
    model = build_model("cnn28", seed=0)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    keys = norm_keys(model)
    assert keys and all(k.endswith((".weight", ".bias")) for k in keys)
    config = round_config(local_norm=True, local_epochs=2, lr=0.01, study_id="fedbn-1")
    reply = handle_train(_message(config, sent), site)
    back = reply.content[Rec.ARRAYS].to_torch_state_dict()
    for k in keys:  # on the message: exactly what the coordinator sent
        assert torch.equal(back[k], sent[k]), k
    assert any(not torch.equal(back[k], sent[k]) for k in sent if k not in keys)  # the rest trained
    own = load_local(str(tmp_path), "fedbn-1")
    assert set(own) == set(keys) and any(not torch.equal(own[k], sent[k]) for k in keys)  # trained, kept here

    # the site evaluates with its own normalization, not the global one
    evaluated = handle_evaluate(_message(config, back), site)
    assert evaluated.content[Rec.SITE]["refused"] == ""
    for k in keys:
        assert torch.equal(site.model.state_dict()[k].cpu(), own[k])
    plain = handle_evaluate(_message(round_config(local_epochs=2, study_id="fedbn-1"), back), site)
    assert plain.content[Rec.METRICS][Met.AUC] != evaluated.content[Rec.METRICS][Met.AUC]


def test_a_private_round_keeps_them_too_and_is_accounted(tmp_path):
    site = _site(tmp_path)
    sent = build_model("cnn28", seed=0).state_dict()
    privacy = request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0))
    config = {**round_config(local_norm=True, dp_enabled=True, study_id="fedbn-dp"), **privacy}
    reply = handle_train(_message(config, sent), site)
    assert reply.content[Rec.SITE]["refused"] == ""
    back = reply.content[Rec.ARRAYS].to_torch_state_dict()
    assert all(torch.equal(back[k], sent[k]) for k in norm_keys(build_model("cnn28")))
    lines = [e for e in SiteAccountant(str(tmp_path)).ledger.entries() if e.study == "fedbn-dp"]
    assert [e.kind for e in lines] == ["count", "train"] and np.isfinite(lines[-1].epsilon)
