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
