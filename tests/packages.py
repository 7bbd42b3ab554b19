"""A real model package for tests and benchmarks: a cnn28 trained on fedward's synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from client.train import train_round
from common.models import build_model
from common.package import write_package
from common.synthetic import synthetic_images_with_findings
from tests.plans import plan

META = {"model": "cnn28", "in_channels": 1, "classes": ["normal", "finding"],
        "input": {"source": "synthetic", "preprocess": {"size": [28, 28], "spatial": "resize", "channels": 1}}}  # fmt: skip


def synthetic_package(folder: Path, *, images: int, epochs: int, lr: float) -> Path:
    """Train on `images` synthetic images (half with a finding) for `epochs`, package into folder/model."""
    x, y, _ = synthetic_images_with_findings(images, 0.5, 28, np.random.default_rng(0))
    model = build_model("cnn28", seed=0)
    round_plan = plan(model="cnn28", local_epochs=epochs, batch_size=32, lr=lr)
    train_round(model, torch.from_numpy(x)[:, None], torch.from_numpy(y), round_plan)
    return write_package(folder / "model", model, META)


def pointing_game(package: Path, *, images: int = 60, seed: int = 2) -> tuple[float, float]:
    """The heat maps' pointing-game score on synthetic positives (peak within 2 sigma of where the
    finding was drawn) and that of a random peak, on the same images."""
    from client.predict import Predictor

    x, _, findings = synthetic_images_with_findings(images, 1.0, 28, np.random.default_rng(seed))
    predictor, rng = Predictor(package), np.random.default_rng(seed + 1)

    def inside(peak, finding) -> bool:
        return bool(np.hypot(peak[0] - finding[0], peak[1] - finding[1]) <= 2 * finding[2])

    hits, chance = [], []
    for img, finding in zip(x, findings, strict=True):
        heat = predictor.heatmap(torch.from_numpy(img)[None, None], class_index=1)
        hits.append(inside(np.unravel_index(np.argmax(heat), heat.shape), finding))
        chance.append(inside(rng.integers(0, 28, 2), finding))
    return float(np.mean(hits)), float(np.mean(chance))
