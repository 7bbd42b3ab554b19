"""Segmentation at a site: fedward's per-site Dice is MONAI's DiceMetric on the same predictions, a
private release of it is noised and charged, and a DP-SGD round of the UNet (per-sample clipping
through every layer) is accounted like any other."""

from __future__ import annotations

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from client.ledger import SiteAccountant
from client.site import SiteRuntime
from client.train import predict, train_round
from common.keys import Cfg, Met
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
from server.releases import site_metrics, site_release
from tests.plans import round_config

SEG = {"task": "segmentation", "model": "unet", "classes": ("background", "lesion")}


def _site(tmp_path, release: str = "exact", max_epsilon: float = 50.0) -> SiteRuntime:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    data = SiteDataConfig(
        format="synthetic",
        synthetic=SyntheticConfig(train_per_site=160, test_per_site=40, val_per_site=0, masks=True),
    )
    policy = SitePolicyConfig(
        max_epsilon=max_epsilon, required=False, evaluation=EvaluationPolicyConfig(release=release)
    )
    return SiteRuntime.load(SiteConfig(site="a", data=data, privacy=policy, state_dir=str(tmp_path)))


def _trained(site: SiteRuntime) -> torch.nn.Module:
    model = build_model("unet", num_classes=2, seed=0)
    plan_config = round_config(**SEG, local_epochs=10, batch_size=16, lr=0.003)
    from common.round import RoundPlan

    return train_round(model, site.data.train_x, site.data.train_y, RoundPlan.from_config(plan_config)).model


def test_the_sites_dice_is_monais_dice_metric_on_the_same_predictions(tmp_path):
    site = _site(tmp_path)
    assert site.data.task == "segmentation" and site.data.train_y.shape[1:] == (28, 28)
    model = _trained(site)
    reply = site.evaluate(round_config(**SEG), model.state_dict())
    got = site_metrics(site_release(reply.release, reply.metrics, 2), reply.metrics)

    pred = predict(model, site.data.test_x).argmax(axis=1)
    p, t = (one_hot(torch.as_tensor(a)[:, None], 2) for a in (pred, site.data.test_y.numpy()))
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    dice(p, t)
    expected = float(dice.aggregate())
    hd = (
        HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, t)
        .numpy()
        .ravel()
    )
    defined = np.isfinite(hd) & (p[:, 1:].flatten(1).sum(1).numpy() > 0)
    assert got["dice"] > 0.4, got  # it learnt something: the comparison is not of zeros
    assert abs(got["dice"] - expected) < 1e-6 and abs(got["hd95"] - hd[defined].mean()) < 1e-6
    assert got["n_test"] == 40 and got["release"] == "exact"


def test_a_private_segmentation_release_is_noised_and_charged(tmp_path):
    site = _site(tmp_path, release="dp_histogram", max_epsilon=10.0)
    weights = build_model("unet", num_classes=2).state_dict()
    first, second = (site.evaluate(round_config(**SEG), weights) for _ in range(2))
    assert first.release == "dp_histogram" and first.metrics[Met.DICE_SUM] != second.metrics[Met.DICE_SUM]
    assert Met.N_TEST not in first.metrics  # the exact count does not leave
    entries = [e for e in SiteAccountant(str(tmp_path)).ledger.entries() if e.kind == "evaluation"]
    assert len(entries) == 2 and first.metrics[Met.EVAL_EPSILON] > 0


def test_a_dp_sgd_round_of_the_unet_is_clipped_per_sample_and_accounted(tmp_path):
    site = _site(tmp_path)
    config = round_config(**SEG, dp_enabled=True, batch_size=16) | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=1.0)
    )
    reply = site.train(config, build_model("unet", num_classes=2).state_dict())
    assert not reply.refused and reply.metrics[Met.EPSILON] > 0
    assert all(torch.isfinite(w).all() for w in reply.weights.values())
    assert [e.kind for e in SiteAccountant(str(tmp_path)).ledger.entries()] == ["count", "train"]
    wrong = round_config(**{**SEG, "task": "classification"}, dp_enabled=False) | {Cfg.EVAL_SPLIT: "test"}
    assert "this site's data is for segmentation" in site.train(wrong, reply.weights).refused


def test_fedward_predict_writes_masks_as_nifti_and_dicom_seg(tmp_path):
    import csv

    import highdicom as hd
    import nibabel as nib
    import pydicom
    from pydicom.data import get_testdata_file

    from client.predict import predict
    from common.package import write_package

    site = _site(tmp_path / "site")
    meta = {"model": "unet", "task": "segmentation", "in_channels": 1, "classes": ["background", "lesion"],
            "input": {"preprocess": {"size": [28, 28], "spatial": "resize", "channels": 1}}}  # fmt: skip
    package = write_package(tmp_path / "model", _trained(site), meta)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    rows = {
        r["file"].rsplit("/", 1)[-1]: r
        for r in csv.DictReader(open(predict(package, inputs, tmp_path / "out")))
    }

    row = rows["ct.dcm"]
    assert not row["error"] and abs(float(row["p_background"]) + float(row["p_lesion"]) - 1) < 1e-6
    mask = nib.load(row["mask"]).get_fdata()
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0.0, 1.0}  # the CT's own size
    seg = hd.seg.segread(row["dicom_results"])
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.Modality == "SEG"
    cited = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert cited == source.SOPInstanceUID and seg.SegmentSequence[0].SegmentLabel == "lesion"
