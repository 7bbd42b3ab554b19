"""`fedward site validate SITE_CONFIG --package PACKAGE...`: a hospital validates model packages on its
own data, before it joins a federation or without joining one.

Everything happens at the site and nothing leaves it: the site's images are read as its site config
says, each package predicts on them in this process, and the metrics (with 95% bootstrap intervals,
common.evaluation_blocks) go to --out as validation.json, the same file a federated `fedward validate`
writes, so `fedward compare` and `fedward report` read it too. Nothing is released to anyone, so
nothing is charged to the site's privacy ledger. By default every labelled image of the site is used
(`--split all`: a hospital that has not joined has no training split to keep apart); `--split test`
uses its test split only.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import torch

from client.train import device, predict
from common.data import load_site_data
from common.evaluation_blocks import classification_block, segmentation_block
from common.files import write_json
from common.model_spec import ModelSpec
from common.package import PackageError, load_package, package_identity, package_labels
from common.schema import SiteConfig
from common.seg_metrics import per_image_scores
from common.sitedata import SiteData, SiteDataError
from common.validation_doc import VALIDATION_FILE, finish, new_validation

SPLITS = ("all", "test")
BOOTSTRAP_SAMPLES = 1000


def _images(data: SiteData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split == "test":
        return data.test_x, data.test_y
    parts = [(data.train_x, data.train_y), (data.test_x, data.test_y)]
    if data.val_x is not None and len(data.val_x):
        parts.append((data.val_x, data.val_y))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _spec_of(meta: dict) -> ModelSpec:
    inp = meta.get("input", {})
    return ModelSpec(task=meta.get("task", "classification"), classes=tuple(meta["classes"]),
                     in_channels=int(meta["in_channels"]), size=tuple(inp.get("size") or ()),
                     modalities=tuple(inp.get("modalities") or ()), volume=bool(inp.get("volume")))  # fmt: skip


def _metrics(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, classes: int, seed: int
) -> dict:
    """The package's metrics on the images, as validation.json holds a site's (`<metric>_ci`)."""
    model = model.to(device())
    labels = y.numpy().astype(np.int64)
    if task == "segmentation":
        pred = predict(model, x, batch_size=16).argmax(axis=1)
        block = segmentation_block(np.stack(per_image_scores(labels, pred, classes), axis=1),
                                   samples=BOOTSTRAP_SAMPLES, seed=seed)  # fmt: skip
        return {**{k: block[k] for k in ("n_test", "dice", "hd95")}, "dice_ci": block["ci"]["dice"],
                "release": "local"}  # fmt: skip
    block = classification_block(
        labels, predict(model, x), samples=BOOTSTRAP_SAMPLES, seed=seed, bins=10, roc=False
    )
    out = {k: v for k, v in block.items() if k not in ("ci", "calibration")}
    return out | {"auc_ci": block["ci"]["auc"], "release": "local"}


def validate_here(config: SiteConfig, packages: list[str | Path], out: str | Path, *, split: str = "all",
                  seed: int = 0) -> dict:  # fmt: skip
    """Validate `packages` on this site's data; writes and returns validation.json (module docstring).

    Raises:
        SiteDataError: the site's data cannot be read, or a package does not fit it (names what differs).
        PackageError: a package cannot be loaded.
    """
    if split not in SPLITS:
        raise ValueError(f"--split is {split!r}; use one of {', '.join(SPLITS)}")
    loaded = [(p, *load_package(p)) for p in packages]  # every package loads before any image is read
    data = load_site_data(config)
    x, y = _images(data, split)
    task = loaded[0][2].get("task", "classification")
    doc = new_validation(
        f"{config.site}-local-{uuid.uuid4().hex[:8]}", {"name": f"{config.site} (local)", "task": task}, task
    )
    doc["local"] = {"site": config.site, "split": split, "images": int(len(y))}
    labels = package_labels([(p, meta) for p, _, meta in loaded])
    for (path, model, meta), label in zip(loaded, labels, strict=True):
        problem = _spec_of(meta).problem_with(data)
        if problem or meta.get("task", "classification") != task:
            raise SiteDataError(
                f"package '{path}' does not fit site '{config.site}': {problem or 'another task than the first package'}; "
                "validate packages made for this kind of image and these classes."
            )
        m = _metrics(model, x, y, task, len(meta["classes"]), seed)
        doc["packages"].append({"label": label, **package_identity(path, meta), "sites": {config.site: m},
                                "pooled": m, "failed": {}})  # fmt: skip
    finish(doc, "completed")
    target = Path(out) / VALIDATION_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, doc)
    return doc


__all__ = ["PackageError", "SiteDataError", "validate_here"]
