"""ScatterNet: fixed wavelet-scattering features and a linear classifier, the network of Tramer & Boneh
("Differentially private learning needs better features (or much more data)", ICLR 2021).

The scattering transform (kymatio's, J=2 scales, L=8 orientations: 81 maps per input channel at a
quarter of the resolution) has no weights to learn, so DP-SGD noises only GroupNorm's affine parameters
and one linear layer: at the same epsilon far less noise per useful weight than a CNN trained end to end,
which is what small private sites need. The filter bank is built for each input size it meets and kept
out of the state_dict (it is the same everywhere), so only the learned weights travel; the maps are
pooled to a 7x7 grid (the 28x28 output as is), so one network takes any 2-D input size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SCALES, ORIENTATIONS = 2, 8
MAPS_PER_CHANNEL = 1 + SCALES * ORIENTATIONS + ORIENTATIONS**2 * SCALES * (SCALES - 1) // 2  # orders 0, 1, 2
GRID = 7  # the maps' spatial size for 28x28 inputs; other sizes are pooled to it


def _scattering(height: int, width: int, device: torch.device) -> nn.Module:
    # kymatio's 2-D frontend itself: `kymatio.torch` also imports its 3-D transform, which needs
    # scipy.special.sph_harm, gone from SciPy 1.17
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=SCALES, shape=(height, width), L=ORIENTATIONS).to(device)


class ScatterNet(nn.Module):
    """Scattering (no weights) -> GroupNorm over the maps -> linear classifier on the 7x7 grid."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2):
        super().__init__()
        maps = MAPS_PER_CHANNEL * in_channels
        self.norm = nn.GroupNorm(MAPS_PER_CHANNEL // 3, maps)  # 27 groups of 3 maps per input channel
        self.head = nn.Linear(maps * GRID * GRID, num_classes)
        self._scatterings: dict[tuple, nn.Module] = {}  # not submodules: no weights, not in state_dict

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The normalized scattering maps, (batch, maps, 7, 7)."""
        if len(x) == 0:  # an empty Poisson batch: kymatio's FFT refuses batches of none
            return self.norm(x.new_zeros(0, self.norm.num_channels, GRID, GRID))
        key = (x.shape[-2], x.shape[-1], x.device)
        if key not in self._scatterings:
            self._scatterings[key] = _scattering(x.shape[-2], x.shape[-1], x.device)
        maps = self._scatterings[key](x.contiguous()).flatten(1, 2)  # (batch, channels*81, h/4, w/4)
        if maps.shape[-2:] != (GRID, GRID):
            maps = F.adaptive_avg_pool2d(maps, GRID)
        return self.norm(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
