"""SCAFFOLD's drift correction at a site (client.scaffold_correction): applied after every step, outside DP-SGD's
clipped and noised gradient, and refused, naming the key, when it does not fit the model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from client.dp import PoissonPlan
from client.ledger import LEDGER_FILENAME
from client.randomness import RoundRandomness
from client.scaffold_correction import correction_problem
from client.site import SiteRuntime
from client.train import DPSettings, train_round
from common.keys import CORRECTION_PREFIX, Met
from common.models import build_model
from common.privacy import PrivacyRequest, request_config
from common.schema import PrivacyConfig, SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig
from common.synthetic import synthetic_images
from tests.plans import plan, round_config

N = 32


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = synthetic_images(N, 0.5, 28, np.random.default_rng(0))
    return torch.from_numpy(x)[:, None], torch.from_numpy(y)


def _private_round(correction: dict | None) -> torch.Tensor:
    """One DP-SGD step over every image (Poisson rate 1), plain SGD, noise from a fixed seed."""
    x, y = _data()
    model = build_model("cnn28", seed=2)
    settings = DPSettings(
        PrivacyRequest(noise_multiplier=1.0, max_grad_norm=0.01, delta=1e-5),
        poisson=PoissonPlan(1.0, float(N)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_round(model, x, y, plan(optimizer="sgd", lr=0.1, batch_size=N, dp_enabled=True),
                             randomness=RoundRandomness.repeatable(5, 1), dp=settings, correction=correction)  # fmt: skip
    assert result.steps == 1
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def test_under_dp_the_correction_moves_the_model_by_exactly_lr_times_it_outside_the_clip():
    """The coordinator chooses the correction. If it entered the per-sample clipped gradient, a huge one
    would be clipped to max_grad_norm; applied after the noised step it is post-processing: the model
    moves by exactly lr x correction more, and the clipped, noised part stays what it was."""
    names = [n for n, _ in build_model("cnn28").named_parameters()]
    huge = {n: torch.full_like(p, 50.0) for n, p in build_model("cnn28").named_parameters()}
    without, with_it = _private_round(None), _private_round(huge)
    shift = torch.cat([huge[n].flatten() for n in names]) * 0.1
    assert torch.allclose(without - with_it, shift, atol=1e-4)  # 50 x 0.1 on every weight, not clipped


def _site(tmp_path: Path, private: bool = True) -> SiteConfig:
    data = SiteDataConfig(format="synthetic", synthetic=SyntheticConfig(train_per_site=N, test_per_site=8))
    return SiteConfig(site="hospital-a", data=data, privacy=SitePolicyConfig(required=private, max_epsilon=50.0, delta=1e-5),
                      state_dir=str(tmp_path / "state"))  # fmt: skip


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c.update({"head.weight": c["head.weight"] * np.nan}), "'head.weight' holds NaN"),
        (lambda c: c.update({"head.bias": torch.zeros(7)}), "'head.bias' is [7]"),
        (lambda c: c.pop("head.bias"), "missing ['head.bias']"),
        (lambda c: c.update({"not.a.weight": torch.zeros(1)}), "not parameters ['not.a.weight']"),
        (
            lambda c: c.update({"head.bias": torch.full((2,), 1e300, dtype=torch.float64)}),
            "'head.bias' holds NaN",
        ),
        (lambda c: c.update({"head.bias": torch.zeros(2, dtype=torch.int64)}), "'head.bias' is torch.int64"),
    ],
)
def test_a_correction_that_does_not_fit_is_refused_naming_the_key_and_nothing_is_charged(
    tmp_path, change, named
):
    site = _site(tmp_path)
    weights = build_model("cnn28", seed=1).state_dict()
    correction = {n: torch.zeros_like(p) for n, p in build_model("cnn28").named_parameters()}
    change(correction)
    arrays = weights | {CORRECTION_PREFIX + k: v for k, v in correction.items()}
    config = round_config(dp_enabled=True) | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-5)
    )
    reply = SiteRuntime.load(site).train(config, arrays)
    assert reply.weights is None and named in reply.refused and "hospital-a" in reply.refused
    assert not (Path(site.state_dir) / LEDGER_FILENAME).exists()  # refused before any private step


def test_a_correction_beside_site_local_normalization_is_refused(tmp_path):
    """A site keeps its own normalization parameters (local-norm): a coordinator's correction must not
    move them, whatever study config it claims."""
    site = _site(tmp_path, private=False)
    zero = {CORRECTION_PREFIX + n: torch.zeros_like(p) for n, p in build_model("cnn28").named_parameters()}
    reply = SiteRuntime.load(site).train(
        round_config(local_norm=True), build_model("cnn28").state_dict() | zero
    )
    assert reply.weights is None and "local-norm" in reply.refused


def test_a_plain_round_with_a_zero_correction_trains_as_without_one_and_reports_its_steps(tmp_path):
    site = _site(tmp_path, private=False)
    weights = build_model("cnn28", seed=1).state_dict()
    zero = {CORRECTION_PREFIX + n: torch.zeros_like(p) for n, p in build_model("cnn28").named_parameters()}
    plain = SiteRuntime.load(site).train(round_config(), dict(weights))
    corrected = SiteRuntime.load(site).train(round_config(), weights | zero)
    assert not corrected.refused and plain.metrics[Met.STEPS] == corrected.metrics[Met.STEPS] == N // 8
    assert set(corrected.weights) == set(weights)  # the reply carries the model only
    assert all(torch.equal(plain.weights[k], corrected.weights[k]) for k in weights)
    assert (
        correction_problem(build_model("cnn28"), {k[len(CORRECTION_PREFIX) :]: v for k, v in zero.items()})
        is None
    )
