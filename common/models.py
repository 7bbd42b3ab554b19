"""Model zoo: every network is built here and made Opacus-compatible the same way everywhere.

`build_model(name, in_channels=..., num_classes=...)` is what both the coordinator (initial global
arrays) and the sites (local training) call, so their state_dict keys and shapes always match, with
and without privacy. Networks with BatchNorm are converted by Opacus's ModuleValidator (GroupNorm).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common.files import json_safe, write_atomic
from common.opacus_compat import make_opacus_compatible
from common.scatter_net import ScatterNet
from common.schema import MODEL_NAMES
from common.weight_standardization import WSConv2d, WSConv3d


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class AvgMaxPool(nn.Module):
    """Global average and max pooling side by side: max finds small findings, average the rest."""

    def __init__(self, dims: int = 2):
        super().__init__()
        self.axes = tuple(range(-dims, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=self.axes), x.amax(dim=self.axes)], dim=1)


class CNN28(nn.Module):
    """A compact CNN for small images (28x28, or 3-D volumes with `dims` 3): 3 conv stages, GroupNorm,
    global pooling; `standardized`: weight-standardized convolutions (common.weight_standardization)."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 32,
        dims: int = 2,
        standardized: bool = False,
    ):
        super().__init__()
        convs = {(2, False): nn.Conv2d, (3, False): nn.Conv3d, (2, True): WSConv2d, (3, True): WSConv3d}
        conv, pool = convs[dims, standardized], (nn.MaxPool3d if dims == 3 else nn.MaxPool2d)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                conv(cin, cout, 3, padding=1, bias=False),
                _gn(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            pool(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            pool(2),
            *block(2 * w, 4 * w),
            AvgMaxPool(dims),
        )
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _monai_resnet(depth: int, dims: int = 2) -> Callable[[int, int], nn.Module]:
    def make(in_channels: int, num_classes: int) -> nn.Module:
        from monai.networks.nets import resnet10, resnet18

        fn = {10: resnet10, 18: resnet18}[depth]
        return fn(spatial_dims=dims, n_input_channels=in_channels, num_classes=num_classes)

    return make


def _monai_densenet121(in_channels: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


def _monai_efficientnet_b0(in_channels: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import EfficientNetBN

    return EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        spatial_dims=2,
        in_channels=in_channels,
        num_classes=num_classes,
    )


def _monai_unet(in_channels: int, num_classes: int, dims: int = 2) -> nn.Module:
    """MONAI's BasicUNet with GroupNorm and interpolation instead of transposed convolutions in the
    decoder (Opacus computes per-sample gradients of every layer of it)."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=dims, in_channels=in_channels, out_channels=num_classes,
                     features=(16, 16, 32, 64, 128, 16), norm=("group", {"num_groups": 4}),
                     upsample="nontrainable")  # fmt: skip


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn28": lambda c, k: CNN28(c, k),
    "cnn28-small": lambda c, k: CNN28(c, k, width=16),
    "cnn28-wide": lambda c, k: CNN28(c, k, width=48),
    "cnn28-ws": lambda c, k: CNN28(c, k, standardized=True),  # weight standardization, for DP-SGD
    "scatternet": lambda c, k: ScatterNet(c, k),  # fixed scattering features + linear: for small DP sites
    "resnet10": _monai_resnet(10),
    "resnet18": _monai_resnet(18),
    "densenet121": _monai_densenet121,
    "efficientnet-b0": _monai_efficientnet_b0,
    "cnn3d": lambda c, k: CNN28(c, k, width=16, dims=3),  # volumes
    "cnn3d-ws": lambda c, k: CNN28(c, k, width=16, dims=3, standardized=True),
    "resnet10-3d": _monai_resnet(10, dims=3),
    "unet": lambda c, k: _monai_unet(c, k),  # segmentation: a label map per image
    "unet-3d": lambda c, k: _monai_unet(c, k, dims=3),  # ... per volume
}


assert tuple(MODELS) == MODEL_NAMES, "common.schema.MODEL_NAMES lists the model zoo's names"


def build_model(name: str, *, in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> nn.Module:
    """Build `name` with seeded initial weights, made Opacus-compatible (BatchNorm -> GroupNorm).

    The seed applies to these weights only: torch's global generator is left as it was (forked and
    restored), so building a model never makes anything else predictable."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_opacus_compatible(MODELS[name](in_channels, num_classes))


def save_model(path: str | Path, model: nn.Module, *, meta: dict) -> None:
    """Write weights plus what is needed to rebuild the model (name, channels, classes, config)."""
    buffer = io.BytesIO()  # serialized first: a full disk then fails as an OSError naming the path
    plain = json.loads(json.dumps(json_safe(meta)))  # text, numbers, lists: what load_model may read back
    torch.save({"state_dict": model.state_dict(), **plain}, buffer)
    write_atomic(path, buffer.getvalue())


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_model`; returns the model (eval mode) and its metadata. Read
    without running code the file may carry (weights_only: tensors, numbers, text)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(blob["model"], in_channels=blob["in_channels"], num_classes=blob["num_classes"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), {k: v for k, v in blob.items() if k != "state_dict"}
