"""Site-side DP building blocks: privacy request, site policy, ledger, accountant, Opacus wrapping.

Real Opacus and MONAI throughout, on a few tiny random batches (the whole file runs in seconds).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from monai.networks.nets import resnet10
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator, register_module_validator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import PoissonPlan, make_private
from client.ledger import (
    LEDGER_FILENAME,
    LedgerEntry,
    LedgerError,
    LedgerWarning,
    PrivacyLedger,
    SiteAccountant,
)
from client.policy import SitePolicy
from common.opacus_compat import IncompatibleModelError, make_opacus_compatible
from common.privacy import (
    PrivacyConfigError,
    PrivacyRequest,
    derive_noise_multiplier,
    rdp_epsilon,
    request_config,
)

DELTA = 1e-5
# One round at a site: 50 steps at sample rate 0.02 (batch 64 of 3200 examples, one epoch).
ROUND = {"steps": 50, "sample_rate": 0.02, "noise_multiplier": 1.0, "max_grad_norm": 1.0}


def record(acc: SiteAccountant, rnd: int, **overrides) -> LedgerEntry:
    return acc.record_round(round=rnd, delta=DELTA, **{**ROUND, **overrides})


def policy(**overrides) -> SitePolicy:
    limits = dict(max_epsilon=8.0, delta=DELTA, min_noise_multiplier=0.8, max_grad_norm=1.5)
    return SitePolicy(**{**limits, **overrides})


# --- common.privacy -------------------------------------------------------------------------


def test_the_coordinators_privacy_request_travels_in_a_flower_config_record():
    from flwr.app import ConfigRecord

    from common.schema import PrivacyConfig

    asked = PrivacyConfig(
        enabled=True,
        noise_multiplier=1.1,
        max_grad_norm=0.5,
        delta=1e-6,
        target_epsilon=4.0,
    )
    record_ = ConfigRecord(request_config(asked))
    back = PrivacyRequest.from_config(dict(record_) | {"lr": 0.01}, sample_rate=0.1, steps_total=10)

    assert back == PrivacyRequest(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-6, target_epsilon=4.0)
    assert all(isinstance(v, int | float | str | bool) for v in request_config(asked).values())


def test_without_a_noise_multiplier_the_site_derives_it_for_the_whole_study():
    from common.schema import PrivacyConfig

    config = request_config(PrivacyConfig(enabled=True, target_epsilon=3.0, delta=1e-5))
    assert "dp-noise-multiplier" not in config

    request = PrivacyRequest.from_config(config, sample_rate=0.02, steps_total=500)

    assert request.noise_multiplier == derive_noise_multiplier(
        target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps_total=500
    )
    assert rdp_epsilon([(request.noise_multiplier, 0.02, 500)], delta=1e-5) <= 3.0 + 0.01


def test_privacy_request_rejects_missing_and_invalid_settings():
    from common.schema import PrivacyConfig

    config = request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0))
    del config["dp-max-grad-norm"]

    with pytest.raises(PrivacyConfigError, match="dp-max-grad-norm"):
        PrivacyRequest.from_config(config, sample_rate=0.1, steps_total=10)
    with pytest.raises(PrivacyConfigError, match="grad_sample_mode"):
        PrivacyRequest(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode="x")
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        PrivacyRequest(noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5)


def test_derive_noise_multiplier_meets_the_whole_study_target():
    one_round = 50
    study = 10 * one_round  # 10 rounds x 1 epoch x 50 steps

    sigma_study = derive_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.02, steps_total=study
    )
    sigma_round = derive_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=0.02, steps_total=one_round
    )

    eps = rdp_epsilon([(sigma_study, 0.02, study)], delta=DELTA)
    assert 3.0 - 0.01 <= eps <= 3.0
    # the noise of one round, kept for ten, would overspend: the whole study needs more
    assert rdp_epsilon([(sigma_round, 0.02, study)], delta=DELTA) > 3.0
    assert sigma_study > sigma_round


def test_make_opacus_compatible_on_monai_resnet_is_deterministic_and_trainable():
    def build() -> nn.Module:
        torch.manual_seed(0)
        return resnet10(spatial_dims=2, n_input_channels=1, num_classes=2)

    original = build()
    assert any(isinstance(m, nn.BatchNorm2d) for m in original.modules())

    first, second = make_opacus_compatible(build()), make_opacus_compatible(build())

    shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in second.state_dict().items()}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in first.modules())
    n_batchnorm = sum(isinstance(m, nn.BatchNorm2d) for m in original.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in first.modules()) == n_batchnorm == 12
    assert ModuleValidator.validate(first, strict=False) == []
    # Opacus's backward hooks forbid in-place writes (ReLU(inplace=True), `out += residual`):
    # validate() does not see those, so train one real DP step to prove they are gone.
    dp = make_private(
        noise_generator=torch.Generator().manual_seed(0),
        model=first,
        optimizer=torch.optim.SGD(first.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(4, 1, 32, 32), torch.tensor([0, 1] * 2))),
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="hooks",
        poisson_sampling=False,
    )
    x, y = next(iter(dp.data_loader))
    dp.criterion(dp.model(x), y).backward()
    dp.optimizer.step()
    assert dp.steps == 1


class _Unfixable(nn.Linear):
    """A layer Opacus is told it cannot train and has no fixer for."""


@register_module_validator(_Unfixable)
def _refuse(module: _Unfixable) -> list[UnsupportedModuleError]:
    return [UnsupportedModuleError("_Unfixable layers are not supported")]


def test_make_opacus_compatible_reports_opacus_reasons():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), _Unfixable(4, 2))

    with pytest.raises(IncompatibleModelError, match="_Unfixable layers are not supported") as e:
        make_opacus_compatible(model)

    assert isinstance(e.value, ValueError)
    assert "Replace these layers" in str(e.value)


# --- client.policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (dict(noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5), ["noise", "0.5", "0.8"]),
        (dict(noise_multiplier=1.0, max_grad_norm=2.0, delta=1e-5), ["max_grad_norm", "2", "1.5"]),
        (dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3), ["delta", "0.001", "1e-05"]),
    ],
)
def test_policy_refuses_weaker_settings_and_says_which(request_, words):
    reason = policy().check(PrivacyRequest(**request_))

    assert reason is not None
    assert all(w in reason for w in words), reason


def test_policy_accepts_settings_at_its_limits():
    request = PrivacyRequest(noise_multiplier=0.8, max_grad_norm=1.5, delta=1e-5)

    assert policy().check(request) is None


def test_budget_refusal_when_the_next_round_would_exceed_max_epsilon(tmp_path):
    acc = SiteAccountant(tmp_path)
    record(acc, 1)
    eps_1 = acc.epsilon(DELTA)
    eps_2 = rdp_epsilon([*acc.history()] * 2, delta=DELTA)
    limit = (eps_1 + eps_2) / 2  # room for part of a round, not a whole one
    site = policy(max_epsilon=limit)
    history = acc.history()

    reason = site.would_exceed_budget(history, [(1.0, 0.02, 50)])
    small = site.would_exceed_budget(history, [(1.0, 0.02, 1)])

    assert reason is not None and f"{eps_2:.3f}" in reason and f"{limit:g}" in reason
    assert small is None
    assert history == acc.history() == [(1.0, 0.02, 50)]  # nothing recorded or mutated
    assert site.projected_epsilon(history, [(1.0, 0.02, 50)]) == pytest.approx(eps_2)
    assert "privacy.max_epsilon" in reason


# --- client.ledger --------------------------------------------------------------------------


def test_ledger_round_trip_and_append_is_fsynced(tmp_path, monkeypatch):
    ledger = PrivacyLedger(tmp_path / "site" / LEDGER_FILENAME)
    entry = LedgerEntry(round=1, epsilon=0.5, delta=DELTA, time="2025-01-01T00:00:00+00:00", **ROUND)
    synced: list[tuple[int, int]] = []  # (inode, size on disk) at each fsync
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    ledger.append(entry)
    ledger.append(LedgerEntry(**{**entry.__dict__, "round": 2, "epsilon": 0.7}))

    lines = ledger.path.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert set(json.loads(lines[0])) == {
        "round",
        "study",
        "kind",
        "value",
        "repeatable",
        "attempt",
        "steps",
        "sample_rate",
        "noise_multiplier",
        "max_grad_norm",
        "delta",
        "epsilon",
        "time",
    }
    assert PrivacyLedger(ledger.path).entries()[0] == entry
    inode, size = ledger.path.stat().st_ino, ledger.path.stat().st_size
    file_syncs = [s for s in synced if s[0] == inode]
    assert len(file_syncs) == 2 and file_syncs[-1][1] == size  # the whole line, before returning


def test_ledger_epsilon_equals_a_fresh_rdp_accountant_fed_the_same_steps(tmp_path):
    acc = SiteAccountant(tmp_path)
    rounds = [(1, 1.0, 0.02, 50), (2, 1.2, 0.02, 50), (3, 1.2, 0.025, 40)]
    for rnd, sigma, q, steps in rounds:
        record(acc, rnd, noise_multiplier=sigma, sample_rate=q, steps=steps)
    reference = RDPAccountant()  # stepped as Opacus's optimizer hook steps it during training
    for _, sigma, q, steps in rounds:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)

    eps = acc.ledger.epsilon(DELTA)

    assert eps == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-12)
    assert acc.ledger.entries()[-1].epsilon == pytest.approx(eps, rel=1e-12)
    assert acc.history() == [(1.0, 0.02, 50), (1.2, 0.02, 50), (1.2, 0.025, 40)]


def test_rdp_epsilon_merges_repeated_rounds_exactly_as_opacus_counts_them():
    """rdp_epsilon sums the steps of entries with the same (noise, rate): RDP is linear in steps."""
    history = [(2.6, 0.5, 2), (1.1, 0.05, 40)] * 15 + [(2.6, 0.5, 1), (0.9, 0.1, 7)]
    reference = RDPAccountant()
    reference.history = list(history)
    assert rdp_epsilon(history, delta=DELTA) == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-12)
    assert rdp_epsilon(history[:1], delta=DELTA) < rdp_epsilon(history[:3], delta=DELTA)
    assert rdp_epsilon([], delta=DELTA) == 0.0


def test_epsilon_after_three_rounds_exceeds_epsilon_after_one(tmp_path):
    acc = SiteAccountant(tmp_path)
    eps_1 = record(acc, 1).epsilon
    record(acc, 2)
    eps_3 = record(acc, 3).epsilon

    assert eps_3 == pytest.approx(rdp_epsilon([(1.0, 0.02, 50)] * 3, delta=DELTA))
    assert 0 < eps_1 < eps_3 <= 3 * eps_1  # composition: more than one round, at most three times it


def test_a_restarted_site_continues_its_epsilon(tmp_path):
    first_process = SiteAccountant(tmp_path)
    record(first_process, 1)
    record(first_process, 2)
    eps_before = first_process.epsilon(DELTA)

    restarted = SiteAccountant(tmp_path)  # a new process: nothing in memory but the folder
    eps_restarted = restarted.epsilon(DELTA)
    entry = record(restarted, 3)

    assert eps_before > 0 and eps_restarted == eps_before
    assert restarted.history() == [(1.0, 0.02, 50)] * 3
    assert entry.epsilon == pytest.approx(rdp_epsilon([(1.0, 0.02, 150)], delta=DELTA))
    assert entry.epsilon > eps_before


def test_ledger_never_double_counts_but_a_retrained_round_still_counts(tmp_path):
    acc = SiteAccountant(tmp_path)
    record(acc, 1)
    first = record(acc, 2)

    with pytest.raises(LedgerError, match="round 2 attempt 1 is already recorded"):
        record(acc, 2)
    with pytest.raises(LedgerError, match="rounds must increase"):
        record(acc, 1)
    retried = record(acc, 2, retry=True)  # round 2's update was lost; the site trained it again

    assert retried.attempt == 2
    assert len(acc.history()) == 3
    assert retried.epsilon > first.epsilon
    assert acc.epsilon(DELTA) == pytest.approx(rdp_epsilon([(1.0, 0.02, 150)], delta=DELTA))


def test_torn_last_line_is_reported_then_cut_and_a_damaged_line_raises(tmp_path):
    acc = SiteAccountant(tmp_path)
    record(acc, 1)
    eps_1 = acc.epsilon(DELTA)
    with open(acc.ledger.path, "ab") as f:  # the process died halfway through appending round 2
        f.write(b'{"round": 2, "steps": 50, "sample_ra')

    with pytest.warns(LedgerWarning, match=rf"{LEDGER_FILENAME}:2: torn last line"):
        assert acc.epsilon(DELTA) == pytest.approx(eps_1)
    with pytest.warns(LedgerWarning):
        record(acc, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn bytes are gone: no more warnings
        assert [e.round for e in acc.ledger.entries()] == [1, 2]

    lines = acc.ledger.path.read_text().splitlines()
    acc.ledger.path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(LedgerError, match=rf"{LEDGER_FILENAME}:2: not a valid privacy ledger"):
        acc.ledger.entries()


# --- client.dp ------------------------------------------------------------------------------


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return make_opacus_compatible(
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.GroupNorm(4, 8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.GroupNorm(4, 8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 2),
        )
    )


def _data(n: int = 48) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 2)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_tiny_dp_training_run_counts_its_steps_and_spends_epsilon(mode, tmp_path):
    model = _tiny_cnn()
    keys = list(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]

    with pytest.warns(UserWarning, match="Secure RNG turned off"):  # Opacus's, not silenced
        dp = make_private(
            noise_generator=torch.Generator().manual_seed(0),
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=16),
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
        )
    for x, y in dp.data_loader:  # 3 Poisson-sampled batches
        dp.optimizer.zero_grad()
        dp.criterion(dp.model(x), y).backward()
        dp.optimizer.step()
    entry = SiteAccountant(tmp_path).record_round(round=1, delta=DELTA, **dp.spending())

    assert dp.steps == 3 and dp.sample_rate == pytest.approx(1 / 3)
    assert rdp_epsilon(dp.history(), delta=DELTA) > 0
    assert entry.epsilon == pytest.approx(rdp_epsilon(dp.history(), delta=DELTA))
    assert (entry.steps, entry.noise_multiplier, entry.max_grad_norm) == (3, 1.0, 1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert list(dp.unwrap().state_dict()) == keys


def test_ghost_and_hooks_clip_the_same_way():
    x, y = _data(8).tensors
    grads = {}
    for mode in ("ghost", "hooks"):
        model = _tiny_cnn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure RNG and non-Poisson warnings
            dp = make_private(
                noise_generator=torch.Generator().manual_seed(0),
                model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
                criterion=nn.CrossEntropyLoss(),
                noise_multiplier=1e-9,  # effectively no noise: compare clipping alone
                max_grad_norm=0.01,
                grad_sample_mode=mode,
                poisson_sampling=False,
            )
        dp.criterion(dp.model(x), y).backward()
        dp.optimizer.step()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.allclose(grads["ghost"], grads["hooks"], rtol=1e-4, atol=1e-7)
    assert grads["hooks"].norm() <= 0.01 + 1e-6  # mean of per-sample grads clipped to 0.01


def _refused_settings(**settings) -> None:
    """make_private of a small CNN with `settings` over the defaults (cross-entropy, noise 1, clip 1)."""
    model = _tiny_cnn()
    make_private(**{
        "noise_generator": torch.Generator().manual_seed(0),
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "data_loader": DataLoader(_data(), batch_size=16),
        "criterion": nn.CrossEntropyLoss(),
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        **settings,
    })  # fmt: skip


def test_ghost_clipping_refuses_a_summed_loss():
    with pytest.raises(PrivacyConfigError, match="reduction='mean'"):
        _refused_settings(criterion=nn.CrossEntropyLoss(reduction="sum"), grad_sample_mode="ghost")


def test_ghost_clipping_refuses_a_loss_that_gives_no_loss_per_sample():
    """Ghost clipping weighs each sample's loss by its clip factor; the segmentation loss (Dice, a batch
    mean whatever `reduction` says) would scale every sample by the batch's mean factor instead."""
    from client.train import SegmentationLoss

    with pytest.raises(PrivacyConfigError, match="one loss per sample.*SegmentationLoss"):
        _refused_settings(criterion=SegmentationLoss(), grad_sample_mode="ghost")


@pytest.mark.parametrize("rate", [0.6, 0.3, 0.0])
def test_a_planned_sample_rate_that_is_not_one_over_a_whole_number_of_batches_is_refused(rate):
    """An epoch is 1 / q Poisson steps; for q = 0.6 the loader would take 2 steps at 0.6 and the
    accountant count 1 / 2, less than was spent."""
    with pytest.raises(PrivacyConfigError, match="1 / a whole number of batches"):
        _refused_settings(poisson=PoissonPlan(rate, 4.0))


def test_round_order_is_checked_per_study_and_epsilon_counts_every_study(tmp_path):
    accountant = SiteAccountant(tmp_path)
    spend = dict(steps=10, sample_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    accountant.record_round(round=1, study="first", **spend)
    accountant.record_round(round=2, study="first", **spend)
    accountant.record_round(round=1, study="second", **spend)  # a new study starts at round 1
    with pytest.raises(LedgerError):
        accountant.record_round(round=1, study="second", **spend)
    assert accountant.epsilon(DELTA) == pytest.approx(rdp_epsilon([(1.0, 0.05, 10)] * 3, delta=DELTA))
