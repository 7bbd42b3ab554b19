"""Every model in the zoo builds Opacus-compatible, identically on both sides, and runs."""

import pytest
import torch
from torch import nn

from common.config import ConfigError, load_study
from common.models import MODELS, build_model, load_model, save_model
from common.schema import MIN_INPUT_SIZE, SEGMENTATION_MODELS, VOLUME_MODELS


@pytest.mark.parametrize("name", list(MODELS))
def test_model_builds_without_batchnorm_and_runs(name):
    model = build_model(name, in_channels=1, num_classes=3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    size = max(28, MIN_INPUT_SIZE.get(name, 0))
    shape = (2, 1, 16, size, size) if name in VOLUME_MODELS else (2, 1, size, size)
    out = (2, 3, *shape[2:]) if name in SEGMENTATION_MODELS else (2, 3)  # a label map per image, or classes
    assert model.eval()(torch.randn(*shape)).shape == out
    again = build_model(name, in_channels=1, num_classes=3)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in again.state_dict().items()
    }


def test_same_seed_same_initial_weights_and_saved_model_round_trips(tmp_path):
    a, b = build_model("cnn28", seed=3), build_model("cnn28", seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    save_model(tmp_path / "m.pt", a, meta={"model": "cnn28", "in_channels": 1, "num_classes": 2})
    loaded, meta = load_model(tmp_path / "m.pt")
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(loaded(x), a.eval()(x)) and meta["model"] == "cnn28"


def test_a_model_too_big_for_the_images_is_refused_before_training(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model:\n  name: densenet121\n")
    with pytest.raises(ConfigError, match=r"model\.name.*densenet121.*32x32"):
        load_study(path)


def test_building_a_model_leaves_torchs_global_generator_as_it_was():
    """A seeded build must not make later draws (Opacus's, a site's) predictable from the seed."""
    torch.manual_seed(12345)
    expected = torch.rand(4)
    torch.manual_seed(12345)
    a = build_model("cnn28", seed=0)
    assert torch.equal(torch.rand(4), expected)  # the same draws as if nothing had been built
    assert torch.equal(a.head.weight, build_model("cnn28", seed=0).head.weight)  # its own weights: seeded


def test_scatternet_sends_only_learned_weights_and_takes_any_2d_size(tmp_path):
    """The scattering filter bank is fixed: it must not travel in updates or packages (only GroupNorm's
    affine and the linear head do), and one network takes MedMNIST's 28x28 and larger images alike."""
    model = build_model("scatternet", in_channels=1, num_classes=2, seed=1)
    assert set(model.state_dict()) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert model.state_dict().keys() == {name for name, _ in model.named_parameters()}
    x, big = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 64, 48)
    assert model.eval()(big).shape == (3, 2)
    save_model(tmp_path / "s.pt", model, meta={"model": "scatternet", "in_channels": 1, "num_classes": 2})
    loaded, _ = load_model(tmp_path / "s.pt")
    assert torch.allclose(loaded(x), model(x))
    # each image's output is its own: a batch gives the rows of its images one by one (DP-SGD's premise)
    assert torch.allclose(model(x), torch.cat([model(x[i : i + 1]) for i in range(3)]), atol=1e-5)
