"""Harmonization by augmentation (`train.acquisition_augment`): training images re-rendered as other
scanners might, reproducibly from the round's generator, intensities kept in [0, 1], in training only."""

from __future__ import annotations

import numpy as np
import torch

from client.train import predict, train_round, with_acquisition
from common.models import build_model
from common.scanners import SCANNERS, acquire
from common.synthetic import synthetic_images
from tests.plans import plan


def test_images_are_rerendered_reproducibly_within_the_intensity_range():
    x = torch.from_numpy(synthetic_images(16, 0.5, 28, np.random.default_rng(0))[0])[:, None]
    a = with_acquisition(None)(x, torch.Generator().manual_seed(3))
    b = with_acquisition(None)(x, torch.Generator().manual_seed(3))
    c = with_acquisition(None)(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # the changes span what different scanners do to the same images (mean intensity shifts both ways)
    shifts = (a - x).mean(dim=(1, 2, 3))
    assert float(shifts.min()) < -0.01 < 0.01 < float(shifts.max())
    other = torch.from_numpy(acquire(x[:, 0].numpy(), SCANNERS[1], np.random.default_rng(0)))[:, None]
    assert float((other - x).abs().mean()) < 3 * float((a - x).abs().mean())  # the same order of change


def test_a_round_with_it_trains_differently_and_predicts_without_it():
    x_np, y_np = synthetic_images(64, 0.5, 28, np.random.default_rng(1))
    x, y = torch.from_numpy(x_np)[:, None], torch.from_numpy(y_np)
    plain = train_round(build_model("cnn28", seed=0), x, y, plan(local_epochs=1, batch_size=16)).model
    harmonized = train_round(build_model("cnn28", seed=0), x, y, plan(local_epochs=1, batch_size=16,
                                                                     acquisition_augment=True)).model  # fmt: skip
    assert not np.allclose(predict(plain, x), predict(harmonized, x))  # it changed the training
    assert np.array_equal(predict(harmonized, x), predict(harmonized, x))  # prediction is deterministic
