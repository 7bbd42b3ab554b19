"""Per-sample gradients of Conv2d and Conv3d layers as one grouped convolution (faster than Opacus's default).

Opacus computes a Conv2d layer's per-sample weight gradients by unfolding the layer's input (a copy
k*k times its size) and multiplying it with the output gradients sample by sample. The same numbers are
the weight gradient of a *grouped* convolution: stack the batch along the channels (input 1 x (n*c_in)
x H x W, output gradient 1 x (n*c_out) x H' x W', groups = n * groups) and ask the convolution's own
backward for its weight gradient, which comes out n*c_out x c_in/groups x kh x kw: sample by sample.
That runs on oneDNN / cuDNN kernels without the unfolded copy; on the 28x28 `cnn28` model it is several
times faster than the unfold path (bench/bench_dp_overhead.py).

Registered for nn.Conv2d and nn.Conv3d on import (client.dp imports this module), for Opacus's per-sample hooks
(`hooks`) and for fast gradient clipping (`ghost`). Layers it does not cover (string padding such as
"same", a padding mode other than zeros) fall back to Opacus's own sampler. Tests check both give the
same per-sample gradients.

Opacus keeps each layer's per-sample gradients by first allocating a zeroed tensor of their size and
copying them in (`create_or_accumulate_grad_sample`); for `cnn28` that is 36 MB written and copied
again at every step. `keep_or_add_grad_sample` (installed on import) keeps the sampler's own tensor
instead (every other case stays Opacus's: a layer's second use in one pass, an empty Poisson batch).

Weight-standardized convolutions (common.weight_standardization) get the same per-sample gradients
with respect to their standardized kernels, sent back through the standardization to the stored
weight (tested against one backward pass per sample).

GroupNorm: Opacus normalizes the layer's input a second time in the backward pass to get each
sample's weight gradient (sum over positions of x_hat * g). In `hooks` mode client.dp gives the layers
`group_norm_forward_keeping_stats`, which keeps each sample's group means and 1/std from the forward
pass, so the sampler needs one product with the output gradient: rstd * (sum x*g - mean * sum g), the
formula PyTorch's own GroupNorm backward uses for the weight. A layer without kept statistics for this
input (its own forward, or a pass the statistics do not match) falls back to Opacus's sampler.
"""

from __future__ import annotations

import math

import torch
from opacus.grad_sample import grad_sample_module, grad_sample_module_fast_gradient_clipping
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn

from common.weight_standardization import WS_CONVS, standardization_backward


def _covered(layer: nn.Conv2d | nn.Conv3d) -> bool:
    return (
        isinstance(layer.padding, tuple)
        and layer.padding_mode == "zeros"
        and type(layer) in (nn.Conv2d, nn.Conv3d, *WS_CONVS)
    )


@register_grad_sampler(list(WS_CONVS))
def ws_conv_grad_sample(
    layer: nn.Conv2d | nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a weight-standardized conv layer: those with respect to its
    standardized kernel, through the standardization to the stored weight."""
    out = conv_grad_sample(layer, activations, backprops)
    if layer.weight in out:
        out[layer.weight] = standardization_backward(layer.weight, out[layer.weight])
    return out


@register_grad_sampler([nn.Conv2d, nn.Conv3d])
def conv_grad_sample(
    layer: nn.Conv2d | nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients {param: n x *param.shape} of a Conv2d or Conv3d layer (Opacus's sampler
    signature)."""
    if not _covered(layer):
        return compute_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:
        return compute_conv_grad_sample(layer, activations, backprops)
    spatial = tuple(range(2, backprops.dim()))
    if layer.weight.requires_grad:
        c_out, c_in_g, *kernel = layer.weight.shape
        weight_shape = (n * c_out, c_in_g, *kernel)
        grad = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * c_out, *backprops.shape[2:]),
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            # only the weight's shape is used for a weight gradient: a broadcast view, no memory
            layer.weight.new_zeros(()).expand(weight_shape),
            None,
            list(layer.stride),
            list(layer.padding),
            list(layer.dilation),
            False,
            [0] * len(spatial),
            n * layer.groups,
            [False, True, False],
        )[1]
        out[layer.weight] = grad.view(n, c_out, c_in_g, *kernel)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=spatial)
    return out


KEPT_STATS = "_fedward_group_norm_stats"  # a GroupNorm's kept forward statistics (a list, newest last)
MAX_KEPT_STATS = 8  # forward passes never followed by a backward pass keep no more than this


def group_norm_forward_keeping_stats(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm's forward that keeps each sample's group means and 1/std for
    `group_norm_grad_sample` (installed by client.dp in hooks mode), in a training pass with
    gradients (when Opacus keeps the input for its backward hook). With an input that needs a
    gradient, the affine parameters are detached: their batch gradient is never used (the DP optimizer
    steps with the clipped per-sample ones), and the input gradient still flows; as a first layer
    they stay in the graph so that Opacus's backward hook fires."""
    weight, bias = self.weight, self.bias
    if x.requires_grad:
        weight = None if weight is None else weight.detach()
        bias = None if bias is None else bias.detach()
    n, c = x.shape[:2]
    out, mean, rstd = torch.native_group_norm(
        _dense(x), weight, bias, n, c, math.prod(x.shape[2:]), self.num_groups, self.eps
    )
    if self.training and torch.is_grad_enabled():
        kept = self.__dict__.setdefault(KEPT_STATS, [])
        kept.append((_identity(x), mean.detach(), rstd.detach()))
        del kept[:-MAX_KEPT_STATS]
    return out


def _dense(x: torch.Tensor) -> torch.Tensor:
    """`x` as torch.native_group_norm takes it: contiguous or channels-last (F.group_norm copies a
    strided view, such as a transposed one, the same way)."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if x.is_contiguous() or (channels_last is not None and x.is_contiguous(memory_format=channels_last)):
        return x
    return x.contiguous()


def _identity(x: torch.Tensor) -> tuple:
    """What tells one input from another while Opacus holds it: its memory, shape, strides, dtype."""
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype


def _take_kept_stats(layer: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The statistics kept for exactly this input (Opacus holds it, so its memory cannot have been
    reused for another), removed from the layer; None if there are none."""
    kept = layer.__dict__.get(KEPT_STATS, [])
    key = _identity(x)
    for i in range(len(kept) - 1, -1, -1):
        if kept[i][0] == key:
            _, mean, rstd = kept.pop(i)
            return mean, rstd
    return None


@register_grad_sampler(nn.GroupNorm)
def group_norm_grad_sample(
    layer: nn.GroupNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients {param: n x channels} of a GroupNorm layer (Opacus's sampler signature),
    from the statistics its forward kept (`group_norm_forward_keeping_stats`), else Opacus's own.
    Sums run over each sample's positions only (an input of feature vectors, n x channels, has one)."""
    stats = _take_kept_stats(layer, activations[0])
    if stats is None:
        return compute_group_norm_grad_sample(layer, activations, backprops)
    mean, rstd = stats  # n x groups
    n, c = backprops.shape[:2]
    positions = math.prod(backprops.shape[2:])
    grads = backprops.reshape(n, c, positions)
    summed = grads.sum(dim=2)  # n x channels: the bias's per-sample gradient
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        x = activations[0].to(backprops.dtype).reshape(n, c, positions)
        per_group = c // layer.num_groups
        mean, rstd = (t.to(backprops.dtype).repeat_interleave(per_group, dim=1) for t in (mean, rstd))
        out[layer.weight] = rstd * ((x * grads).sum(dim=2) - mean * summed)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = summed
    return out


def keep_or_add_grad_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Opacus's `create_or_accumulate_grad_sample` (same signature and result) without the zeroed copy:
    a full batch's per-sample gradients (the first call of a pass) are kept as the sampler made them;
    every other case (a layer's second use in the pass, an empty Poisson batch, whose samplers give
    one row of zeros for none) is Opacus's own."""
    if (
        param.requires_grad
        and not hasattr(param, "_current_grad_sample")
        and len(grad_sample) == max_batch_len
    ):
        param._current_grad_sample = grad_sample
    else:
        OPACUS_CREATE_OR_ACCUMULATE(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


OPACUS_CREATE_OR_ACCUMULATE = grad_sample_module.create_or_accumulate_grad_sample  # as shipped (benchmarks)
for _module in (grad_sample_module, grad_sample_module_fast_gradient_clipping):
    assert hasattr(_module, "create_or_accumulate_grad_sample"), "Opacus renamed the function this replaces"
    _module.create_or_accumulate_grad_sample = keep_or_add_grad_sample


class _GradTimesBatch(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the batch size (the output's first dim)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor) -> torch.Tensor:
        ctx.batch = output.shape[0]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * ctx.batch


def scale_once_at_output(dp_model: grad_sample_module.GradSampleModule) -> None:
    """Per-sample gradients of a mean loss without rescaling every layer's output gradient.

    Under a mean loss a layer's output gradient holds each sample's gradient divided by the batch size
    n, so Opacus's hooks (loss_reduction "mean") multiply it by n at every layer before computing
    per-sample gradients: for `cnn28` about 40 MB read and written again at every step. The same numbers
    come from multiplying the gradient once, at the model's output (n x classes values), and hooking the
    layers as for a summed loss (`dp_model` must be hooked so: client.dp.make_private asks Opacus for
    it, and keeps the optimizer dividing by the expected batch size), so what the optimizer steps with
    is unchanged (tested against Opacus's own hooks). Gone with the wrapper. A model whose output is not
    one tensor with the batch first (the size of the input's first dimension) is refused at its forward
    pass, since the one multiplication would then not give per-sample gradients."""
    if dp_model.loss_reduction != "sum":  # a mean-loss hook would multiply by n a second time
        raise ValueError("scale_once_at_output needs a GradSampleModule hooked with loss_reduction='sum'")
    module_forward = dp_model.forward

    def forward(*args, **kwargs):
        output = module_forward(*args, **kwargs)
        batch = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None
        if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != batch:
            # fails closed: gradients scaled by anything but the batch size would not be per-sample
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ""
            raise TypeError(
                "DP-SGD in hooks mode needs a model whose output is one tensor with the batch first "
                f"(got {type(output).__name__}{shape} for a batch of {batch}); every network in "
                "common.models returns one"
            )
        return _GradTimesBatch.apply(output)

    dp_model.forward = forward
