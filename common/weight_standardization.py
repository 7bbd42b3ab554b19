"""Weight-standardized convolutions (Qiao et al., 2019), the layer De et al. (2022) pair with GroupNorm
for DP-SGD.

Each output channel's kernel is standardized before it is applied: w_hat = (w - mean(w)) / sqrt(var(w)
+ eps), mean and (population) variance over the channel's inputs and kernel positions. The stored
parameter stays `weight` (the same state_dict keys and shapes as a plain convolution), so FedAvg, the
model package and every reader of weights see an ordinary conv layer.

For DP-SGD, a per-sample gradient with respect to the stored weight is the per-sample gradient with
respect to w_hat (what any conv sampler computes from the layer's input and output gradient) sent back
through the standardization: `standardization_backward`, which client.grad_sample applies.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


def standardize(weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """w_hat per output channel (dim 0), mean 0 and variance 1 (up to eps)."""
    flat = weight.reshape(weight.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(weight.shape)


def standardization_backward(weight: torch.Tensor, grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Gradients with respect to `weight` from gradients `grads` (n x *weight.shape, one per sample)
    with respect to standardize(weight): (G - mean(G) - w_hat * mean(G * w_hat)) / s per output
    channel, with s = sqrt(var(w) + eps). The standardization's Jacobian, applied to each sample."""
    c_out = weight.shape[0]
    flat = weight.detach().reshape(c_out, -1)
    s = torch.sqrt(flat.var(dim=1, unbiased=False, keepdim=True) + eps)
    w_hat = (flat - flat.mean(dim=1, keepdim=True)) / s
    g = grads.reshape(grads.shape[0], c_out, flat.shape[1])
    g = g - g.mean(dim=2, keepdim=True) - w_hat * (g * w_hat).mean(dim=2, keepdim=True)
    return (g / s).reshape(grads.shape)


class _Standardized:
    """A conv layer whose kernels are standardized per output channel at every forward pass."""

    def effective_weight(self) -> torch.Tensor:
        return standardize(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class WSConv2d(_Standardized, nn.Conv2d):
    """nn.Conv2d with weight-standardized kernels."""


class WSConv3d(_Standardized, nn.Conv3d):
    """nn.Conv3d with weight-standardized kernels."""


WS_CONVS = (WSConv2d, WSConv3d)
