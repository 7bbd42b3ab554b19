"""Patient-level DP-SGD: one clipped gradient per patient, checked against one backward pass per
patient; Poisson sampling draws whole patients; a site with patient ids trains and counts patients,
and one whose policy asks for patients without having patient ids is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.dp import PoissonPlan, make_private
from client.ledger import SiteAccountant
from client.patients import (
    PatientDataset,
    collate_patients,
    patient_groups,
    patient_loader,
    sum_per_patient,
    unpack_batch,
)
from client.randomness import RoundRandomness
from client.site import SiteRuntime
from client.train import DPSettings, train_round
from common.keys import Met
from common.models import build_model
from common.privacy import PrivacyRequest, request_config
from common.round import RoundPlan
from common.schema import (
    PrivacyConfig,
    RoundLimitsConfig,
    SiteConfig,
    SiteDataConfig,
    SitePolicyConfig,
    SyntheticConfig,
)
from common.sitedata import SiteData
from tests.plans import round_config

CLIP = 0.05  # small: every patient's gradient is clipped, so a wrong grouping shows


def _patients():
    g = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 1, 4]
    x = torch.rand(sum(sizes), 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (sum(sizes),), generator=g)
    names = [f"P{i}" for i, k in enumerate(sizes) for _ in range(k)]
    return x, y, names


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_one_clipped_gradient_per_patient_equals_one_backward_pass_per_patient():
    x, y, names = _patients()
    groups = patient_groups(names)
    reference = build_model("cnn28-small", seed=3)
    expected = None
    for idx in groups:  # by hand: the patient's summed loss, one backward, clipped to CLIP
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[idx]), y[idx], reduction="sum").backward()
        g = _flat_grad(reference)
        g = g * min(1.0, CLIP / (float(g.norm()) + 1e-6))
        expected = g if expected is None else expected + g

    model = build_model("cnn28-small", seed=3)
    batch = collate_patients([(x[idx], y[idx]) for idx in groups])  # every patient in the batch
    dp = make_private(
        model=model.train(),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y)),
        criterion=nn.CrossEntropyLoss(),
        noise_multiplier=1.0,
        max_grad_norm=CLIP,
        noise_generator=torch.Generator().manual_seed(0),
        poisson_sampling=False,
        grad_sample_mode="hooks",
    )
    xb, yb, owner = batch
    dp.criterion(dp.model(xb), yb).backward()
    sum_per_patient(dp.model, owner)
    dp.optimizer.clip_and_accumulate()
    got = torch.cat([p.summed_grad.flatten() for p in model.parameters()])

    assert owner.tolist() == [0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4]
    assert torch.allclose(got, expected, atol=1e-6), float((got - expected).norm())


def test_poisson_sampling_draws_whole_patients():
    x, y, names = _patients()
    groups = patient_groups(names)
    loader = patient_loader(x, y, groups, sample_rate=0.5, generator=torch.Generator().manual_seed(1))
    drawn = 0
    for xb, yb, owner in loader:
        assert len(xb) == len(yb) == len(owner)
        for j in range(int(owner.max()) + 1 if len(owner) else 0):
            block = xb[owner == j]
            assert any(
                len(idx) == len(block) and torch.equal(x[idx], block) for idx in groups
            )  # a whole patient
            drawn += 1
    assert 0 < drawn < 2 * len(groups)  # about half the patients each of the two steps


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_an_empty_poisson_batch_of_patients_is_an_empty_batch_of_images(task):
    x, y, names = _patients()
    if task == "segmentation":  # label maps: an empty batch of them has as many dimensions as a full one
        y = (x[:, 0] > 0.5).long()
    # a sample rate this small draws nobody in (nearly) every step
    loader = patient_loader(
        x, y, patient_groups(names), sample_rate=1e-9, generator=torch.Generator().manual_seed(0)
    )
    xb, yb, owner = unpack_batch(next(iter(loader)), patients=True)
    assert xb.shape == (0, *x.shape[1:]) and yb.shape == (0, *y.shape[1:]) and owner.shape == (0,)


def test_a_patient_level_segmentation_round_trains_through_empty_poisson_batches():
    """An empty batch of patients with label maps was taken for an image-level batch (its labels have
    as many dimensions) and the UNet got a 5-D input: the round failed at random (an independent
    review found it)."""
    x, y, names = _patients()
    x, y = x[:, :, :16, :16], (x[:, 0, :16, :16] > 0.5).long()
    plan = RoundPlan.from_config(
        round_config(
            task="segmentation",
            model="unet",
            classes=("background", "lesion"),
            dp_enabled=True,
            batch_size=1,
            lr=0.1,
            optimizer="sgd",
        )  # fmt: skip
    )
    request = PrivacyRequest(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    dp = DPSettings(request, poisson=PoissonPlan(0.05, 0.25), patients=patient_groups(names))

    result = train_round(
        build_model("unet", num_classes=2), x, y, plan, randomness=RoundRandomness.secret(), dp=dp
    )

    assert result.steps == 20  # 1 / 0.05 steps, nearly all of them without a patient


def _site(tmp_path, unit: str, with_patients: bool, per_patient: int = 3, **limits) -> SiteRuntime:
    data = SiteDataConfig(format="synthetic", synthetic=SyntheticConfig(train_per_site=30, test_per_site=10))
    site = SiteConfig(
        site="hospital-p",
        data=data,
        privacy=SitePolicyConfig(max_epsilon=50, unit=unit),
        state_dir=str(tmp_path),
        limits=RoundLimitsConfig(**limits),
    )
    runtime = SiteRuntime.load(site)
    if with_patients:  # `per_patient` images per patient, as a DICOM site's label sheet gives them
        d = runtime.data
        runtime.data = SiteData(
            d.site, d.train_x, d.train_y, d.test_x, d.test_y, d.classes,
            train_patients=[f"P{i // per_patient}" for i in range(len(d.train_y))],
            test_patients=[f"T{i // 3}" for i in range(len(d.test_y))],
        )  # fmt: skip
    return runtime


def _private_config() -> dict:
    return round_config(dp_enabled=True, batch_size=4) | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=1.0)
    )


def test_a_site_with_patient_ids_trains_on_patients_and_counts_them(tmp_path):
    runtime = _site(tmp_path, unit="auto", with_patients=True)

    reply = runtime.train(_private_config(), build_model("cnn28").state_dict())

    assert reply.refused == "" and reply.metrics[Met.PRIVACY_UNIT] == 1
    (count,) = [e for e in SiteAccountant(tmp_path).ledger.entries() if e.kind == "count"]
    assert abs(count.value - 10) <= 50  # 10 patients, noised (std 10): not 30 images
    assert reply.metrics[Met.SAMPLE_RATE] == pytest.approx(1 / -(-max(count.value, 1) // 4))


def test_patient_level_privacy_without_patient_ids_is_refused(tmp_path):
    runtime = _site(tmp_path, unit="patient", with_patients=False)

    reply = runtime.train(_private_config(), build_model("cnn28").state_dict())

    assert "privacy.unit" in reply.refused and "patient ids" in reply.refused
    assert SiteAccountant(tmp_path).ledger.entries() == []


def test_a_step_takes_at_most_the_sites_limit_of_a_patients_images_drawn_afresh(tmp_path, monkeypatch):
    """Memory: a patient with many images (a CT series' slices) would put them all in one step. The
    site's limits.max_images_per_patient caps what a drawn patient brings, a fresh choice each step."""
    import client.train

    seen = []  # per step: each drawn patient's images, and the images themselves
    real = client.train.sum_per_patient

    def spy(model, owner):
        seen.append(torch.bincount(owner).tolist())
        return real(model, owner)

    monkeypatch.setattr(client.train, "sum_per_patient", spy)
    runtime = _site(tmp_path, unit="auto", with_patients=True, per_patient=10, max_images_per_patient=4)
    config = round_config(dp_enabled=True, batch_size=2, local_epochs=8) | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=1.0)
    )

    reply = runtime.train(config, build_model("cnn28").state_dict())

    assert reply.refused == "" and reply.metrics[Met.PRIVACY_UNIT] == 1
    counts = [n for step in seen for n in step if n]
    assert counts and set(counts) == {4}  # 3 patients of 10 images: every drawn one brings 4


def test_a_patient_level_step_over_the_sites_memory_limit_is_refused(tmp_path):
    """The site cuts batches of patients itself; only one patient's images and views, which it cannot
    cut, are refused over limits.max_step_images (before anything is drawn or charged)."""
    runtime = _site(tmp_path, unit="auto", with_patients=True, max_step_images=64, max_images_per_patient=32)
    private = request_config(PrivacyConfig(enabled=True, noise_multiplier=1.0))

    views = runtime.train(round_config(dp_enabled=True, batch_size=4, augment_views=3, augment=True) | private,
                          build_model("cnn28").state_dict())  # fmt: skip
    assert "96 at once" in views.refused and "limits.max_images_per_patient 32" in views.refused
    assert SiteAccountant(tmp_path).ledger.entries() == []
    large = runtime.train(
        round_config(dp_enabled=True, batch_size=500) | private, build_model("cnn28").state_dict()
    )
    assert large.refused == ""  # 500 patients a batch: cut into physical batches of 2


def test_a_round_without_privacy_at_a_patient_level_site_is_limited_as_batches_of_images(tmp_path):
    runtime = _site(tmp_path, unit="auto", with_patients=True, max_step_images=64)
    runtime.config.privacy.required = False

    ok = runtime.train(round_config(dp_enabled=False, batch_size=64), build_model("cnn28").state_dict())
    too_many = runtime.train(round_config(dp_enabled=False, batch_size=65), build_model("cnn28").state_dict())

    assert ok.refused == "" and "a step would compute 65 images" in too_many.refused


def test_a_patients_images_are_drawn_afresh_each_time_and_all_kept_under_the_cap():
    x = torch.arange(13, dtype=torch.float32).reshape(13, 1, 1, 1)
    data = PatientDataset(x, torch.zeros(13), [list(range(10)), [10, 11, 12]], max_images=4,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    draws = [frozenset(data[0][0].flatten().int().tolist()) for _ in range(20)]

    assert all(len(d) == 4 and d <= set(range(10)) for d in draws)
    assert len(set(draws)) > 10  # not the same four every step
    assert data[1][0].flatten().int().tolist() == [10, 11, 12]  # under the cap: every image, in order


def test_a_batch_of_patients_is_cut_into_physical_batches_of_whole_patients_within_the_limit(monkeypatch):
    """The memory bound holds whatever size a Poisson batch is drawn at: 10 patients of 6 images, each
    bringing at most 4, all drawn every step (rate 1), cut into physical batches of 2 whole patients
    (at most 8 images), clipped per patient, with one optimizer step (and one noise) per logical batch."""
    import client.train

    physical = []
    real = client.train.sum_per_patient

    def spy(model, owner):
        physical.append(torch.bincount(owner).tolist())
        return real(model, owner)

    monkeypatch.setattr(client.train, "sum_per_patient", spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 28, 28, generator=g), torch.randint(0, 2, (60,), generator=g)
    groups = patient_groups([f"P{i // 6}" for i in range(60)])
    plan = RoundPlan.from_config(round_config(dp_enabled=True, batch_size=10, local_epochs=3))
    request = PrivacyRequest(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    steps = []
    dp = DPSettings(request, poisson=PoissonPlan(1.0, 10), patients=groups, images_per_patient=4,
                    patients_per_step=2, on_steps=lambda private: steps.append(private.steps))  # fmt: skip

    train_round(build_model("cnn28-small"), x, y, plan, randomness=RoundRandomness.secret(), dp=dp)

    assert steps == [3]  # one step per logical batch of 10 patients, counted once each
    assert physical == [[4, 4]] * 15  # 3 steps x 5 physical batches of 2 whole patients, 4 images each


def test_summing_per_patient_without_per_image_gradients_fails_closed():
    """Ghost clipping keeps no per-image gradients: summing nothing would let the optimizer clip each
    image alone, so one patient could contribute several clipped gradients; it raises instead."""
    model = build_model("cnn28-small")
    nn.functional.cross_entropy(model(torch.rand(3, 1, 28, 28)), torch.tensor([0, 1, 0])).backward()

    with pytest.raises(RuntimeError, match="each image's gradient"):
        sum_per_patient(model, torch.tensor([0, 0, 1]))
