"""Segmentation at a site: fedward's per-site Dice is MONAI's DiceMetric on the same predictions, a
private release of it is noised and charged, and a DP-SGD round of the UNet (per-sample clipping
through every layer) is accounted like any other."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from client import guard
from client.dp import PoissonPlan
from client.ledger import SiteAccountant
from client.randomness import RoundRandomness
from client.site import SiteRuntime
from client.train import DPSettings, predict, train_round
from common.keys import Cfg, Met
from common.models import build_model
from common.privacy import request_config
from common.round import RoundPlan
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


@pytest.mark.parametrize("asked", ["hooks", "ghost"])
def test_one_image_moves_a_private_unet_update_by_at_most_the_clip_bound_whatever_mode_is_asked(
    tmp_path, asked
):
    """Attack on the clipping: a coordinator asks for `asked` per-sample mode; one image whose gradient
    is far above the bound joins a batch of four. With the site's plan (client.guard) and its training
    recipe, the clipped gradient sum may move by at most max_grad_norm. (Opacus's ghost clipping weighs
    each image's loss by its clip factor, which the UNet's Dice loss, a batch mean, cannot take: it
    moved by 2.7x the bound before the guard kept segmentation on per-image gradients.)"""
    clip = 1.0
    config = round_config(
        **SEG | {"classes": ("background", "a", "b")},
        num_classes=3,
        dp_enabled=True,
        batch_size=64,
        lr=1.0,
        optimizer="sgd",
    )
    config |= request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0, grad_sample_mode=asked))
    plan = RoundPlan.from_config(config)
    site = SiteConfig(site="a", privacy=SitePolicyConfig(max_epsilon=1e4), state_dir=str(tmp_path))
    private, refusal = guard.plan_round(config, plan, site, n_train=5)
    assert refusal is None and private.request.max_grad_norm == clip
    request = replace(private.request, noise_multiplier=1e-9)  # noise off: the clipping alone is seen
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 1, 16, 16, generator=gen) * 0.1, torch.randint(0, 3, (5, 16, 16), generator=gen)
    x[4] = 50.0 * (torch.arange(16) > 7).float().expand(1, 16, 16)  # z: a loud image, far from the others
    y[4] = 2 * (torch.arange(16) > 7).long().expand(16, 16)
    sums = []
    for n in (4, 5):
        model = build_model("unet", in_channels=1, num_classes=3, seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dp = DPSettings(request, poisson=PoissonPlan(sample_rate=1.0, expected_batch_size=1.0))
        after = train_round(model, x[:n], y[:n], plan, randomness=RoundRandomness.repeatable(0, 1), dp=dp)
        # SGD at lr 1, expected batch 1, one step: the weights moved by the clipped, summed gradient
        sums.append({k: before[k] - v for k, v in after.model.state_dict().items()})
    moved = sum((sums[1][k] - sums[0][k]).double().pow(2).sum() for k in sums[0]) ** 0.5
    assert 0.5 * clip < float(moved) <= clip * (1 + 1e-4), float(moved)  # z counted, and clipped


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


def _seg_site(tmp_path, kind: str):
    """A hospital's export for segmentation: DICOM images, a mask per image (PNG, NIfTI or DICOM-SEG)."""
    import highdicom as hd
    import nibabel as nib
    import pydicom
    from PIL import Image

    from client.dicom_out import segmentation_object
    from tests.common.test_sources import with_study_header, write_dicom

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    lines = ["file,patient_id,mask"]
    truth = {}
    for i in range(8):
        image = rng.random((32, 32)) * 0.3
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + i : 12 + i, 6:14] = 1
        image[mask == 1] += 0.6
        path = write_dicom(tmp_path / "img" / f"i{i}.dcm", image, patient_id=f"P{i}")
        ds = pydicom.dcmread(path)
        with_study_header(ds).StudyInstanceUID, ds.SeriesInstanceUID = hd.UID(), hd.UID()
        ds.PatientOrientation = ["L", "F"]
        ds.save_as(path)
        name = {"png": f"m{i}.png", "nifti": f"m{i}.nii.gz", "seg": f"m{i}.dcm"}[kind]
        if kind == "png":
            Image.fromarray(mask * 255).save(tmp_path / "masks" / name)
        elif kind == "nifti":  # read_nifti lays a slice out as a DICOM image: store it the other way round
            nib.save(
                nib.Nifti1Image(mask.T[::-1, ::-1, None].astype(np.float32), np.eye(4)),
                tmp_path / "masks" / name,
            )
        else:
            segmentation_object(pydicom.dcmread(path), mask, ["background", "lesion"]).save_as(
                tmp_path / "masks" / name
            )
        lines.append(f"img/i{i}.dcm,P{i},masks/{name}")
        truth[f"P{i}"] = mask
    return lines, truth


def test_a_sites_own_masks_png_nifti_or_dicom_seg_become_its_labels(tmp_path):
    from common.sources import scan_site

    for kind in ("png", "nifti", "seg"):
        folder = tmp_path / kind
        lines, truth = _seg_site(folder, kind)
        (folder / "labels.csv").write_text("\n".join(lines) + "\n")
        data = SiteDataConfig(format="dicom", root=str(folder), labels=str(folder / "labels.csv"),
                              classes=["background", "lesion"], split_fractions=[0.75, 0.0, 0.25])  # fmt: skip
        data.preprocess.size = [32, 32]
        report = scan_site(SiteConfig(site="a", data=data))
        assert not report.bad, (kind, report.bad)
        site = report.to_site_data()
        assert site.task == "segmentation" and site.train_y.shape[1:] == (32, 32)
        for sample, mask in zip(report.samples, report.masks, strict=True):
            assert torch.equal(mask, torch.from_numpy(truth[sample.patient_id]).long()), (kind, sample.file)


def test_a_mask_of_another_size_or_another_image_is_a_bad_file_named(tmp_path):
    import pydicom
    from PIL import Image

    from client.dicom_out import segmentation_object
    from common.sources import scan_site

    lines, _ = _seg_site(tmp_path / "png", "png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "png" / "masks" / "m0.png")  # wrong size
    (tmp_path / "png" / "labels.csv").write_text("\n".join(lines) + "\n")
    seg_lines, _ = _seg_site(tmp_path / "seg", "seg")
    other = pydicom.dcmread(tmp_path / "seg" / "img" / "i2.dcm")  # m1's SEG made for another image
    segmentation_object(other, np.zeros((32, 32), np.uint8), ["background", "lesion"]).save_as(
        tmp_path / "seg" / "masks" / "m1.dcm"
    )
    (tmp_path / "seg" / "labels.csv").write_text("\n".join(seg_lines) + "\n")
    for kind, file, words in (
        ("png", "i0.dcm", "the mask is 16x16, its image 32x32"),
        ("seg", "i1.dcm", "the SEG is of patient 'P2', its image of 'P1'"),
    ):
        data = SiteDataConfig(format="dicom", root=str(tmp_path / kind), labels=str(tmp_path / kind / "labels.csv"),
                              classes=["background", "lesion"], split_fractions=[0.75, 0.0, 0.25])  # fmt: skip
        data.preprocess.size = [32, 32]
        report = scan_site(SiteConfig(site="a", data=data))
        assert [(b.file, b.problem) for b in report.bad] == [(f"img/{file}", "mask mismatch")], report.bad
        assert words in report.bad[0].detail and len(report.samples) == 7


def test_3d_segmentation_trains_evaluates_and_predicts_volumes(tmp_path):
    """A 3-D UNet on synthetic volumes with 3-D lesion masks: a DP-SGD round is accounted, the site's
    Dice is MONAI's, and predict writes a NIfTI mask of the volume's own size."""
    import csv

    import highdicom as hd
    import nibabel as nib
    import pydicom

    from client.predict import predict as predict_files
    from common.package import write_package
    from tests.common.test_volumes import _series_for_seg

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    data = SiteDataConfig(
        format="synthetic",
        synthetic=SyntheticConfig(
            train_per_site=16, test_per_site=8, val_per_site=0, masks=True, depth=16, image_size=16
        ),
    )
    policy = SitePolicyConfig(
        max_epsilon=50, required=False, evaluation=EvaluationPolicyConfig(release="exact")
    )
    site = SiteRuntime.load(SiteConfig(site="a", data=data, privacy=policy, state_dir=str(tmp_path)))
    assert site.data.train_x.shape[1:] == (1, 16, 16, 16) and site.data.train_y.shape[1:] == (16, 16, 16)
    seg3d = {**SEG, "model": "unet-3d", "size": (16, 16, 16)}
    config = round_config(**seg3d, dp_enabled=True, batch_size=8) | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=1.0)
    )
    reply = site.train(config, build_model("unet-3d", num_classes=2).state_dict())
    assert not reply.refused and reply.metrics[Met.EPSILON] > 0
    evaluated = site.evaluate(round_config(**seg3d), reply.weights)
    got = site_metrics(site_release(evaluated.release, evaluated.metrics, 2), evaluated.metrics)
    model = build_model("unet-3d", num_classes=2)
    model.load_state_dict(reply.weights)
    pred = predict(model, site.data.test_x).argmax(axis=1)
    p, t = (one_hot(torch.as_tensor(a)[:, None], 2) for a in (pred, site.data.test_y.numpy()))
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    dice(p, t)
    expected = dice.aggregate()
    assert got["dice"] is None if torch.isnan(expected) else abs(got["dice"] - float(expected)) < 1e-6

    meta = {"model": "unet-3d", "task": "segmentation", "in_channels": 1, "classes": ["background", "lesion"],
            "input": {"volume": True, "format": "nifti", "preprocess": {"size": [16, 16, 16], "spatial": "resize"}}}  # fmt: skip
    package = write_package(tmp_path / "model", model, meta)
    (tmp_path / "in").mkdir()
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 10)).astype(np.float32), np.eye(4)),
        tmp_path / "in" / "v.nii.gz",
    )
    _series_for_seg(tmp_path / "series" / "p1" / "ct", [0, 2, 4, 6])
    rows = list(csv.DictReader(open(predict_files(package, tmp_path / "in", tmp_path / "out"))))
    (row,) = rows
    assert not row["error"] and nib.load(row["mask"]).shape == (20, 20, 10)  # the volume's own grid
    meta["input"]["format"] = "dicom"
    series_package = write_package(tmp_path / "model-dicom", model, meta)
    (row,) = csv.DictReader(open(predict_files(series_package, tmp_path / "series", tmp_path / "out-series")))
    seg = hd.seg.segread(row["dicom_results"])  # a DICOM-SEG over the series, frame by slice
    slices = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "series" / "p1" / "ct").iterdir()}
    assert not row["error"] and {uid for _, _, uid in seg.get_source_image_uids()} == slices


def test_segmentation_augmentation_flips_image_and_mask_together():
    from client.train import augment_with_masks

    for shape in ((6, 1, 12, 10), (6, 1, 8, 12, 10)):  # images, volumes
        x = torch.rand(*shape)
        y = (x[:, 0] > 0.7).long()  # a mask that is a function of its image
        gen = torch.Generator().manual_seed(1)
        xa, ya = augment_with_masks(x, y, gen)
        assert torch.equal(ya, (xa[:, 0] > 0.7).long())  # still each other's
        assert not torch.equal(xa, x)  # and something was flipped
    site_round = round_config(**SEG, local_epochs=1, batch_size=16, augment=True)

    data = SiteDataConfig(
        format="synthetic",
        synthetic=SyntheticConfig(train_per_site=32, test_per_site=8, val_per_site=0, masks=True),
    )
    site = SiteRuntime.load(SiteConfig(site="a", data=data, privacy=SitePolicyConfig(required=False)))
    result = train_round(
        build_model("unet", num_classes=2),
        site.data.train_x,
        site.data.train_y,
        RoundPlan.from_config(site_round),
    )
    assert np.isfinite(result.loss)


def test_a_coordinator_asking_for_segmentation_evaluations_again_and_again_is_refused_at_the_budget(tmp_path):
    site = _site(tmp_path, release="dp_histogram")
    site.config.privacy.evaluation.max_epsilon = 5.0  # the evaluation budget: about two releases at noise 2
    weights = build_model("unet", num_classes=2).state_dict()
    replies = [site.evaluate(round_config(**SEG), weights) for _ in range(5)]  # the same round, replayed
    released = [r for r in replies if not r.refused]
    entries = [e for e in SiteAccountant(str(tmp_path)).ledger.entries() if e.kind == "evaluation"]
    assert 1 <= len(released) < 5 and len(entries) == len(released)
    assert "privacy.evaluation.max_epsilon 5" in replies[-1].refused and not replies[-1].metrics
