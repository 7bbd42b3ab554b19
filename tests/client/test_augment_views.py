"""Augmentation multiplicity under DP-SGD: each image's views are averaged before clipping, so an image
gives one clipped contribution, whatever its number of views; checked against per-sample clipping
done by hand; and a coordinator cannot turn it into several contributions with ghost clipping."""

from __future__ import annotations

import torch
from torch import nn

from client.dp import PoissonPlan, make_private
from client.train import augment, train_epochs, train_loader
from common.models import build_model

C = 0.05  # small enough that every image's gradient is clipped


def _by_hand(model: nn.Module, views: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum over images of clip(mean over its views of the per-view gradient), as plain autograd gives."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(y)):
        grads = []
        for view in views:
            model.zero_grad()
            nn.functional.cross_entropy(model(view[i : i + 1]), y[i : i + 1]).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        mean = {n: sum(g[n] for g in grads) / len(grads) for n in total}
        norm = torch.sqrt(sum(v.pow(2).sum() for v in mean.values()))
        factor = min(1.0, C / (float(norm) + 1e-6))  # Opacus's clipping factor
        for n in total:
            total[n] += mean[n] * factor
    return total


def test_each_images_views_are_averaged_then_clipped_once():
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
    model = build_model("cnn28", seed=0)
    reference = build_model("cnn28", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorded: list[torch.Tensor] = []

    def recording_augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = augment(xb, gen)
        recorded.append(out.detach().clone())
        return out

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = train_loader(x, y, 4, torch.Generator().manual_seed(0))
    dp = make_private(model=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
                      noise_multiplier=1e-9, max_grad_norm=C, noise_generator=torch.Generator().manual_seed(1),
                      poisson=PoissonPlan(sample_rate=1.0, expected_batch_size=4.0), grad_sample_mode="hooks")  # fmt: skip
    train_epochs(dp.model, dp.data_loader, dp.optimizer, criterion=dp.criterion, epochs=1,
                 augment_fn=recording_augment, private=True, views=3)  # fmt: skip
    assert len(recorded) == 3 and all(v.shape == x.shape for v in recorded)  # all 4 images drawn (rate 1)
    expected = _by_hand(reference, recorded, y)
    trained = dict(dp.unwrap().named_parameters())
    for n, p in trained.items():  # SGD at lr 1: the step is minus the clipped sum over the expected batch
        assert torch.allclose(before[n] - p.detach(), expected[n] / 4.0, atol=1e-6), n


def test_views_do_not_multiply_what_an_image_can_contribute():
    """Every image's gradient identical in each view and large: the step is the same with 1 or 4 views."""
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 1, 1])
    steps = []
    for views in (1, 4):
        model = build_model("cnn28", seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        dp = make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                          data_loader=train_loader(x, y, 3, torch.Generator().manual_seed(0)),
                          criterion=nn.CrossEntropyLoss(), noise_multiplier=1e-9, max_grad_norm=C,
                          noise_generator=torch.Generator().manual_seed(1),
                          poisson=PoissonPlan(sample_rate=1.0, expected_batch_size=3.0))  # fmt: skip
        train_epochs(dp.model, dp.data_loader, dp.optimizer, criterion=dp.criterion, epochs=1,
                     augment_fn=lambda xb, gen: xb, private=True, views=views)  # fmt: skip
        change = torch.sqrt(
            sum((b - p.detach()).pow(2).sum() for b, p in zip(before, dp.unwrap().parameters(), strict=True))
        )
        steps.append(float(change))
    assert abs(steps[0] - steps[1]) < 1e-6 and steps[0] <= C + 1e-6  # 3 clipped, averaged over 3: at most C


def test_a_coordinator_asking_for_views_with_ghost_clipping_gets_per_image_gradients(tmp_path):
    from client.guard import plan_round
    from common.privacy import request_config
    from common.round import RoundPlan
    from common.schema import PrivacyConfig, SiteConfig, SitePolicyConfig
    from tests.plans import round_config

    privacy = request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode="ghost"))
    site = SiteConfig(site="a", privacy=SitePolicyConfig(max_epsilon=100.0), state_dir=str(tmp_path))
    for views, mode in ((1, "ghost"), (3, "hooks")):
        cfg = {**round_config(dp_enabled=True, augment_views=views), **privacy}
        private, refusal = plan_round(cfg, RoundPlan.from_config(cfg), site, 100)
        assert refusal is None and private.request.grad_sample_mode == mode
